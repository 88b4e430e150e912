"""Synthesizes Megatron-LM / NeMo checkpoints from tiny HF models (needs torch).

Written straight from the HF state dict by Megatron's own layouts, independently of
ftjax's importer, so an error in the importer cannot be cancelled by its inverse.
"""

import json
import os

import numpy as np

# Per-layer names: (legacy old, legacy new, megatron-core) for each role.
NAMES = {
    "old": {"ln1": "input_layernorm", "qkv": "attention.query_key_value",
            "proj": "attention.dense", "ln2": "post_attention_layernorm",
            "fc1": "mlp.dense_h_to_4h", "fc2": "mlp.dense_4h_to_h", "stack": "transformer",
            "final": "final_layernorm"},
    "new": {"ln1": "input_norm", "qkv": "self_attention.query_key_value",
            "proj": "self_attention.dense", "ln2": "post_attention_norm",
            "fc1": "mlp.dense_h_to_4h", "fc2": "mlp.dense_4h_to_h", "stack": "encoder",
            "final": "final_norm"},
}


def gpt2_weights(model):
    """Per-role numpy weights of an HF GPT2LMHeadModel in torch Linear layout `[out, in]`."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    c = model.config
    n, d = c.n_head, c.n_embd
    h = d // n
    layers = []
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        w = sd[p + "attn.c_attn.weight"].T  # [3D, D] rows q | k | v, heads-major
        b = sd[p + "attn.c_attn.bias"]
        layers.append({
            "q": w[:d].reshape(n, h, d), "k": w[d:2 * d].reshape(n, h, d),
            "v": w[2 * d:].reshape(n, h, d), "qb": b[:d].reshape(n, h),
            "kb": b[d:2 * d].reshape(n, h), "vb": b[2 * d:].reshape(n, h),
            "proj": sd[p + "attn.c_proj.weight"].T, "proj_b": sd[p + "attn.c_proj.bias"],
            "ln1": sd[p + "ln_1.weight"], "ln1_b": sd[p + "ln_1.bias"],
            "ln2": sd[p + "ln_2.weight"], "ln2_b": sd[p + "ln_2.bias"],
            "fc1": sd[p + "mlp.c_fc.weight"].T, "fc1_b": sd[p + "mlp.c_fc.bias"],
            "fc2": sd[p + "mlp.c_proj.weight"].T, "fc2_b": sd[p + "mlp.c_proj.bias"],
        })
    return {"embed": sd["transformer.wte.weight"], "pos": sd["transformer.wpe.weight"],
            "final": sd["transformer.ln_f.weight"], "final_b": sd["transformer.ln_f.bias"],
            "layers": layers, "heads": n, "groups": n, "head_dim": h}


def llama_weights(model):
    """Per-role weights of an HF LlamaForCausalLM (GQA, swiglu, untied, no biases)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    c = model.config
    n, k, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    h = d // n
    layers = []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append({
            "q": sd[p + "self_attn.q_proj.weight"].reshape(n, h, d),
            "k": sd[p + "self_attn.k_proj.weight"].reshape(k, h, d),
            "v": sd[p + "self_attn.v_proj.weight"].reshape(k, h, d),
            "proj": sd[p + "self_attn.o_proj.weight"],
            "ln1": sd[p + "input_layernorm.weight"], "ln2": sd[p + "post_attention_layernorm.weight"],
            "gate": sd[p + "mlp.gate_proj.weight"], "fc1": sd[p + "mlp.up_proj.weight"],
            "fc2": sd[p + "mlp.down_proj.weight"],
        })
    return {"embed": sd["model.embed_tokens.weight"], "final": sd["model.norm.weight"],
            "head": sd["lm_head.weight"], "layers": layers, "heads": n, "groups": k,
            "head_dim": h}


def _qkv(lw, t, tp, w, version, bias=False):
    """Rank t's fused qkv rows in the layout of checkpoint `version`."""
    n, g, h = w["heads"], w["groups"], w["head_dim"]
    r = n // g
    q, k, v = (lw["qb"], lw["kb"], lw["vb"]) if bias else (lw["q"], lw["k"], lw["v"])
    gl = g // tp
    qs, ks, vs = q[t * gl * r:(t + 1) * gl * r], k[t * gl:(t + 1) * gl], v[t * gl:(t + 1) * gl]
    tail = qs.shape[2:]
    if version == 0:  # [3, np, hn]
        out = np.stack([qs, ks, vs])
    elif version == 1.0:  # [np, hn, 3]
        out = np.stack([qs, ks, vs], axis=2)
    else:  # [ng, np/ng + 2, hn]
        out = np.concatenate([qs.reshape(gl, r, h, *tail), ks[:, None], vs[:, None]], axis=1)
    return out.reshape(-1, *tail)


