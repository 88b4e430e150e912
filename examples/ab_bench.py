"""Interleaved A/B of one lever on `ftjax bench`: keep a lever only if it wins every pair.

Arm A is `ftjax bench` as it is; arm B is the same command with extra environment
variables (an XLA flag, `FTJAX_LAYER_LOOP`, ...) and/or extra bench arguments. The arms
alternate A, B, A, B, ... in fresh processes (XLA flags are read once per process),
so a shared machine's load drifts over both alike; the medians and the per-pair wins
are printed per batch:

    python examples/ab_bench.py --env XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot \\
        --pairs 3 -- --preset gpt2-124m --batch 1,8 --output-len 16 --repeats 2
    python examples/ab_bench.py --args "--dtype bfloat16" --pairs 2 -- --batch 1

Unknown XLA flags abort XLA: check a flag on each jax version before comparing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_arm(bench_args, env_extra: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra)
    with tempfile.TemporaryDirectory(prefix="ftjax-ab-") as d:
        out = os.path.join(d, "r.json")
        r = subprocess.run([sys.executable, "-m", "ftjax", "bench", *bench_args, "--json", out],
                           env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"bench failed ({env_extra}):\n{r.stderr[-2000:]}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of arm B (repeatable)")
    p.add_argument("--args", default="", help="extra bench arguments of arm B")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the bench arguments")
    args = p.parse_args(argv)
    bench = [a for a in args.bench if a != "--"]
    env_b = dict(kv.split("=", 1) for kv in args.env)
    arms = {"A": (bench, {}), "B": (bench + shlex.split(args.args), env_b)}
    print(f"A: ftjax bench {' '.join(bench)}")
    print(f"B: A + env {env_b} + args {args.args!r}")
    results = {"A": [], "B": []}
    for i in range(args.pairs):
        for arm in ("A", "B"):
            res = run_arm(*arms[arm])
            results[arm].append(res)
            print(f"{arm}{i + 1}: " + "  ".join(
                f"b{r['batch']} decode {r['decode_tok_s']:.1f} tok/s, 1st {r['first_token_ms']:.0f}"
                f" ms" for r in res["rows"]), flush=True)
    for j, row in enumerate(results["A"][0]["rows"]):
        for key, better in (("decode_tok_s", max), ("first_token_ms", min)):
            a = [res["rows"][j][key] for res in results["A"]]
            b = [res["rows"][j][key] for res in results["B"]]
            wins = sum(better(x, y) == y and x != y for x, y in zip(a, b))
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"batch {row['batch']} {key}: A median {ma:.1f}, B median {mb:.1f} "
                  f"(B/A {mb / ma:.2f}); B better in {wins}/{args.pairs} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
