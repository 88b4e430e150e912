"""The HuggingFace side of `ftjax bench --compare hf`, run in its own process.

XLA's and torch's thread pools starve each other on a small CPU when they live in one
process, so `ftjax bench` times HF here: `python -m ftjax.bench_hf` reads one JSON job
on stdin and prints one JSON line of results on stdout. The parent waits (idle) while
this process runs, and this process never runs a jax computation: the weights come from
the checkpoint loader or the preset's numpy initializer, exported for HF by
`ftjax.hf_reference.hf_causal_lm` (the very weights ftjax runs).

Job: {"model": DIR or null, "preset": NAME or null, "dtype": "float32", "seed": 0,
"prompts": {"B": [[ids...], ...]}, "output_len": N, "repeats": R}.
Result: {"rows": {"B": {"latency_s": .., "first_s": ..}}, "pid": .., "peak_rss_mib": ..}.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from types import SimpleNamespace
from ftjax.timing import median_time


def _weights(job: dict):
    """An object `hf_causal_lm` accepts (config, numpy params, path), made without jax."""
    if job.get("model"):
        from converters import load_checkpoint

        cfg, params = load_checkpoint(job["model"])
        return SimpleNamespace(config=cfg, params=params, path=job["model"], quant=None)
    from ftjax.config import preset
    from ftjax.specs import init_params

    cfg = preset(job["preset"])
    return SimpleNamespace(config=cfg, params=init_params(cfg, seed=job.get("seed", 0)),
                           path=None, quant=None)


def run(job: dict) -> dict:
    """Times HF `generate()` (greedy, exactly output_len new tokens) for each batch."""
    import torch

    from ftjax.hf_reference import hf_causal_lm

    hf = hf_causal_lm(_weights(job), job["dtype"])
    out_len, repeats = job["output_len"], job["repeats"]
    rows = {}
    for batch, prompts in job["prompts"].items():
        ids = torch.tensor(prompts)
        mask = torch.ones_like(ids)

        def gen(n):
            with torch.no_grad():
                hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)

        rows[batch] = {"latency_s": median_time(lambda: gen(out_len), repeats),
                       "first_s": median_time(lambda: gen(1), repeats)}
    return {"rows": rows, "pid": os.getpid(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    job = json.load(sys.stdin)
    print(json.dumps(run(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
