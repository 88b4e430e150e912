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
# # Sharded = one device: tensor / data parallel meshes on virtual devices
#
# Loads one checkpoint on a single device and on every mesh asked for (8 virtual CPU devices
# here; real accelerators when there are some), in each dtype, and compares the teacher-forced
# logits (max |dlogit| heatmap by mesh and dtype) and the greedy tokens with the
# single-device run. Sharding changes only the order of the partial sums an all-reduce adds,
# so fp32 agrees to ~1e-5 and the tokens are identical.
#
# Pipeline parallelism (`pipe > 1`) is not implemented for running models (`ftjax.load`
# refuses such a mesh; `ftjax plan` sizes it): PP meshes are listed and reported as such.

# %%
import os

# Before jax starts: this notebook runs in a fresh kernel, so it asks for its own devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

# %% tags=["parameters"]
import ftjax

model_path = ftjax.demo_model_path()
meshes = ["tp2", "tp4", "tp8", "dp2", "tp2xdp2", "tp4xdp2", "pp2"]  # tpN / dpN / ppN, joined by x
dtypes = ["float32", "bfloat16"]
n_prompts = 8
prompt_len = 32
new_tokens = 16
figure_path = None
results_path = None

# %%
import json
import re

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

print(f"{jax.device_count()} devices ({jax.default_backend()})")
cfg = ftjax.load(model_path).config
rng = np.random.default_rng(0)
prompts = rng.integers(0, cfg.vocab_size, (n_prompts, prompt_len)).astype(np.int32)
sp = ftjax.SamplingParams(stop_token_ids=[])


def parse(name):
    sizes = {"tp": 1, "dp": 1, "pp": 1}
    for part in name.split("x"):
        m = re.fullmatch(r"(tp|dp|pp)(\d+)", part)
        if not m:
            raise ValueError(f"mesh {name!r}: expected parts like tp2, dp2, pp2 joined by 'x'")
        sizes[m.group(1)] = int(m.group(2))
    return sizes


def run(model):
    logits = np.asarray(jax.device_get(model.forward(prompts)), np.float32)
    tokens = np.asarray(model.generate([list(p) for p in prompts], max_new_tokens=new_tokens,
                                       sampling=sp).tokens)
    return logits, tokens


# %%
err = np.full((len(meshes), len(dtypes)), np.nan)
same = np.zeros((len(meshes), len(dtypes)), bool)
notes = {}
for j, dtype in enumerate(dtypes):
    ref_logits, ref_tokens = run(ftjax.load(model_path, dtype=dtype))
    for i, name in enumerate(meshes):
        s = parse(name)
        try:
            mesh = ftjax.make_mesh(tensor=s["tp"], data=s["dp"], pipe=s["pp"])
            model = ftjax.load(model_path, dtype=dtype, mesh=mesh)
        except ValueError as e:  # heads not divisible by tp, or layers by pp
            notes[name] = str(e).split(";")[0]
            continue
        logits, tokens = run(model)
        err[i, j] = np.abs(logits - ref_logits).max()
        same[i, j] = np.array_equal(tokens, ref_tokens)
        del model

print(f"{'mesh':<10}" + "".join(f"{d:>22}" for d in dtypes))
for i, name in enumerate(meshes):
    if name in notes:
        print(f"{name:<10}  not run: {notes[name]}")
        continue
    print(f"{name:<10}" + "".join(f"{err[i, j]:>12.3g} tokens {'same' if same[i, j] else 'DIFF':>4}"
                                  for j in range(len(dtypes))))

# %%
ran = ~np.isnan(err[:, 0])
assert ran.any(), notes
if "float32" in dtypes:
    j = dtypes.index("float32")
    assert np.nanmax(err[:, j]) <= 1e-4, err[:, j]
    assert same[ran, j].all(), same[:, j]

# %%
fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(dtypes), 0.5 + 0.45 * len(meshes)))
shown = np.log10(np.maximum(err, 1e-9))
im = ax.imshow(np.ma.masked_invalid(shown), cmap="viridis", aspect="auto")
for i in range(len(meshes)):
    for j in range(len(dtypes)):
        text = "n/a" if np.isnan(err[i, j]) else f"{err[i, j]:.1e}" + ("" if same[i, j] else " *")
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="black" if np.isnan(err[i, j]) else "white")
ax.set(xticks=range(len(dtypes)), xticklabels=dtypes, yticks=range(len(meshes)),
       yticklabels=meshes, title="max |logit mesh - one device|")
fig.colorbar(im, ax=ax, label="log10")
fig.tight_layout()
if figure_path:
    fig.savefig(figure_path, dpi=80)
plt.show()
print("* = greedy tokens differ from one device; n/a = not run (see above)")

# %%
if results_path:
    with open(results_path, "w") as f:
        json.dump({"meshes": meshes, "dtypes": dtypes, "max_abs_dlogit": err.tolist(),
                   "tokens_identical": same.tolist(), "not_run": notes}, f, indent=1)
