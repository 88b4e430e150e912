"""The accuracy / size / speed table of every quantization mode on one model.

    python examples/quant_report.py [--model DIR] [--text FILE...] [--calibration FILE...] [--no-speed]

Defaults: the bundled demo model (trained on Python 3.11 stdlib sources), scored on
examples/data/heldout.py.txt (numpy 2.4.6 sources it never saw: _core/shape_base.py,
lib/_twodim_base_impl.py, linalg/_linalg.py, concatenated), W8A8 calibrated on
examples/data/calibration.py.txt (stdlib textwrap.py: the training distribution).

Per mode: perplexity and next-token accuracy (windows of max_positions tokens,
stride half of that), parameter bytes (and / bf16 bytes of the float model),
teacher-forced tokens/s, greedy decode tokens/s at batch 1, and greedy agreement
with float32: 16 prompts of 32 held-out tokens, 32 new tokens each, the share of
positions where the token equals float32's (and the mean length of the identical
prefix). Bars (issue 7) are checked and printed.
"""

import argparse
import os
import time

import numpy as np

import ftjax
from ftjax.evaluate import evaluate_texts
from ftjax.specs import n_params
from ftjax.tokenizer import encode_long

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
N_PROMPTS, PROMPT_LEN, NEW = 16, 32, 32
# mode -> (ftjax.load kwargs, perplexity bar: max relative increase over float32)
MODES = {
    "float32": ({}, None),
    "int8": ({"quant": "int8"}, 0.01),
    "int8-g128": ({"quant": "int8-g128"}, 0.005),
    "w8a8 per-token": ({"quant": "w8a8"}, 0.03),
    "w8a8 per-tensor": ({"quant": "w8a8", "w8a8_activations": "per_tensor"}, 0.03),
    "kv int8": ({"kv_cache_dtype": "int8"}, 0.01),
    "int8 + kv int8": ({"quant": "int8", "kv_cache_dtype": "int8"}, None),
}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def decode_speed(model, prompts, repeats=5):
    """Greedy tokens/s at batch 1, 32 new tokens (prefill included), best of `repeats`."""
    sp = ftjax.SamplingParams(stop_token_ids=[])
    model.generate(prompts[:1], max_new_tokens=NEW, sampling=sp)  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(prompts[:1], max_new_tokens=NEW, sampling=sp)
        best = min(best, time.perf_counter() - t0)
    return NEW / best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=ftjax.demo_model_path())
    p.add_argument("--text", nargs="+", default=[os.path.join(DATA, "heldout.py.txt")])
    p.add_argument("--calibration", nargs="+",
                   default=[os.path.join(DATA, "calibration.py.txt")])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--no-speed", action="store_true",
                   help="skip the decode timing (a shared machine's timings are noise; the "
                   "accuracy columns do not depend on load)")
    args = p.parse_args()

    calibration = [read(c) for c in args.calibration]
    base = ftjax.load(args.model)
    texts = [encode_long(base.tokenizer, read(t)) for t in args.text]
    width = base.config.max_positions
    stream = texts[0]
    step = (len(stream) - PROMPT_LEN) // N_PROMPTS
    prompts = [stream[i * step:i * step + PROMPT_LEN] for i in range(N_PROMPTS)]
    bf16_bytes = n_params(base.config) * 2

    print(f"model {args.model}: {n_params(base.config):,} params; bf16 bytes {bf16_bytes:,}")
    print(f"texts {args.text}: {sum(map(len, texts)):,} tokens, windows {width}, "
          f"stride {width // 2}")
    print(f"{'mode':<17}{'ppl':>9}{'d ppl':>8}{'acc':>8}{'bytes':>12}{'/bf16':>7}"
          f"{'eval tok/s':>11}{'dec tok/s':>10}{'agree':>7}{'prefix':>7}  bar")
    ref_ppl = ref_tokens = None
    failed = []
    for name in args.modes:
        kwargs, bar = MODES[name]
        if kwargs.get("quant") == "w8a8":
            kwargs = dict(kwargs, calibration=calibration)
        model = ftjax.load(args.model, **kwargs)
        s = evaluate_texts(model.forward, texts, width)
        out = model.generate(prompts, max_new_tokens=NEW,
                             sampling=ftjax.SamplingParams(stop_token_ids=[]))
        toks = np.asarray(out.tokens)
        if ref_ppl is None:
            ref_ppl, ref_tokens = s.perplexity, toks
        same = toks == ref_tokens
        prefix = np.mean([np.argmin(np.append(r, False)) for r in same])
        rel = s.perplexity / ref_ppl - 1
        speed = "-" if args.no_speed else f"{decode_speed(model, prompts):.1f}"
        verdict = ""
        if bar is not None:
            ok = rel <= bar and same.mean() >= 0.9
            verdict = f"{'PASS' if ok else 'FAIL'} (ppl <= +{bar:.1%}, agree >= 90%)"
            if not ok:
                failed.append(name)
        if kwargs.get("quant") == "int8":
            verdict += f" bytes {'<=' if model.param_bytes <= 0.55 * bf16_bytes else '>'} 0.55"
        print(f"{name:<17}{s.perplexity:>9.3f}{rel:>+8.2%}{s.accuracy:>8.4f}"
              f"{model.param_bytes:>12,}{model.param_bytes / bf16_bytes:>7.3f}"
              f"{s.tokens_per_second:>11.0f}{speed:>10}"
              f"{same.mean():>7.1%}{prefix:>7.1f}  {verdict}", flush=True)
    print("all bars met" if not failed else f"bars missed: {failed}")


if __name__ == "__main__":
    main()
