"""The `ftjax` command: generate, serve, convert, bench, plan, eval, lm-eval."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import List, Optional


# SamplingParams fields `generate` takes from the flags, else from the model's decoding
# defaults (ftjax.generation_config: its generation_config.json, else ftjax's fallback).
_DECODING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                   "no_repeat_ngram_size")
DEFAULT_MAX_NEW_TOKENS = 64


def _generate(args) -> int:
    from ftjax.assets import demo_model_path
    from ftjax.generation_config import decoding_defaults

    prompts = list(args.prompt)
    if not prompts:
        if sys.stdin.isatty():
            print("ftjax generate: give a PROMPT (or pipe one on stdin)", file=sys.stderr)
            return 2
        prompts = [sys.stdin.read()]
    path = args.model or demo_model_path()
    defaults, _ = decoding_defaults(path)
    options = {k: defaults[k] if getattr(args, k) is None else getattr(args, k)
               for k in _DECODING_FLAGS}
    max_new = (args.max_new_tokens if args.max_new_tokens is not None
               else defaults.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    if len(prompts) == 1:  # show the prompt at once; the continuation follows the load
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    # Start-up creates ~1M objects that live as long as the process (jax, transformers,
    # traces): the cyclic GC would rescan them several times (~0.4 s) before the first
    # token. Off until then.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _run_generate(args, path, prompts, options, max_new,
                             gc.enable if enabled else lambda: None)
    finally:
        if enabled:
            gc.enable()


def _run_generate(args, path: str, prompts: List[str], options: dict, max_new: int,
                  resume_gc) -> int:
    _enable_compilation_cache()
    import ftjax

    model = ftjax.load(path, dtype=args.dtype, mesh=mesh_from_args(args))
    sampling = ftjax.SamplingParams(**options, stop_strings=args.stop or None, seed=args.seed)
    if model.tokenizer is None:
        print(f"ftjax generate: {model.path} has no tokenizer; use the Python API with "
              "token ids", file=sys.stderr)
        return 2
    if len(prompts) == 1:
        for ev in model.stream(prompts, max_new_tokens=max_new, sampling=sampling):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            resume_gc()
        sys.stdout.write("\n")
        return 0
    resume_gc()
    out = model.generate(prompts, max_new_tokens=max_new, sampling=sampling)
    for i, (prompt, text) in enumerate(zip(prompts, out.texts)):
        print(f"=== [{i}] ({len(out.tokens[i])} tokens, {out.finish_reasons[i]})")
        print(prompt + text)
    return 0


def _enable_compilation_cache() -> None:
    """jax's persistent compilation cache for the command line: a second `ftjax generate`
    reuses the compiled prefill/decode instead of compiling them again.

    $FTJAX_CACHE_DIR (empty: off), else $XDG_CACHE_HOME/ftjax/jax or ~/.cache/ftjax/jax;
    left alone when jax's own JAX_COMPILATION_CACHE_DIR is set."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    directory = os.environ.get("FTJAX_CACHE_DIR")
    if directory is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        directory = os.path.join(base, "ftjax", "jax")
    if not directory:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program, however quick to compile: a cache read (~1-20 ms) beats a compile
    # (the serving engine's token window compiles in 0.2-0.4 s, under jax's 1 s default).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# Megatron-LM values that a checkpoint without saved args needs (`megatron_args`).
MEGATRON_FLAGS = ("num_layers", "hidden_size", "num_attention_heads",
                  "max_position_embeddings", "ffn_hidden_size", "vocab_size")


