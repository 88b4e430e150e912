"""Serving benchmark: Poisson arrivals through (a) one request at a time (`Model.stream`),
(b) static batches of 8 (`Model.generate`), (c) `ftjax.LLMEngine` with 8 slots.

Reports throughput (generated tok/s), time to first token and inter-token latency
p50 / p99 per mode, the memory figure (concurrent sequences at equal cache bytes,
paged vs contiguous, measured on the engine with the workload queued at once) and the prefix-caching figure (16
requests sharing a prefix: prompt tokens computed). Random weights, eos ignored, so
every request runs to its budget:

    python examples/bench_serving.py --preset gpt2-124m            # the issue's workload
    python examples/bench_serving.py --tiny --requests 16          # a smoke run

The engines compile every shape first (`warmup()`); static batches run the workload
once untimed (compiles every bucket), then timed. Timings on a
shared or loaded machine are noise: say so beside any number.
"""

import argparse
import dataclasses
import statistics
import time

import numpy as np

import ftjax
from ftjax import SamplingParams
from ftjax.api import Model
from ftjax.specs import init_params


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def workload(args, rng):
    gaps = rng.exponential(1.0 / args.rate, args.requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    prompts = [rng.integers(0, args.vocab, rng.integers(args.prompt_min, args.prompt_max + 1))
               .tolist() for _ in range(args.requests)]
    outs = rng.integers(args.out_min, args.out_max + 1, args.requests).tolist()
    return list(zip(arrivals.tolist(), prompts, outs))


SP = SamplingParams(ignore_eos=True)


def one_at_a_time(model, work):
    t0 = time.perf_counter()
    ttft, itl, tokens, free_at = [], [], 0, 0.0
    for arrival, prompt, new in work:
        now = time.perf_counter() - t0
        if now < arrival:
            time.sleep(arrival - now)
        last = None
        for _ in model.stream([prompt], max_new_tokens=new, sampling=SP):
            t = time.perf_counter() - t0
            if last is None:
                ttft.append(t - arrival)
            else:
                itl.append(t - last)
            last, tokens = t, tokens + 1
        free_at = time.perf_counter() - t0
    return tokens / free_at, ttft, itl


def static_batches(model, work, size=8):
    t0 = time.perf_counter()
    ttft, itl, tokens = [], [], 0
    for i in range(0, len(work), size):
        group = work[i:i + size]
        now = time.perf_counter() - t0
        if now < group[-1][0]:   # a static batch waits for its last member
            time.sleep(group[-1][0] - now)
        start = time.perf_counter() - t0
        out = model.generate([p for _, p, _ in group], max_new_tokens=max(n for *_, n in group),
                             sampling=[SamplingParams(ignore_eos=True, max_new_tokens=n)
                                       for *_, n in group])
        end = time.perf_counter() - t0
        for (arrival, _, _), toks in zip(group, out.tokens):
            ttft.append(end - arrival)          # tokens arrive when the batch ends
            tokens += len(toks)
            itl.append((end - start) / max(len(toks), 1))
    return tokens / (time.perf_counter() - t0), ttft, itl


def engine_mode(eng, work):
    t0 = time.perf_counter()
    pending, first, last, ttft, itl, tokens = list(work), {}, {}, [], [], 0
    arrival_of = {}
    while pending or eng.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0][0] <= now:
            arrival, prompt, new = pending.pop(0)
            rid = eng.add_request(prompt, SP, max_new_tokens=new)
            arrival_of[rid] = arrival
        if not eng.has_unfinished():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        outs = eng.step()
        t = time.perf_counter() - t0
        for o in outs:
            if not o.new_tokens:
                continue
            tokens += len(o.new_tokens)
            if o.request_id not in first:
                first[o.request_id] = t
                ttft.append(t - arrival_of[o.request_id])
            else:   # a chunk delivers several tokens at once: spread the gap over them
                itl += [(t - last[o.request_id]) / len(o.new_tokens)] * len(o.new_tokens)
            last[o.request_id] = t
    return tokens / (time.perf_counter() - t0), ttft, itl


