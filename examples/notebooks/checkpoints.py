# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # One checkpoint through every conversion, and back
#
# The HF original is converted to each format ftjax writes (native safetensors, orbax,
# FasterTransformer c-model at TP 1 and 2, in fp32 and fp16) and exported back to a HF GPT-2
# directory; each is loaded again and its logits compared with HF transformers running the
# original (table + plot). Megatron-LM and NeMo checkpoints of the same model (ftjax reads
# them but does not write them) go in `extra_checkpoints` as {name: path}.

# %% tags=["parameters"]
import ftjax

model_path = ftjax.demo_model_path()  # a HuggingFace directory (the reference)
extra_checkpoints = {}  # e.g. {"megatron tp2": "/ckpt/megatron", "nemo": "/ckpt/m.nemo"}
n_prompts = 4
prompt_len = 48
figure_path = None
results_path = None

# %%
import json
import os
import tempfile

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers

from converters import load_checkpoint, save_native, save_orbax
from converters.fastertransformer import save_fastertransformer
from converters.hf_export import save_hf_gpt2

cfg, params = load_checkpoint(model_path)
params = jax.tree_util.tree_map(np.asarray, params)
prompt_len = min(prompt_len, cfg.max_positions)
ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (n_prompts, prompt_len))
hf = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
with torch.no_grad():
    ref = hf(torch.as_tensor(ids)).logits.numpy()
scale = float(np.abs(ref).max())
work = tempfile.mkdtemp(prefix="ftjax-ckpts-")
print(f"{model_path}: {cfg.n_layers} layers, d_model {cfg.d_model}; work dir {work}")


def cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), tree)


# name -> (writer, dtype the checkpoint stores). A writer that refuses this model (FT's GPT
# c-model has no rotary / RMSNorm / GQA; the HF export is GPT-2 only) is reported, not hidden.
paths = {
    "native fp32": (lambda d: save_native(d, cfg, params, "float32", source=model_path),
                    "float32"),
    "native fp16": (lambda d: save_native(d, cfg, cast(params, np.float16), "float16",
                                          source=model_path), "float16"),
    "orbax fp32": (lambda d: save_orbax(d, cfg, params, "float32", source=model_path),
                   "float32"),
    "ft tp1 fp32": (lambda d: save_fastertransformer(d, cfg, params, tp=1), "float32"),
    "ft tp2 fp32": (lambda d: save_fastertransformer(d, cfg, params, tp=2), "float32"),
    "ft tp2 fp16": (lambda d: save_fastertransformer(d, cfg, params, tp=2, dtype="float16"),
                    "float16"),
    "hf export": (lambda d: save_hf_gpt2(d, cfg, params), "float32"),
}

# %%
rows = {}
for name, (write, dtype) in paths.items():
    d = os.path.join(work, name.replace(" ", "-"))
    try:
        write(d)
    except ValueError as e:
        rows[name] = {"error": str(e)}
        continue
    model = ftjax.load(d, dtype=dtype)
    got = np.asarray(model.forward(ids), np.float32)
    rows[name] = {"dtype": dtype, "max_abs_dlogit": float(np.abs(got - ref).max()),
                  "per_position": np.abs(got - ref).max(axis=(0, 2)).tolist(),
                  "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}
    if name == "hf export":  # back to HF: transformers reads what ftjax wrote
        back = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            again = back(torch.as_tensor(ids)).logits.numpy()
        rows[name]["hf_reload_max_abs_dlogit"] = float(np.abs(again - ref).max())
for name, path in extra_checkpoints.items():
    model = ftjax.load(path)
    got = np.asarray(model.forward(ids), np.float32)
    rows[name] = {"dtype": model.dtype, "max_abs_dlogit": float(np.abs(got - ref).max()),
                  "per_position": np.abs(got - ref).max(axis=(0, 2)).tolist(),
                  "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}

print(f"{'path':<16}{'dtype':>9}{'max|dlogit|':>13}{'/ scale':>10}{'argmax agree':>14}")
for name, r in rows.items():
    if "error" in r:
        print(f"{name:<16}  not written: {r['error'][:90]}")
        continue
    print(f"{name:<16}{r['dtype']:>9}{r['max_abs_dlogit']:>13.3g}"
          f"{r['max_abs_dlogit'] / scale:>10.2e}{r['argmax_agreement']:>14.3f}")

# %% [markdown]
# fp32 paths must reproduce HF to rounding (1e-4 of the logit scale); fp16 storage rounds
# every weight once (relative 2^-11), so its logits move by ~1e-3 of the scale.

# %%
for name, r in rows.items():
    if "error" in r:
        continue
    bar = 1e-4 if r["dtype"] == "float32" else 2e-2
    assert r["max_abs_dlogit"] <= bar * max(scale, 1.0), (name, r["max_abs_dlogit"])
    assert r.get("hf_reload_max_abs_dlogit", 0.0) <= 1e-4 * max(scale, 1.0), (name, r)

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
for name, r in rows.items():
    if "per_position" in r:
        ax.semilogy(np.maximum(r["per_position"], 1e-9), label=name,
                    linestyle="--" if r["dtype"] != "float32" else "-")
ax.set(xlabel="position", ylabel="max |logit - HF original|",
       title=f"conversions of {os.path.basename(os.path.normpath(model_path))}")
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
if figure_path:
    fig.savefig(figure_path, dpi=80)
plt.show()

# %%
if results_path:
    with open(results_path, "w") as f:
        json.dump({k: {x: y for x, y in v.items() if x != "per_position"}
                   for k, v in rows.items()}, f, indent=1)
