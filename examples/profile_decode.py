"""Where a decode step's time goes, per XLA op / fusion, from XLA's own profiler.

Traces `generate` with `jax.profiler.trace`, reads the trace back with
`jax.profiler.ProfileData` (no TensorBoard needed) and prints the ops XLA:CPU ran,
heaviest first: total ms, share of the traced op time, calls, and ms per decode step.
Run once compiled, so the trace holds execution only:

    python examples/profile_decode.py --preset gpt2-124m --batch 1 --new 32 [--dtype bfloat16]
        [--quant int8] [--top 25] [--keep-trace DIR]

The prefill is traced too (it is one call; its ops show up with calls == 1 per layer).
Names are the HLO names of the compiled program: `dot`/`fusion` ops are where the
weights are read; dump the HLO (`XLA_FLAGS=--xla_dump_to=DIR`) to map a name to its
source line. Compare two settings (an XLA flag, a dtype) by running this twice.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ftjax  # noqa: E402
from ftjax import quant as q  # noqa: E402
from ftjax.api import DTYPES, Model  # noqa: E402
from ftjax.config import preset  # noqa: E402
from ftjax.specs import init_params  # noqa: E402


def op_times(trace_dir: str):
    """{op name: [total seconds, calls]} over the host-thread lines of an XLA trace.

    Python / runtime bookkeeping events (names with spaces, `$`-prefixed, or the
    top-level executable launches) are left out: only XLA ops and fusions remain.
    """
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
    totals = collections.defaultdict(lambda: [0.0, 0])
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for ev in line.events:
                name = ev.name
                if (" " in name or "(" in name or "::" in name
                        or name.startswith(("$", "Thunk", "PjRt", "jit_", "pjit"))):
                    continue
                totals[name][0] += ev.duration_ns * 1e-9
                totals[name][1] += 1
    return totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--quant", choices=["int8", "int8-g128"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--new", type=int, default=32, help="tokens generated (decode steps + 1)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--keep-trace", metavar="DIR", help="keep the trace (TensorBoard/Perfetto)")
    args = p.parse_args(argv)

    cfg = preset(args.preset)
    params = init_params(cfg, seed=0, dtype=DTYPES[args.dtype])
    if args.quant:
        params = q.quantize_params(cfg, jax.tree_util.tree_map(jnp.asarray, params),
                                   128 if args.quant == "int8-g128" else 0)
    model = Model(cfg, params, args.dtype, path=f"preset:{args.preset}")
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                (args.batch, args.input_len)).tolist()
    sp = ftjax.SamplingParams(temperature=0.0, stop_token_ids=[])
    model.generate(prompts, max_new_tokens=args.new, sampling=sp)  # compile
    trace_dir = args.keep_trace or tempfile.mkdtemp(prefix="ftjax-profile-")
    with jax.profiler.trace(trace_dir):
        model.generate(prompts, max_new_tokens=args.new, sampling=sp)
    totals = op_times(trace_dir)
    if not totals:
        print(f"no XLA op events found in the trace under {trace_dir}", file=sys.stderr)
        return 1
    all_s = sum(t for t, _ in totals.values())
    steps = max(args.new - 1, 1)
    print(f"{args.preset} {args.dtype}{' ' + args.quant if args.quant else ''}, batch "
          f"{args.batch}, in {args.input_len}, {args.new} new; jax {jax.__version__}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'}")
    print(f"traced op time {all_s * 1e3:.1f} ms over {len(totals)} distinct ops")
    print(f"{'op':<48} {'total ms':>9} {'share':>6} {'calls':>6} {'ms/step':>8}")
    for name, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{name[:48]:<48} {t * 1e3:>9.2f} {100 * t / all_s:>5.1f}% {n:>6} "
              f"{t * 1e3 / steps:>8.3f}")
    kinds = collections.defaultdict(float)
    for name, (t, n) in totals.items():
        kinds[(name.rsplit(".", 1)[0], "decode" if n > 1 else "prefill")] += t
    print("\nby kind (ops called more than once are the decode loop's; once: the prefill):")
    for (kind, phase), t in sorted(kinds.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {kind:<30} {phase:<8} {t * 1e3:>9.2f} ms {100 * t / all_s:>5.1f}%")
    if args.keep_trace:
        print(f"trace kept in {trace_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
