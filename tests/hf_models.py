"""Tiny random HuggingFace GPT-2 checkpoints for parity tests (needs torch)."""

import numpy as np


def make_hf(config, directory, seed=0, safe=True, perturb_norms=True):
    """Saves a random HF causal LM built from `config` to `directory`; returns it (eval mode).

    Norm gains and every bias are moved off 1/0 so their conversion is tested.
    Set the config's initializer_range wider than the usual 0.02 (e.g. 0.3) so
    greedy continuations vary: a near-uniform model repeats one token and proves little.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or "ln_" in name or "layernorm" in name
            if perturb_norms and (is_norm or name.endswith(".bias")):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(directory, safe_serialization=safe)
    return model


def make_gpt2(directory, seed=0, safe=True, perturb_norms=True, **overrides):
    """A tiny random GPT2LMHeadModel saved to `directory`."""
    import transformers

    kwargs = dict(vocab_size=211, n_embd=48, n_layer=3, n_head=6, n_positions=128,
                  initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    kwargs.update(overrides)
    return make_hf(transformers.GPT2Config(**kwargs), directory, seed, safe, perturb_norms)


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


def hf_greedy(model, prompt, n, eos=None):
    """HF greedy continuation of one prompt (stops at `eos`; None: exactly n tokens)."""
    import copy

    import torch

    ids = torch.tensor([list(prompt)])
    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id = eos
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=0, generation_config=gen)
    return out[0, len(prompt):].tolist()
