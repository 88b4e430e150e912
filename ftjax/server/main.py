"""`ftjax serve`: load the model, start the engine thread, run uvicorn."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("ftjax.server")


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes (ValueError naming the value)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    s = text.strip().lower()
    num = s.rstrip("kmgtib")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or not value > 0:
        raise ValueError(f"--kv-memory must be a size such as 2GiB, 512MiB or 1e9, got {text!r}")
    return int(value * units[unit])


def build(args):
    """(app, runner) for parsed `ftjax serve` arguments; the model is loaded here (so a
    bad --model fails at once), the engine is built and compiled on its thread."""
    import ftjax
    from ftjax.server.app import Server, create_app
    from ftjax.server.metrics import Metrics
    from ftjax.server.runner import EngineRunner
    from ftjax.sharding import mesh_for

    template = None
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                template = f.read()
        except OSError as e:
            raise ValueError(f"--chat-template {args.chat_template}: {e.strerror}") from None
    kv_memory = parse_bytes(args.kv_memory) if args.kv_memory else None
    path = args.model or ftjax.demo_model_path()
    mesh = mesh_for(tensor=args.tp, data=args.dp, pipe=getattr(args, "pp", 1))
    model = ftjax.load(path, dtype=args.dtype, mesh=mesh, quant=args.quant,
                       kv_cache_dtype=args.kv_cache_dtype)
    name = args.served_model_name or (args.model.rstrip("/") if args.model else "ftjax-demo")

    def make_engine():
        engine = ftjax.LLMEngine(model, max_slots=args.max_slots, page_size=args.page_size,
                                 num_pages=args.num_pages, kv_memory=kv_memory,
                                 chunk=args.chunk, prefill_budget=args.prefill_budget)
        engine.warmup()
        log.info("ftjax serve: engine ready (%d slots, %d pages of %d tokens)",
                 engine.max_slots, engine.num_pages, engine.page_size)
        return engine

    holder = {}
    metrics = Metrics(lambda: holder["runner"].stats())
    runner = holder["runner"] = EngineRunner(make_engine, observer=metrics)
    server = Server(model, runner, metrics, name, api_key=args.api_key or
                    os.environ.get("FTJAX_API_KEY"), max_waiting=args.max_waiting,
                    chat_template=template)
    return create_app(server), runner


def serve(args) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app, runner = build(args)
    runner.start()
    print(f"ftjax serve: http://{args.host}:{args.port} (GET /health is 200 once the model "
          "is compiled)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        runner.stop()
    return 0