def memory_figure(cfg, work, page_size, rows=8):
    """Concurrent sequences at equal cache bytes, measured: the whole workload queued at
    once on an LLMEngine whose pool has the bytes of `rows` contiguous rows of
    max_positions (what a contiguous cache must reserve per sequence to accept any
    request), slots unbounded; the mean and peak number of running sequences while
    requests wait (the pool, not the slots, is the limit then). Only lengths and the
    allocator matter, so a 2-layer model with the same positions runs it."""
    small = dataclasses.replace(cfg, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                head_dim=16, d_ff=128, vocab_size=512, bos_token_id=0,
                                eos_token_id=None)
    model = Model(small, init_params(small), "float32")
    per_seq = -(-cfg.max_positions // page_size)
    eng = ftjax.LLMEngine(model, max_slots=len(work), page_size=page_size,
                          num_pages=rows * per_seq + 1, chunk=8, prefill_budget=1024,
                          prefill_rows=4, processors=False, max_logprobs=0,
                          prefix_caching=False)
    for _, prompt, new in work:
        eng.add_request([t % 512 for t in prompt], SP, max_new_tokens=new)
    running, peak = [], 0
    while eng.has_unfinished():
        eng.step()
        s = eng.stats()
        peak = max(peak, s["running"])
        if s["waiting"]:
            running.append(s["running"])
    # A workload the pool holds whole never waits: its peak is then the figure.
    return dict(contiguous_rows=rows, paged_mean=statistics.mean(running or [peak]),
                paged_peak=peak, preemptions=eng.stats()["preemptions"], waited=bool(running))


def prefix_figure(eng, rng, vocab, prefix_len=256, count=16):
    """16 requests sharing a prefix, added at once: prompt tokens computed vs total."""
    prefix = rng.integers(0, vocab, prefix_len).tolist()
    before = eng.stats()["prefill_tokens"]
    for _ in range(count):
        eng.add_request(prefix + rng.integers(0, vocab, 16).tolist(), SP, max_new_tokens=4)
    while eng.has_unfinished():
        eng.step()
    return eng.stats()["prefill_tokens"] - before, count * (prefix_len + 16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy config (smoke run)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2.0, help="arrivals per second")
    ap.add_argument("--prompt-min", type=int, default=32)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--out-min", type=int, default=16)
    ap.add_argument("--out-max", type=int, default=128)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--modes", default="abc")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processors", action="store_true",
                    help="compile the engine's logits processors in (the workload uses none)")
    args = ap.parse_args()
    if args.tiny:
        cfg = ftjax.ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                head_dim=16, d_ff=128, max_positions=512, eos_token_id=None)
        args.prompt_max = min(args.prompt_max, 128)
        args.out_max = min(args.out_max, 64)
    else:
        cfg = ftjax.preset(args.preset)
    args.vocab = cfg.vocab_size
    model = Model(cfg, init_params(cfg), "float32")
    rng = np.random.default_rng(args.seed)
    work = workload(args, rng)
    eng = ftjax.LLMEngine(model, max_slots=args.slots, page_size=args.page_size, chunk=8,
                          prefill_budget=256, prefill_rows=4, processors=args.processors,
                          max_logprobs=0)
    eng.warmup()
    modes = {"a": ("(a) one at a time (stream)", lambda: one_at_a_time(model, work)),
             "b": ("(b) static batches of 8 (generate)", lambda: static_batches(model, work)),
             "c": (f"(c) LLMEngine, {args.slots} slots", lambda: engine_mode(eng, work))}
    print(f"{args.requests} requests, Poisson {args.rate}/s, prompts {args.prompt_min}.."
          f"{args.prompt_max}, outputs {args.out_min}..{args.out_max}, {cfg.n_layers} layers "
          f"d_model={cfg.d_model}, float32")
    print("| mode | tok/s | TTFT p50 (s) | TTFT p99 (s) | inter-token p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|---|")
    for key in args.modes:
        name, run = modes[key]
        if key == "a":
            model.serving_engine().warmup()    # stream's engine: compiles every shape
        elif key == "b":
            run()                              # untimed: compiles every shape it meets
        tps, ttft, itl = run()
        print(f"| {name} | {tps:.1f} | {pct(ttft, 50):.2f} | {pct(ttft, 99):.2f} | "
              f"{1e3 * pct(itl, 50):.1f} | {1e3 * pct(itl, 99):.1f} |", flush=True)
    mem = memory_figure(cfg, work, args.page_size)
    print(f"memory at equal cache bytes (8 rows x {cfg.max_positions} positions): contiguous "
          f"{mem['contiguous_rows']} sequences, paged {mem['paged_mean']:.1f} "
          + ("on average while requests waited" if mem["waited"] else
             "(the pool held the whole workload at once)")
          + f" (peak {mem['paged_peak']}, {mem['preemptions']} preemptions)",
          flush=True)
    if cfg.max_positions > 300:
        computed, total = prefix_figure(eng, rng, cfg.vocab_size)
        print(f"prefix caching: 16 requests sharing a 256-token prefix computed {computed} of "
              f"{total} prompt tokens")
    print("engine stats:", eng.stats())


if __name__ == "__main__":
    main()
