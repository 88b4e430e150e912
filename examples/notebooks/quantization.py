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
# # What quantization costs: fp32 vs int8 / int8-g128 / W8A8 / int8 KV cache
#
# For each mode on the same checkpoint and text: perplexity and next-token accuracy, the KL
# divergence KL(fp32 || mode) of every next-token distribution (histogram), the per-layer
# weight quantization error (bar plot), greedy agreement with fp32, and parameter bytes.
# With `compare_hf=True` (GPT-2-family checkpoints), the int8 model is also compared with
# HF transformers running the dequantized weights: what remains is the activation path.
#
# Teacher forcing (`Model.forward`) attends over the cache it writes, so the int8 KV cache
# shows in the KL and perplexity as well as in generation.

# %% tags=["parameters"]
import ftjax

model_path = ftjax.demo_model_path()
text_path = "../data/heldout.py.txt"
calibration_path = "../data/calibration.py.txt"  # W8A8 (SmoothQuant) calibration text
modes = ["float32", "int8", "int8-g128", "w8a8", "kv int8"]
n_windows = 8  # text windows of max_positions tokens, teacher forced
n_prompts = 16
prompt_len = 32
new_tokens = 32
compare_hf = False
figure_path = None
results_path = None

# %%
import json
import os

import matplotlib

matplotlib.use("Agg")
import jax
import matplotlib.pyplot as plt
import numpy as np

from ftjax import quant
from ftjax.evaluate import encode_long

MODES = {"float32": {}, "int8": {"quant": "int8"}, "int8-g128": {"quant": "int8-g128"},
         "w8a8": {"quant": "w8a8"}, "kv int8": {"kv_cache_dtype": "int8"}}
base = ftjax.load(model_path)
cfg, tok = base.config, base.tokenizer
with open(text_path, encoding="utf-8") as f:
    stream = encode_long(tok, f.read()) if tok else None
if stream is None:  # no tokenizer: random ids
    stream = np.random.default_rng(0).integers(0, cfg.vocab_size, 1 << 15).tolist()
with open(calibration_path, encoding="utf-8") as f:
    calibration = [f.read()] if tok else [stream[:cfg.max_positions]]
