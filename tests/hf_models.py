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
    gen.update(eos_token_id=eos, max_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    return out[0, len(prompt):].tolist()


EPS = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
LOW_TOL_EPS = 16  # tolerance in units of the dtype's eps times the logit scale


def check_low_precision(directory, hf32, dtype, ids, label=""):
    """ftjax in `dtype` vs HF loaded from `directory` in the same dtype.

    Both cast the same fp32 checkpoint and compute in the dtype but round
    differently (ftjax keeps norm statistics, rotary angles, attention scores and
    softmax in float32; HF rounds some of them to the dtype and orders its sums
    differently). Each rounding is a relative error ~eps (bf16 2^-8, fp16 2^-11);
    through a few layers they compound to a few eps of the logit scale, the size
    of HF's own dtype-vs-fp32 error. Required:
      - max |ftjax - HF| <= 16 eps * max |HF fp32 logit| (bf16 6.3%, fp16 0.8% of
        the logit scale; a wrong layout is off by ~100%);
      - max |ftjax - HF| <= 2 * max |HF(dtype) - HF(fp32)|: ftjax is off HF by at most
        twice HF's own rounding error against fp32;
      - teacher-forced next-token argmax agrees on >= 95% of positions.
    Returns the max abs error.
    """
    import torch
    import transformers

    import ftjax

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=getattr(torch, dtype)).eval()
    model = ftjax.load(str(directory), dtype=dtype)
    ref32 = hf_logits(hf32, ids)
    ref = hf_logits(hf, ids)
    ours = np.asarray(model.forward(ids))
    scale = np.abs(ref32).max()
    err = np.abs(ours - ref).max()
    hf_own = np.abs(ref - ref32).max()
    agree = (ours[:, :-1].argmax(-1) == ref[:, :-1].argmax(-1)).mean()
    print(f"\n{label} {dtype}: max abs logit error {err:.3g} = {err / scale / EPS[dtype]:.1f} "
          f"eps x scale {scale:.1f}; HF {dtype} vs fp32 {hf_own:.3g}; argmax agreement "
          f"{agree:.3f}")
    assert np.isfinite(ours).all()
    assert err <= LOW_TOL_EPS * EPS[dtype] * scale
    assert err <= 2 * hf_own
    assert agree >= 0.95
    return err