def _convert(args) -> int:
    import jax
    import numpy as np

    from converters import load_checkpoint, save_native, save_orbax, tokenizer_files
    from converters.checks import check_finite
    from converters.fastertransformer import save_fastertransformer
    from converters.staging import check_destination, staged_dir
    from ftjax.api import DTYPES
    from ftjax.evaluate import read_text
    from ftjax.specs import n_params

    try:
        check_destination(args.src, args.dst, args.force)
    except ValueError as e:
        print(f"ftjax convert: {e}", file=sys.stderr)
        return 2
    if args.tp != 1 and args.to != "ft":
        print("ftjax convert: --tp applies to --to ft only", file=sys.stderr)
        return 2
    if args.quant and args.to != "native":
        print("ftjax convert: --quant writes int8 weights in the native format: add --to native",
              file=sys.stderr)
        return 2
    from ftjax.progress import bar

    megatron = {k: getattr(args, k) for k in MEGATRON_FLAGS if getattr(args, k) is not None}
    progress = bar(total=2, desc="ftjax convert: read, write", unit="step")
    if args.quant:
        import ftjax

        calibration = [read_text(p, "--calibration") for p in args.calibration or ()] or None
        model = ftjax.load(args.src, dtype=args.dtype, quant=args.quant, calibration=calibration,
                           megatron_args=megatron or None,
                           check_finite=not args.no_check_finite)
        cfg, params = model.config, jax.device_get(model.params)
    else:
        cfg, params = load_checkpoint(args.src, megatron_args=megatron or None)
        if not args.no_check_finite:
            check_finite(params, args.src)
        target = np.dtype(DTYPES[args.dtype])
        params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(target), params)
        if not args.no_check_finite and target != np.float32:
            check_finite(params, f"{args.src} cast to {args.dtype} (values out of its range)")
    progress.update(1)
    # Written beside DST and renamed into place at the end: a killed convert leaves DST
    # as it was, and --force replaces it whole.
    with tokenizer_files(args.src) as source, staged_dir(args.dst, args.force) as out:
        if args.to == "ft":
            save_fastertransformer(out, cfg, params, tp=args.tp, dtype=args.dtype,
                                   source=source)
        else:
            save = save_orbax if args.to == "orbax" else save_native
            save(out, cfg, params, args.dtype, source=source)
    progress.update(1)
    progress.close()
    n_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.dst} ({args.to}): {n_params(cfg) / 1e6:.1f}M params, {args.dtype}"
          f"{', ' + args.quant if args.quant else ''}, {n_bytes / 2**20:.1f} MiB")
    return 0


def mesh_from_args(args):
    """The mesh --tp / --dp / --pp ask for, or None for one device."""
    from ftjax.sharding import mesh_for

    return mesh_for(tensor=args.tp, data=args.dp, pipe=args.pp)


def _plan(args) -> int:
    from ftjax.api import DTYPES
    from ftjax.config import preset
    from ftjax.plan import format_plan, plan_memory

    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    from ftjax.pipeline import check_layers

    cfg = preset(args.preset)
    check_layers(cfg.n_layers, args.pp)   # each stage holds whole layers
    max_len = min(args.max_len or cfg.max_positions, cfg.max_positions)
    p = plan_memory(cfg, tensor=args.tp, pipe=args.pp, data=args.dp, batch=args.batch,
                    max_len=max_len, dtype=DTYPES[args.dtype], compile=not args.no_compile)
    print(format_plan(args.preset, cfg, p, args.tp, args.pp, args.dp, args.batch, max_len,
                      args.dtype))
    return 0


def _bench(args) -> int:
    from ftjax.bench import run_bench

    return run_bench(args)


def _eval(args) -> int:
    from ftjax.evaluate import run_eval

    return run_eval(args)


