"""n samples of one prompt share one prefill (FasterTransformer's shared_contexts).

Times `generate` of one prompt with n=8 samples against 8 different prompts of
the same length (8 prefill rows), on a random-weight preset:

    python examples/bench_shared_prefill.py --preset gpt2-124m --prompt-len 256 --new 16
"""

import argparse
import time

import jax
import numpy as np

import ftjax
from ftjax.api import Model
from ftjax.specs import init_params


def timed(fn, repeats):
    fn()  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = ftjax.preset(args.preset)
    model = Model(cfg, init_params(cfg), "float32")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, args.prompt_len).tolist()
    others = [rng.integers(0, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.n)]
    sp = ftjax.SamplingParams(temperature=1.0, seed=0, stop_token_ids=[])
    print(f"{args.preset}, prompt {args.prompt_len} tokens, {args.n} sequences, "
          f"{jax.devices()[0].platform}")
    print(f"{'new tokens':>10}  {'n samples, 1 prompt':>20}  {'n prompts':>10}  {'ratio':>6}")
    for new in (1, args.new):
        shared = timed(lambda: model.generate(
            [prompt], max_new_tokens=new, sampling=ftjax.SamplingParams(
                temperature=1.0, seed=0, stop_token_ids=[], n=args.n)), args.repeats)
        separate = timed(lambda: model.generate(others, max_new_tokens=new, sampling=sp),
                         args.repeats)
        print(f"{new:>10}  {shared * 1e3:>18.0f}ms  {separate * 1e3:>8.0f}ms  "
              f"{separate / shared:>5.1f}x")


if __name__ == "__main__":
    main()
