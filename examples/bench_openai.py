"""Load test of an OpenAI-compatible server (`ftjax serve`): Poisson arrivals, streaming
clients, vLLM benchmark_serving's table (throughput, TTFT, inter-token latency).

    ftjax serve --max-slots 8 &                     # another shell
    python examples/bench_openai.py --url http://127.0.0.1:8000 --requests 64 --rate 4
    python examples/bench_openai.py --url ... --concurrency 1      # one at a time
    python examples/bench_openai.py --url ... --requests 500 --hangup 0.2 --pid PID  # soak

Loopback only (refuses other hosts), bounded by --requests and --timeout. Prompts are
random words of the bundled model's vocabulary; --hangup F makes a fraction F of the
clients close their stream after a few tokens. With --pid, the server's RSS is read
from /proc before and after. Needs `openai` (the test extra).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import urllib.parse

import httpx
import openai

WORDS = ("the of and to in is for on with as by this that from def return class import "
         "value data list print self result if else while true false none file name path "
         "time number string error user model system test example function").split()


def rss_mib(pid):
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def pct(xs, q):
    xs = sorted(x for x in xs if x == x)   # a request that streamed no text has no TTFT
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one(client, model, prompt, max_tokens, hangup, out):
    start = time.perf_counter()
    times = []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0.7, stream=True, extra_body={
                                                 "ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if hangup and len(times) >= 2:
            await stream.close()
            out["hung_up"] += 1
            return
    out["ttft"].append(times[0] - start if times else float("nan"))
    out["itl"] += [(b - a) for a, b in zip(times, times[1:])]
    if len(times) > 1:  # vLLM's TPOT: time per output token after the first
        out["tpot"].append((times[-1] - times[0]) / (max_tokens - 1))
    out["tokens"] += max_tokens
    out["done"] += 1


async def main(args):
    host = urllib.parse.urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--url must be a loopback address, got {host}")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = httpx.get(args.url + "/v1/models", headers=headers).json()["data"][0]["id"]
    client = openai.AsyncOpenAI(base_url=args.url + "/v1", api_key=args.api_key or "none",
                                max_retries=5, timeout=args.timeout)
    rng = random.Random(args.seed)
    reqs = [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(args.prompt_min,
                                                                    args.prompt_max))),
             rng.randint(args.out_min, args.out_max), rng.random() < args.hangup)
            for _ in range(args.requests)]
    out = dict(ttft=[], itl=[], tpot=[], tokens=0, done=0, hung_up=0)
    # Warm-up (compiles nothing on the server: it compiled at start; warms the client).
    await one(client, model, "hello", 4, False, dict(out, ttft=[], itl=[], tpot=[]))
    rss0 = rss_mib(args.pid)
    sem = asyncio.Semaphore(args.concurrency or len(reqs))

    async def limited(r):
        async with sem:
            await one(client, model, *r, out)

    t0 = time.perf_counter()
    tasks = []
    for r in reqs:
        tasks.append(asyncio.create_task(limited(r)))
        if args.rate:
            await asyncio.sleep(rng.expovariate(args.rate))
    await asyncio.wait_for(asyncio.gather(*tasks), args.timeout)
    wall = time.perf_counter() - t0
    await client.close()
    m = {}
    for line in httpx.get(args.url + "/metrics").text.splitlines():
        if line.startswith("ftjax_") and "{" not in line:
            k, v = line.rsplit(" ", 1)
            m[k] = float(v)
    print(f"requests {args.requests} (completed {out['done']}, hung up {out['hung_up']}), "
          f"rate {args.rate or 'inf'}/s, concurrency {args.concurrency or 'unbounded'}")
    # ITL here is the gap between streamed chunks (a decode chunk's tokens arrive
    # together); TPOT spreads a request's decode time over its tokens.
    print("| wall s | req/s | out tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms "
          "| ITL (chunk gap) p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {wall:.1f} | {out['done'] / wall:.2f} | {out['tokens'] / wall:.1f} | "
          f"{pct(out['ttft'], 50):.3f} | {pct(out['ttft'], 99):.3f} | "
          f"{pct(out['tpot'], 50) * 1e3:.1f} | {pct(out['tpot'], 99) * 1e3:.1f} | "
          f"{pct(out['itl'], 50) * 1e3:.1f} | {pct(out['itl'], 99) * 1e3:.1f} |")
    print(f"server after: running {m.get('ftjax_requests_running')}, pages in use "
          f"{m.get('ftjax_kv_pages_in_use')} of {m.get('ftjax_kv_pages_total')}")
    if args.pid:
        print(f"server RSS: {rss0:.0f} MiB after warm-up, {rss_mib(args.pid):.0f} MiB at the end")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000 (loopback only)")
    ap.add_argument("--api-key")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second "
                    "(0: all at once)")
    ap.add_argument("--concurrency", type=int, default=0, help="clients at once (0: unbounded)")
    ap.add_argument("--prompt-min", type=int, default=16, help="prompt words")
    ap.add_argument("--prompt-max", type=int, default=128)
    ap.add_argument("--out-min", type=int, default=16)
    ap.add_argument("--out-max", type=int, default=64)
    ap.add_argument("--hangup", type=float, default=0.0, help="fraction of clients hanging up")
    ap.add_argument("--pid", type=int, help="server pid (RSS before / after)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds, the whole run")
    ap.add_argument("--seed", type=int, default=0)
    asyncio.run(main(ap.parse_args()))
