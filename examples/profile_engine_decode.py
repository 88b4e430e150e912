"""Where the serving engine's decode step goes, at R live rows of chosen lengths.

`examples/profile_decode.py` profiles `generate` (contiguous cache); this profiles
`ftjax.LLMEngine`'s decode call (paged cache, one call = `chunk` steps) on a live state:
R requests of the given prompt lengths are admitted and prefilled, the state is captured
at the first decode call with every row live, and that call is then re-run on copies of
the state (copied outside the timed and traced region). Prints the wall time per step
(median and min) and, with --profile, XLA's own per-op breakdown (ms per step, by op
kind and the heaviest ops):

    python examples/profile_engine_decode.py --preset gpt2-124m --lens 400 [--profile]
    python examples/profile_engine_decode.py --lens 50,120,190,260,330,400,470,600

Rows of different lengths show the cost of attending every row up to the furthest one.
Developer tool: it calls the engine's compiled decode function directly.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ftjax  # noqa: E402
from ftjax.api import Model  # noqa: E402
from ftjax.config import preset  # noqa: E402
from ftjax.specs import init_params  # noqa: E402
from profile_decode import op_times  # noqa: E402


def live_decode_call(eng, lens, rng):
    """Admits one request per length and steps the engine until a decode call runs with
    every row live; returns (the call's function, its arguments, a copy of its donated
    arguments: the state and the held logits)."""
    rows = len(lens)
    captured = {}
    fn = eng._decode_fn

    def spy(*args):
        # args: params, state, held logits, options, slots, page tables, active, beam rows
        if "args" not in captured and len(args[4]) == rows and bool(np.all(np.asarray(args[6]))):
            captured["args"] = args
            captured["state"] = jax.tree_util.tree_map(jnp.copy, args[1:3])
        return fn(*args)

    eng._decode_fn = spy
    # enough new tokens that the first rows still run when the last prompt is prefilled
    new = eng.chunk * (4 + -(-sum(lens) // (eng.prefill_rows * eng.prefill_len)))
    new = min(new, eng.cfg.max_positions - max(lens))
    try:
        for n in lens:
            eng.add_request(rng.integers(0, eng.cfg.vocab_size, n).tolist(),
                            sampling=ftjax.SamplingParams(ignore_eos=True), max_new_tokens=new)
        while "args" not in captured:
            if not eng.has_unfinished():
                raise SystemExit("no decode call had every row live: use --slots >= rows")
            eng.step()
    finally:
        eng._decode_fn = fn
    return fn, captured["args"], captured["state"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy config (smoke run)")
    p.add_argument("--lens", default="400",
                   help="prompt lengths, comma-separated; repeated up to --rows rows")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--profile", action="store_true", help="XLA's per-op breakdown")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)

    if args.tiny:
        cfg = ftjax.ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                head_dim=16, d_ff=128, max_positions=512, eos_token_id=None)
    else:
        cfg = preset(args.preset)
    try:
        lens = [int(v) for v in args.lens.split(",")]
    except ValueError:
        raise SystemExit(f"--lens must be comma-separated integers, got {args.lens!r}") from None
    if args.rows < 1 or args.chunk < 1 or args.repeats < 1 or min(lens) < 1:
        raise SystemExit("--rows, --chunk, --repeats and every --lens value must be >= 1")
    lens = (lens * args.rows)[:args.rows]
    if max(lens) + args.chunk * 2 > cfg.max_positions:
        raise SystemExit(f"--lens: {max(lens)} + {args.chunk * 2} new tokens exceed the "
                         f"model's {cfg.max_positions} positions")
    model = Model(cfg, init_params(cfg, seed=0), "float32")
    eng = ftjax.LLMEngine(model, max_slots=args.rows, page_size=16, chunk=args.chunk,
                          prefill_budget=256, prefill_rows=4, processors=False, max_logprobs=0)
    fn, call, state = live_decode_call(eng, lens, np.random.default_rng(0))

    def fresh():
        s = jax.tree_util.tree_map(jnp.copy, state)
        return jax.block_until_ready(s)

    def run(s):
        t = time.perf_counter()
        jax.block_until_ready(fn(call[0], *s, *call[3:]))
        return time.perf_counter() - t

    run(fresh())
    times = sorted(run(fresh()) for _ in range(args.repeats))
    print(f"{cfg.n_layers} layers d_model={cfg.d_model}, {args.rows} rows, prompt lengths "
          f"{lens}, chunk {args.chunk}: wall median {1e3 * times[len(times) // 2] / args.chunk:.2f}"
          f" ms a step (min {1e3 * times[0] / args.chunk:.2f})")
    if not args.profile:
        return 0
    states = [fresh() for _ in range(3)]
    with tempfile.TemporaryDirectory(prefix="ftjax-prof-") as d:
        with jax.profiler.trace(d):
            for s in states:
                run(s)
        totals = op_times(d)
    steps = 3 * args.chunk
    every = sum(v[0] for v in totals.values())
    kinds = collections.defaultdict(lambda: [0.0, 0])
    for name, (sec, calls) in totals.items():
        kind = re.sub(r"\.\d+$", "", name)
        kinds[kind][0] += sec
        kinds[kind][1] += calls
    print(f"op time {1e3 * every / steps:.1f} ms a step (ops on both threads; `while` holds its"
          " body's ops too)")
    for title, table in (("by kind", kinds), ("heaviest ops", totals)):
        print(title + ":")
        for name, (sec, calls) in sorted(table.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"  {name:42s} {1e3 * sec / steps:8.2f} ms/step {100 * sec / every:5.1f}%"
                  f"  calls/step {calls / steps:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
