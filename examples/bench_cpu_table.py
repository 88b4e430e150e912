"""The CPU performance table of the README (issue 19), end to end, as markdown.

Runs every cell of the issue's target table, each configuration in its own
`ftjax bench` process (and HF, inside it, in a process of its own), plus the
long-context check, and prints one markdown section (CPU model + ISA, date, jax and
Python versions in its header):

    python examples/bench_cpu_table.py [--out cpu_table.md] [--repeats 2] [--quick] [--bf16-774m]

- fp32 gpt2-124m and gpt2-774m, bf16 gpt2-124m (and gpt2-774m with --bf16-774m), batch
  1 and 8, in 128 / out 32, vs HF (HF in the same dtype; the HF columns are left out
  when torch is not installed);
- int8 weight-only gpt2-774m, batch 1 and 8, vs ftjax fp32 of the same run;
- prefill 8 x 128: the batch-8 rows' first-token ms, ftjax vs HF;
- long context, gpt2-124m batch 1: decode ms per step at in 128 / out 128 and in
  896 / out 128 (GPT-2 has 1024 positions), and the same 128-token prompt and greedy
  tokens decoded in a `generate` cache of 256 vs 1024 slots (per-step time should
  follow the tokens in the cache, not its capacity).

`--quick` runs only gpt2-124m (a smoke run of the script itself). Bounded: meant for
about 15 minutes on a quiet 2-core machine at --repeats 2, so the gpt2-774m cells run
at most --repeats-774m (default 1) timed repeats of 32 steps each: on a loaded machine
(load ~5) the 774m fp32 cell with HF took 10.5 min at 2 repeats, its int8 cell 5 min
(HF's batch-8 774m generate alone is ~60 s a run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOAT_CELLS = [("gpt2-124m", "float32"), ("gpt2-774m", "float32"), ("gpt2-124m", "bfloat16")]
# HF bf16 generate() on a CPU without AMX is slow: minutes per 774m cell, so opt-in
BF16_774M = ("gpt2-774m", "bfloat16")
INT8_CELL = ("gpt2-774m", "float32", "int8")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def bench(preset, dtype, *, quant=None, batch="1,8", input_len=128, output_len=32,
          repeats=3, hf=False, log=sys.stderr) -> dict:
    """One `ftjax bench` process; returns its --json result."""
    with tempfile.TemporaryDirectory(prefix="ftjax-bench-") as d:
        out = os.path.join(d, "bench.json")
        cmd = [sys.executable, "-m", "ftjax", "bench", "--preset", preset, "--dtype", dtype,
               "--batch", batch, "--input-len", str(input_len), "--output-len", str(output_len),
               "--repeats", str(repeats), "--json", out]
        if quant:
            cmd += ["--quant", quant]
        if hf:
            cmd += ["--compare", "hf"]
        print("$ " + " ".join(cmd[1:]), file=log, flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=_env(), cwd=ROOT, stdout=log, stderr=log, check=False)
        if r.returncode != 0:
            raise SystemExit(f"bench failed (exit {r.returncode}): {' '.join(cmd[1:])}")
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=log, flush=True)
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def capacity_check(repeats: int) -> dict:
    """Decode ms per step of the same 128-token prompt and the same greedy tokens in
    `generate` caches of 256 and 1024 slots, gpt2-124m fp32 batch 1. `generate` sizes
    its cache from max_new_tokens (next power of two of prompt + max_new), so the big
    cache asks for 896 new tokens and stops on a token the greedy run is known to emit
    first at step `new`. Runs in this process (via `--capacity-check`, its own process)."""
    import numpy as np

    import ftjax
    from ftjax.api import Model
    from ftjax.config import preset
    from ftjax.specs import init_params

    cfg = preset("gpt2-124m")
    model = Model(cfg, init_params(cfg, seed=0), "float32", path="preset:gpt2-124m")
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 128).tolist()
    greedy = ftjax.SamplingParams(temperature=0.0, stop_token_ids=[])
    toks = model.generate([prompt], max_new_tokens=64, sampling=greedy).tokens[0]
    # the last step at which a token appears for the first time: stopping on it ends
    # the big-cache run after exactly `new` tokens
    new = max(i + 1 for i, t in enumerate(toks) if t not in toks[:i])
    if new < 16:
        raise RuntimeError(f"capacity check: greedy output repeats too early ({toks})")

    def timed(n, stop, max_new):
        sp = ftjax.SamplingParams(temperature=0.0, stop_token_ids=[stop] if stop else [])
        t0 = time.perf_counter()
        out = model.generate([prompt], max_new_tokens=max_new, sampling=sp).tokens[0]
        dt = time.perf_counter() - t0
        if len(out) != n:
            raise RuntimeError(f"capacity check: expected {n} tokens, got {len(out)}")
        return dt

    arms = {256: (lambda: timed(new, None, new), lambda: timed(1, None, 1)),
            1024: (lambda: timed(new, toks[new - 1], 1024 - 128),
                   lambda: timed(1, toks[0], 1024 - 128))}
    for full, first in arms.values():  # compile
        full(), first()
    per_step = {slots: [] for slots in arms}
    for _ in range(repeats):  # interleaved, so load drift hits both alike
        for slots, (full, first) in arms.items():
            per_step[slots].append(1e3 * (full() - first()) / (new - 1))
    return {slots: sorted(v)[len(v) // 2] for slots, v in per_step.items()}


def _capacity_subprocess(repeats: int, log) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--capacity-check", "--repeats",
           str(repeats)]
    print("$ " + " ".join(cmd[1:]), file=log, flush=True)
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"capacity check failed:\n{r.stderr[-2000:]}")
    return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def render(results: dict) -> str:
    """Markdown from the collected bench results (see `main` for the keys)."""
    floats, int8, longc, cap = (results["float"], results.get("int8"), results.get("long"),
                                results.get("capacity"))
    meta = next(iter(floats.values()))["meta"]
    has_hf = any("hf_tok_s" in r for res in floats.values() for r in res["rows"])
    lines = [f"### CPU decode: {meta['cpu']}", "",
             f"{meta['date']}; jax {meta['jax']}, Python {meta['python']}; measured read "
             f"bandwidth {meta['bandwidth_gbs']:.1f} GB/s; in 128 / out 32, greedy; "
             + ("HF: transformers `generate()` in a separate process, same weights and dtype."
                if has_hf else "HF not measured (torch not installed)."),
             "XLA_FLAGS: " + (f"`{meta['xla_flags']}`" if meta["xla_flags"] else "(none)")
             + "".join(f"; {k}={v}" for k, v in meta.get("ftjax_env", {}).items()), ""]
    head = ["model", "dtype", "batch", "ftjax tok/s", "decode tok/s", "% roofline",
            "1st token ms", "peak RSS MiB"]
    if has_hf:
        head += ["HF tok/s", "HF 1st token ms", "ftjax / HF"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp32 = {}
    for (name, dtype), res in floats.items():
        for r in res["rows"]:
            if dtype == "float32":
                fp32[(name, r["batch"])] = r
            cells = [name, dtype, str(r["batch"]), _f(r["tok_s"]), _f(r["decode_tok_s"]),
                     _f(r["roofline_pct"], "{:.0f}%"), _f(r["first_token_ms"], "{:.0f}"),
                     _f(r["peak_rss_mib"], "{:.0f}")]
            if has_hf:
                cells += [_f(r.get("hf_tok_s")), _f(r.get("hf_first_token_ms"), "{:.0f}"),
                          _f(r.get("speedup"), "{:.2f}x")]
            lines.append("| " + " | ".join(cells) + " |")
    if int8:
        lines += ["", "int8 weight-only (per output channel), against ftjax float32 of this run:",
                  "", "| model | batch | int8 decode tok/s | fp32 decode tok/s | int8 / fp32 | "
                  "% roofline | 1st token ms | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
        for r in int8["rows"]:
            base = fp32.get((INT8_CELL[0], r["batch"]))
            ratio = base and r["decode_tok_s"] / base["decode_tok_s"]
            lines.append(f"| {INT8_CELL[0]} | {r['batch']} | {_f(r['decode_tok_s'])} | "
                         f"{_f(base and base['decode_tok_s'])} | {_f(ratio, '{:.2f}x')} | "
                         f"{_f(r['roofline_pct'], '{:.0f}%')} | {_f(r['first_token_ms'], '{:.0f}')}"
                         f" | {_f(r['peak_rss_mib'], '{:.0f}')} |")
    b8 = [(name, res["rows"][-1]) for (name, dtype), res in floats.items()
          if dtype == "float32" and res["rows"][-1]["batch"] == 8]
    if b8 and has_hf:
        lines += ["", "Prefill 8 x 128 (first-token latency, float32): " + "; ".join(
            f"{name} ftjax {r['first_token_ms']:.0f} ms vs HF {r['hf_first_token_ms']:.0f} ms "
            f"({r['hf_first_token_ms'] / r['first_token_ms']:.2f}x)" for name, r in b8) + "."]
    if longc:
        lines += ["", "Long context, gpt2-124m float32, batch 1 (decode ms per step):", "",
                  "| in / out | cache slots | decode ms/step | % roofline |", "|---|---|---|---|"]
        for res in longc:
            r = res["rows"][0]
            slots = min(1 << (r["input_len"] + r["output_len"] - 1).bit_length(), 1024)
            lines.append(f"| {r['input_len']} / {r['output_len']} | {slots} | "
                         f"{r['decode_step_ms']:.2f} | {r['roofline_pct']:.0f}% |")
    if cap:
        lines += ["", "Same 128-token prompt and greedy tokens, in a `generate` cache of "
                  + " vs ".join(f"{k} slots: {v:.2f} ms/step" for k, v in sorted(cap.items()))
                  + f" (ratio {cap[1024] / cap[256]:.2f}; 1.00 = time follows the tokens in "
                  "the cache, not its capacity)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per number (median)")
    p.add_argument("--repeats-774m", type=int, default=1,
                   help="timed runs of the gpt2-774m cells (at most --repeats; keeps the "
                        "table near 15 min)")
    p.add_argument("--bf16-774m", action="store_true",
                   help="also gpt2-774m in bfloat16 (HF's bf16 is slow here: several minutes)")
    p.add_argument("--quick", action="store_true", help="gpt2-124m cells only (smoke run)")
    p.add_argument("--no-hf", action="store_true", help="skip HF even if torch is installed")
    p.add_argument("--capacity-check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.capacity_check:
        print(json.dumps(capacity_check(args.repeats)))
        return 0
    hf = not args.no_hf and importlib.util.find_spec("torch") is not None
    log = sys.stderr
    t0 = time.perf_counter()
    cells = FLOAT_CELLS + [BF16_774M] * args.bf16_774m
    cells = [c for c in cells if not args.quick or c[0] == "gpt2-124m"]
    r774 = min(args.repeats, args.repeats_774m)
    results = {"float": {c: bench(*c, repeats=r774 if c[0] == "gpt2-774m" else args.repeats,
                                  hf=hf, log=log) for c in cells}}
    if not args.quick:
        results["int8"] = bench(*INT8_CELL[:2], quant=INT8_CELL[2], repeats=r774, log=log)
    results["long"] = [bench("gpt2-124m", "float32", batch="1", input_len=n, output_len=128,
                             repeats=args.repeats, log=log) for n in (128, 896)]
    results["capacity"] = _capacity_subprocess(args.repeats, log)
    md = render(results)
    md += f"\n(`examples/bench_cpu_table.py` took {time.perf_counter() - t0:.0f} s.)\n"
    print(md)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