W = cfg.max_positions
n_windows = min(n_windows, len(stream) // W)
windows = np.asarray([stream[i * W:(i + 1) * W] for i in range(n_windows)], np.int32)
step = (len(stream) - prompt_len) // n_prompts
prompts = [stream[i * step:i * step + prompt_len] for i in range(n_prompts)]
print(base, f"\n{n_windows} windows x {W} tokens; {n_prompts} prompts")


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def group_size(mode):
    return 128 if mode == "int8-g128" else 0


# %%
rows, kl, weight_err, models = {}, {}, {}, {}
greedy_ref = lp_ref = None
for mode in modes:
    kw = dict(MODES[mode])
    if kw.get("quant") == "int8-g128" and cfg.d_model % 128:
        print(f"{mode}: skipped (d_model {cfg.d_model} is not a multiple of 128)")
        continue
    if kw.get("quant") == "w8a8":
        kw["calibration"] = calibration
    m = ftjax.load(model_path, **kw)
    lp = log_softmax(m.forward(windows))[:, :-1]  # [B, W-1, V]
    tgt = windows[:, 1:]
    nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    g = np.asarray(m.generate(prompts, max_new_tokens=new_tokens,
                              sampling=ftjax.SamplingParams(stop_token_ids=[])).tokens)
    if lp_ref is None:
        lp_ref, greedy_ref = lp, g
    kl[mode] = (np.exp(lp_ref) * (lp_ref - lp)).sum(-1).ravel()  # KL(fp32 || mode) per token
    rows[mode] = {"perplexity": float(np.exp(nll.mean())),
                  "accuracy": float((lp.argmax(-1) == tgt).mean()),
                  "mean_kl": float(kl[mode].mean()),
                  "greedy_agreement": float((g == greedy_ref).mean()),
                  "param_bytes": int(m.param_bytes)}
    if m.quant in ("int8", "int8-g128"):
        # Relative Frobenius error of every block kernel, per layer.
        ref_layers = base.params["layers"]
        err = {}
        for grp, mods in m.params["layers"].items():
            for name, leaves in mods.items():
                w = leaves.get("kernel") if hasattr(leaves, "get") else None
                if w is None or not quant.is_quantized(w):
                    continue
                dq = np.asarray(quant.dequantize(w))
                ref = np.asarray(ref_layers[grp][name]["kernel"], np.float32)
                axes = tuple(range(1, ref.ndim))
                err[name] = (np.sqrt(((dq - ref) ** 2).sum(axes) / (ref ** 2).sum(axes))).tolist()
        weight_err[mode] = err
    models[mode] = m if m.quant == "int8" else None
    del m

fp = rows[modes[0]]
print(f"{'mode':<11}{'ppl':>10}{'d ppl':>9}{'acc':>8}{'mean KL':>10}{'agree':>8}{'bytes':>12}"
      f"{'x fp32':>8}")
for mode, r in rows.items():
    print(f"{mode:<11}{r['perplexity']:>10.3f}{r['perplexity'] / fp['perplexity'] - 1:>+9.2%}"
          f"{r['accuracy']:>8.4f}{r['mean_kl']:>10.2e}{r['greedy_agreement']:>8.1%}"
          f"{r['param_bytes']:>12,}{r['param_bytes'] / fp['param_bytes']:>8.3f}")

# %% [markdown]
# A quantized model should stay close: the checks below are loose on purpose (they catch a
# broken mode, not a 0.1% drift): perplexity within 5% of fp32 and int8 weights under 0.3x
# of the fp32 bytes.

# %%
for mode, r in rows.items():
    assert np.isfinite(r["perplexity"]) and r["perplexity"] <= 1.05 * fp["perplexity"], (mode, r)
    if mode in ("int8", "int8-g128", "w8a8"):
        assert r["param_bytes"] <= 0.3 * fp["param_bytes"], (mode, r)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for mode, values in kl.items():
    if mode != modes[0] and values.max() > 0:
        axes[0].hist(np.maximum(values, 1e-12), bins=np.logspace(-9, 0, 60), histtype="step",
                     label=mode)
axes[0].set(xscale="log", xlabel="KL(fp32 || mode) per token (nats)", ylabel="tokens",
            title="next-token KL divergence")
axes[0].legend(fontsize=7)
width = 0.8 / max(len(weight_err), 1)
for k, (mode, err) in enumerate(weight_err.items()):
    names = [n for n in err]
    per = np.asarray([err[n] for n in names])  # [kernels, layers]
    x = np.arange(per.shape[1])
    axes[1].bar(x + k * width, per.mean(0), width, label=f"{mode} (mean of {', '.join(names)})")
axes[1].set(xlabel="layer", ylabel="||W - deq(W)|| / ||W||", title="weight quantization error")
axes[1].legend(fontsize=7)
fig.suptitle(f"{os.path.basename(os.path.normpath(model_path))}", fontsize=9)
fig.tight_layout()
if figure_path:
    fig.savefig(figure_path, dpi=80)
plt.show()

# %% [markdown]
# ## int8 vs HF transformers on the dequantized weights (optional)

# %%
if compare_hf and models.get("int8") is not None:
    import tempfile

    import torch
    import transformers

    from converters.hf_export import save_hf_gpt2

    m = models["int8"]
    deq = jax.tree_util.tree_map(lambda x: np.asarray(quant.dequantize(x))
                                 if quant.is_quantized(x) else np.asarray(x),
                                 m.params, is_leaf=quant.is_quantized)
    d = tempfile.mkdtemp(prefix="ftjax-deq-")
    save_hf_gpt2(d, cfg, deq)  # GPT-2-family configs only (raises otherwise)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(windows[:2], dtype=torch.long)).logits.numpy()
    got = np.asarray(m.forward(windows[:2]))
    gap = float(np.abs(got - ref).max())
    print(f"int8 ftjax vs HF on dequantized weights: max |dlogit| {gap:.3g} "
          f"(logit scale {np.abs(ref).max():.3g})")
    rows["int8"]["hf_dequantized_max_dlogit"] = gap
    assert gap <= 1e-3 * max(np.abs(ref).max(), 1.0), gap

# %%
if results_path:
    with open(results_path, "w") as f:
        json.dump({"rows": rows, "weight_error": weight_err}, f, indent=1)