def _ints(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return values


def _int_at_least(low: int):
    """An argparse type: an int >= low (the message names the limit)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


_positive, _non_negative = _int_at_least(1), _int_at_least(0)
DTYPE_NAMES = ["float32", "bfloat16", "float16"]  # ftjax.api.DTYPES, without importing jax


def _mesh_args(p) -> None:
    p.add_argument("--tp", type=_positive, default=1,
                   help="tensor-parallel size: devices per model copy (default: 1; virtual CPU "
                        "devices are made when there is no accelerator)")
    p.add_argument("--dp", type=_positive, default=1,
                   help="data-parallel size: batch shards (default: 1)")
    p.add_argument("--pp", type=_positive, default=1,
                   help="pipeline size: stages of whole layers, each on its own devices "
                        "(must divide the layers; default: 1)")


def _dtype_arg(p, default: str, what: str) -> None:
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=default,
                   help=f"{what} (default: {default})")


def _describe_decoding(values: dict) -> str:
    if values["temperature"] == 0:
        return "greedy"
    parts = [f"temperature {values['temperature']:g}"]
    for key, name, off in (("top_k", "top-k", 0), ("top_p", "top-p", 1.0),
                           ("min_p", "min-p", 0.0),
                           ("repetition_penalty", "repetition penalty", 1.0),
                           ("no_repeat_ngram_size", "no-repeat n-gram", 0)):
        if values[key] != off:
            parts.append(f"{name} {values[key]:g}")
    return ", ".join(parts)


def _generate_epilog() -> str:
    from ftjax.assets import demo_model_path
    from ftjax.generation_config import FALLBACK, decoding_defaults

    try:
        demo_text = _describe_decoding(decoding_defaults(demo_model_path())[0])
    except Exception:  # a broken install still gets its --help
        demo_text = "(unreadable)"
    return ("Default decoding: the model's generation_config.json, read as HF generate() "
            "reads it (do_sample, temperature, top_k [HF default 50], top_p, min_p, "
            "repetition_penalty, no_repeat_ngram_size, max_new_tokens); the bundled model's "
            f"is: {demo_text}. A model without one is sampled with "
            f"{_describe_decoding(FALLBACK)} (greedy decoding of small models repeats one "
            "phrase). Each flag overrides the field it names; --temperature 0 is greedy. "
            "Without --seed every run samples anew.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftjax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue prompts (streams tokens to stdout)",
                       description="Continue prompts with a model (default: the bundled one).",
                       epilog=_generate_epilog())
    g.add_argument("prompt", nargs="*", help="prompt text(s); stdin when none")
    g.add_argument("--model", help="checkpoint directory (default: the bundled demo model)")
    g.add_argument("--max-new-tokens", type=_non_negative, default=None, metavar="N",
                   help="tokens to generate per prompt at most (default: the model's "
                        f"generation_config.json max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--temperature", type=_finite_float, default=None, metavar="T",
                   help="sampling temperature; 0 = greedy (default: see below)")
    g.add_argument("--top-k", type=_non_negative, default=None, metavar="K",
                   help="sample from the K most likely tokens; 0 = all (default: see below)")
    g.add_argument("--top-p", type=_finite_float, default=None, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= P, "
                        "in (0, 1]; 1 = off (default: see below)")
    g.add_argument("--min-p", type=_finite_float, default=None, metavar="P",
                   help="drop tokens less likely than P x the most likely one; 0 = off "
                        "(default: see below)")
    g.add_argument("--repetition-penalty", type=_finite_float, default=None, metavar="R",
                   help="HF repetition penalty on tokens already in prompt or output; 1 = off "
                        "(default: see below)")
    g.add_argument("--no-repeat-ngram-size", type=_non_negative, default=None, metavar="N",
                   help="never repeat an N-gram (prompt included); 0 = off "
                        "(default: see below)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable)")
    g.add_argument("--seed", type=_non_negative, default=None,
                   help="sampling seed: the same seed gives the same text (default: random)")
    _dtype_arg(g, "float32", "weights and activations dtype")
    _mesh_args(g)
    g.set_defaults(func=_generate)

    _serve_parser(sub)

    c = sub.add_parser("convert", help="write an ftjax checkpoint that loads fast")
    c.add_argument("src", help="HuggingFace, Megatron-LM, NeMo (.nemo), FasterTransformer or "
                   "ftjax checkpoint")
    c.add_argument("dst", help="output directory")
    _dtype_arg(c, "float32", "dtype the float weights are stored in")
    c.add_argument("--to", choices=["orbax", "native", "ft"], default="orbax",
                   help="orbax: tensorstore checkpoint restored shard by shard onto a mesh "
                        "(default); native: one memory-mapped safetensors file; ft: a "
                        "FasterTransformer c-model directory")
    c.add_argument("--force", action="store_true", help="replace a non-empty dst whole")
    c.add_argument("--no-check-finite", action="store_true",
                   help="skip the check that every weight is finite (NaN / Inf refused)")
    c.add_argument("--tp", type=_positive, default=1,
                   help="with --to ft: tensor-parallel ranks to split into (default: 1)")
    for flag in MEGATRON_FLAGS:  # only for Megatron-LM checkpoints saved without args
        c.add_argument("--" + flag.replace("_", "-"), type=_positive, dest=flag, metavar="N",
                       help=f"Megatron-LM {flag} for a checkpoint saved without args")
    c.add_argument("--quant", choices=["int8", "int8-g128", "w8a8"],
                   help="store quantized weights (with --to native; see ftjax.load's quant)")
    c.add_argument("--calibration", nargs="+", metavar="FILE",
                   help="w8a8: text files to calibrate activation scales on")
    c.set_defaults(func=_convert)

    b = sub.add_parser("bench", help="latency / throughput table, FasterTransformer style")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory")
    src.add_argument("--preset", help="random weights of a named shape: gpt2-124m (default), "
                     "gpt2-350m, gpt2-774m, gpt2-1.5b, gpt3-175b")
    b.add_argument("--batch", type=_ints, default=[1, 8], metavar="B[,B...]",
                   help="comma-separated batch sizes, one table row each (default: 1,8)")
    b.add_argument("--input-len", type=_positive, default=128, metavar="N",
                   help="prompt tokens per row (default: 128)")
    b.add_argument("--output-len", type=_positive, default=32, metavar="N",
                   help="generated tokens per row (default: 32)")
    _dtype_arg(b, "float32", "weights and activations dtype")
    b.add_argument("--repeats", type=_positive, default=3, metavar="N",
                   help="timed runs per measurement; the median is reported (default: 3)")
    b.add_argument("--quant", choices=["int8", "int8-g128"],
                   help="int8 weight-only, quantized at load (see ftjax.load's quant)")
    b.add_argument("--kv-cache-dtype", choices=["int8"], help="quantize the KV cache")
    b.add_argument("--compare", choices=["hf"],
                   help="also time HuggingFace generate() on the same (float) weights, "
                   "in a separate process")
    b.add_argument("--json", metavar="FILE", help="also write every number to FILE as JSON")
    _mesh_args(b)
    b.set_defaults(func=_bench)

    pl = sub.add_parser("plan", help="per-device memory of a sharded model (nothing allocated)")
    pl.add_argument("--preset", required=True, help="a named model shape, e.g. gpt3-175b")
    pl.add_argument("--tp", type=_positive, default=1, help="tensor-parallel size")
    pl.add_argument("--pp", type=_positive, default=1,
                    help="pipeline size (shards the layers axis)")
    pl.add_argument("--dp", type=_positive, default=1, help="data-parallel size")
    pl.add_argument("--batch", type=_positive, default=1, help="sequences in flight (default: 1)")
    pl.add_argument("--max-len", type=_positive, default=None,
                    help="KV cache length per sequence (default: the model's positions)")
    _dtype_arg(pl, "float16", "weights, activations and KV cache dtype")
    pl.add_argument("--no-compile", action="store_true",
                    help="skip XLA's compiled memory analysis (shape arithmetic only)")
    pl.set_defaults(func=_plan)

    e = sub.add_parser("eval", help="perplexity / next-token accuracy (and LAMBADA) of a model")
    e.add_argument("--model", help="checkpoint directory (default: the bundled demo model)")
    e.add_argument("--text", nargs="+", required=True, metavar="FILE", help="text files to score")
    e.add_argument("--quant", choices=["int8", "int8-g128", "w8a8"], help="quantize at load")
    e.add_argument("--calibration", nargs="+", metavar="FILE",
                   help="w8a8: text files to calibrate activation scales on")
    e.add_argument("--smoothquant-alpha", type=_finite_float, default=0.5, metavar="A",
                   help="w8a8: SmoothQuant migration strength in [0, 1] (default: 0.5)")
    e.add_argument("--kv-cache-dtype", choices=["int8"], help="quantize the KV cache")
    e.add_argument("--compare", choices=["hf"],
                   help="also score with HuggingFace transformers on the same float weights")
    e.add_argument("--lambada", metavar="FILE.jsonl",
                   help="LAMBADA-format jsonl ({\"text\": ...} per line): last-word accuracy")
    _dtype_arg(e, "float32", "weights and activations dtype")
    e.add_argument("--window", type=_int_at_least(2),
                   help="tokens per window (default: max_positions)")
    e.add_argument("--stride", type=_positive, help="window stride (default: window // 2)")
    e.add_argument("--max-tokens", type=_int_at_least(2),
                   help="score only the first N tokens of each text")
    e.set_defaults(func=_eval)

    # Parsed by lm-eval itself (main() hands it every argument after "lm-eval").
    sub.add_parser("lm-eval", add_help=False,
                   help="EleutherAI lm-evaluation-harness on ftjax: lm-eval's own arguments "
                        "(--model_args pretrained=DIR,quant=int8 --tasks T [--include_path D]); "
                        "needs the eval extra")
    return p


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra)",
                       description="Serve a model over the OpenAI API (/v1/completions, "
                       "/v1/chat/completions, /v1/models) plus /health, /metrics, /tokenize "
                       "and /detokenize, on ftjax.LLMEngine (in-flight batching, paged KV "
                       "cache, prefix caching).")
    s.add_argument("--model", help="checkpoint directory (default: the bundled demo model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    s.add_argument("--port", type=_int_at_least(0), default=8000, help="port (default: 8000)")
    s.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send (default: --model as given, or "
                        "ftjax-demo for the bundled model)")
    s.add_argument("--max-slots", type=_positive, default=16, metavar="N",
                   help="sequences decoded at once (default: 16)")
    s.add_argument("--page-size", type=_positive, default=16, metavar="N",
                   help="tokens per KV cache page (default: 16)")
    pool = s.add_mutually_exclusive_group()
    pool.add_argument("--num-pages", type=_int_at_least(2), metavar="N",
                      help="KV cache pages (default: every slot at the model's full length)")
    pool.add_argument("--kv-memory", metavar="SIZE",
                      help="KV cache size to fill with pages, e.g. 2GiB")
    s.add_argument("--max-waiting", type=_non_negative, default=256, metavar="N",
                   help="requests allowed to wait for a slot; past it: 503 + Retry-After "
                        "(default: 256)")
    s.add_argument("--chunk", type=_positive, default=8, metavar="N",
                   help="decode steps per engine step (default: 8)")
    s.add_argument("--prefill-budget", type=_positive, default=256, metavar="N",
                   help="prompt tokens computed per engine step (default: 256)")
    _dtype_arg(s, "float32", "weights and activations dtype")
    s.add_argument("--quant", choices=["int8", "int8-g128"],
                   help="weight-only int8 quantization at load")
    s.add_argument("--kv-cache-dtype", choices=["int8"], help="quantize the KV cache")
    _mesh_args(s)
    s.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: "
                        "$FTJAX_API_KEY, else none)")
    s.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template (overrides the tokenizer's)")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: info)")
    s.set_defaults(func=_serve)


def _serve(args) -> int:
    try:
        import fastapi  # noqa: F401  (the extra's packages, checked before jax loads)
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"ftjax serve: needs the serve extra: pip install 'ftjax[serve]' ({e})",
              file=sys.stderr)
        return 2
    _enable_compilation_cache()
    from ftjax.server.main import serve

    return serve(args)


def _lm_eval(argv: List[str]) -> int:
    # tp / dp in --model_args: virtual CPU devices, made before jax starts its backend.
    # (lm-eval takes "a=1,b=2" or "a=1 b=2" after --model_args / -a.)
    kv, in_args = {}, False
    for a in argv:
        in_args = a in ("--model_args", "-a") or (in_args and not a.startswith("-"))
        if in_args:
            kv.update(x.split("=", 1) for x in a.split(",") if "=" in x)
    n_devices = int(kv.get("tp", 1)) * int(kv.get("dp", 1))
    if n_devices > 1:
        from ftjax.sharding import use_cpu_devices

        use_cpu_devices(n_devices)
    try:
        from ftjax.lm_eval import run_cli
    except ImportError as e:
        print(f"ftjax lm-eval: needs lm-evaluation-harness: pip install 'ftjax[eval]' ({e})",
              file=sys.stderr)
        return 2
    return run_cli(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:
        try:
            return _lm_eval(argv[1:])
        except ValueError as e:
            print(f"ftjax lm-eval: error: {e}", file=sys.stderr)
            return 1
    args = build_parser().parse_args(argv)
    n_devices = getattr(args, "tp", 1) * getattr(args, "dp", 1) * getattr(args, "pp", 1)
    if n_devices > 1:
        from ftjax.sharding import use_cpu_devices

        use_cpu_devices(n_devices)
    from ftjax.errors import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, ValueError) as e:
        print(f"ftjax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