def rank_state(w, t, tp, layer_ids, version, names="new", first=True, last=True,
               padded=None, layernorm_1p=False, mcore=False, seed=0):
    """Flat {key: numpy} of TP rank t holding the given layers (indices restart at 0)."""
    nm = NAMES["old" if names == "old" else "new"]
    one = 1.0 if layernorm_1p else 0.0
    out = {}
    stack = "decoder" if mcore else f"language_model.{nm['stack']}"
    emb = "embedding" if mcore else "language_model.embedding"

    def split(x, axis):
        return np.split(x, tp, axis=axis)[t]

    vocab = w["embed"].shape[0]
    padded = padded or vocab
    # Padded rows get large random values: sampling or reading them would show.
    rng = np.random.default_rng(seed)
    table = np.concatenate([w["embed"], rng.standard_normal(
        (padded - vocab, w["embed"].shape[1])).astype(np.float32) * 5])
    if first:
        out[f"{emb}.word_embeddings.weight"] = split(table, 0)
        if "pos" in w:
            out[f"{emb}.position_embeddings.weight"] = w["pos"]
    for local, i in enumerate(layer_ids):
        lw = w["layers"][i]
        p = f"{stack}.layers.{local}."
        if mcore:
            keys = {"ln1": "self_attention.linear_qkv.layer_norm_weight",
                    "ln1_b": "self_attention.linear_qkv.layer_norm_bias",
                    "qkv": "self_attention.linear_qkv.weight",
                    "qkv_b": "self_attention.linear_qkv.bias",
                    "proj": "self_attention.linear_proj.weight",
                    "proj_b": "self_attention.linear_proj.bias",
                    "ln2": "mlp.linear_fc1.layer_norm_weight",
                    "ln2_b": "mlp.linear_fc1.layer_norm_bias",
                    "fc1": "mlp.linear_fc1.weight", "fc1_b": "mlp.linear_fc1.bias",
                    "fc2": "mlp.linear_fc2.weight", "fc2_b": "mlp.linear_fc2.bias"}
            out[p + "self_attention.core_attention._extra_state"] = None
        else:
            keys = {r: f"{nm[r.split('_')[0]]}.{'bias' if r.endswith('_b') else 'weight'}"
                    for r in ("ln1", "ln1_b", "qkv", "qkv_b", "proj", "proj_b", "ln2", "ln2_b",
                              "fc1", "fc1_b", "fc2", "fc2_b")}
        out[p + keys["ln1"]] = lw["ln1"] - one
        out[p + keys["ln2"]] = lw["ln2"] - one
        out[p + keys["qkv"]] = _qkv(lw, t, tp, w, version)
        out[p + keys["proj"]] = split(lw["proj"], 1)
        fc1 = split(lw["fc1"], 0)
        if "gate" in lw:
            fc1 = np.concatenate([split(lw["gate"], 0), fc1])
        out[p + keys["fc1"]] = fc1
        out[p + keys["fc2"]] = split(lw["fc2"], 1)
        if "ln1_b" in lw:
            out[p + keys["ln1_b"]] = lw["ln1_b"]
            out[p + keys["ln2_b"]] = lw["ln2_b"]
            out[p + keys["qkv_b"]] = _qkv(lw, t, tp, w, version, bias=True)
            out[p + keys["proj_b"]] = lw["proj_b"]
            out[p + keys["fc1_b"]] = split(lw["fc1_b"], 0)
            out[p + keys["fc2_b"]] = lw["fc2_b"]
    if last and not first and "head" not in w and not mcore:
        out["word_embeddings_for_head.weight"] = split(table, 0)  # the tied head's copy
    if last:
        out[f"{stack}.{'final_layernorm' if mcore else nm['final']}.weight"] = w["final"] - one
        if "final_b" in w:
            out[f"{stack}.{'final_layernorm' if mcore else nm['final']}.bias"] = w["final_b"]
        if "head" in w:
            head = np.concatenate([w["head"], np.zeros((padded - vocab, w["head"].shape[1]),
                                                       np.float32)])
            out["output_layer.weight" if mcore else "language_model.output_layer.weight"] = \
                split(head, 0)
    return out


def nest_legacy(flat):
    """Megatron-LM's legacy nesting: model.language_model.{embedding: {...}, encoder: {...}}."""
    import torch

    nested = {}
    for key, value in flat.items():
        if value is None:
            continue
        parts = key.split(".")
        if parts[0] == "language_model":
            # language_model.embedding.word_embeddings.weight -> nested dicts; the stack is flat.
            if parts[1] in ("transformer", "encoder"):
                path, leaf = parts[:2], ".".join(parts[2:])
            else:
                path, leaf = parts[:-1], parts[-1]
        else:
            path, leaf = parts[:-1], parts[-1]
        node = nested
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = torch.from_numpy(np.ascontiguousarray(value))
    return nested


def layer_split(n_layers, pp):
    per = n_layers // pp
    return [list(range(s * per, (s + 1) * per)) for s in range(pp)]


def write_megatron(root, w, n_layers, tp=1, pp=1, version=3.0, names="new", args=None,
                   padded=None, iteration=None, mcore=False, extra_args=None):
    """Writes DIR/latest_checkpointed_iteration.txt + release|iter_N/mp_rank_*/model_optim_rng.pt."""
    import torch

    sub = "release" if iteration is None else f"iter_{iteration:07d}"
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release" if iteration is None else str(iteration))
    stages = layer_split(n_layers, pp)
    for p, layer_ids in enumerate(stages):
        for t in range(tp):
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            d = os.path.join(root, sub, name)
            os.makedirs(d, exist_ok=True)
            flat = rank_state(w, t, tp, layer_ids, version, names, first=p == 0,
                              last=p == pp - 1, padded=padded, mcore=mcore)
            if mcore:
                model = {k: (None if v is None else torch.from_numpy(np.ascontiguousarray(v)))
                         for k, v in flat.items()}
            else:
                model = nest_legacy(flat)
            ckpt = {"model": model, "iteration": iteration or 0, "rng_state": [1, 2]}
            if args is not None:
                import argparse

                ns = argparse.Namespace(**args, tensor_model_parallel_size=tp,
                                        pipeline_model_parallel_size=pp)
                for k, v in (extra_args or {}).items():
                    setattr(ns, k, v)
                ckpt["args"] = ns
            if version != 0:
                ckpt["checkpoint_version"] = version
            torch.save(ckpt, os.path.join(d, "model_optim_rng.pt"))
    return root


def write_gpt2_vocab(directory, vocab_size):
    """A byte-level BPE vocab.json of `vocab_size` tokens (last: <|endoftext|>) + merges.txt."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())[:vocab_size - 1] + ["<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({c: i for i, c in enumerate(chars)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
