"""The `ftjax` command: generate, convert, bench, plan, eval."""

from __future__ import annotations

import argparse
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
        sys.stdout.write("\n")
        return 0
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
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


# Megatron-LM values that a checkpoint without saved args needs (`megatron_args`).
MEGATRON_FLAGS = ("num_layers", "hidden_size", "num_attention_heads",
                  "max_position_embeddings", "ffn_hidden_size", "vocab_size")


def _convert(args) -> int:
    import jax
    import numpy as np

    from converters import load_checkpoint, save_native, save_orbax, tokenizer_dir
    from converters.fastertransformer import save_fastertransformer
    from ftjax.api import DTYPES

    if os.path.exists(args.dst) and os.listdir(args.dst) and not args.force:
        print(f"ftjax convert: {args.dst} exists and is not empty (use --force to overwrite)",
              file=sys.stderr)
        return 2
    if args.tp != 1 and args.to != "ft":
        print("ftjax convert: --tp applies to --to ft only", file=sys.stderr)
        return 2
    if args.quant and args.to != "native":
        print("ftjax convert: --quant writes int8 weights in the native format: add --to native",
              file=sys.stderr)
        return 2
    from ftjax.progress import stages

    megatron = {k: getattr(args, k) for k in MEGATRON_FLAGS if getattr(args, k) is not None}
    first = f"read + {args.quant}" if args.quant else "read"
    with stages(first, "cast", "write", desc="ftjax convert") as step:
        if args.quant:
            import ftjax

            calibration = None
            if args.calibration:
                calibration = []
                for path in args.calibration:
                    with open(path, encoding="utf-8") as f:
                        calibration.append(f.read())
            model = ftjax.load(args.src, dtype=args.dtype, quant=args.quant,
                               calibration=calibration, megatron_args=megatron or None)
            cfg, params = model.config, jax.device_get(model.params)
            step()
        else:
            cfg, params = load_checkpoint(args.src, megatron_args=megatron or None)
            step()
            target = np.dtype(DTYPES[args.dtype])
            params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(target), params)
        step()
        source = tokenizer_dir(args.src)
        if args.to == "ft":
            save_fastertransformer(args.dst, cfg, params, tp=args.tp, dtype=args.dtype,
                                   source=source)
        else:
            save = save_orbax if args.to == "orbax" else save_native
            save(args.dst, cfg, params, args.dtype, source=source)
        step()
    n_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.dst} ({args.to}): {cfg.n_params / 1e6:.1f}M params, {args.dtype}"
          f"{', ' + args.quant if args.quant else ''}, {n_bytes / 2**20:.1f} MiB")
    return 0


def use_devices(n: int) -> None:
    """Makes n virtual CPU devices available (for --tp/--dp on a CPU-only machine).

    Only possible before jax's backends start; a no-op when XLA_FLAGS already asks
    for host devices or when there are enough devices anyway."""
    if n <= 1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return  # before importing jax: one device needs no setup (and --help stays fast)
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already running: make_mesh reports a shortage
        pass


def mesh_from_args(args):
    """The mesh --tp / --dp ask for, or None for one device."""
    if args.tp == 1 and args.dp == 1:
        return None
    import ftjax

    return ftjax.make_mesh(tensor=args.tp, data=args.dp)


def _plan(args) -> int:
    from ftjax.api import DTYPES
    from ftjax.config import preset
    from ftjax.plan import format_plan, plan_memory

    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    cfg = preset(args.preset)
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
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}")


DTYPE_CHOICES = ("float32", "bfloat16", "float16")  # ftjax.api.DTYPES, without importing jax
QUANT_CHOICES = ("int8", "int8-g128", "w8a8")


def _mesh_args(p) -> None:
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size: devices per model copy (default: 1; virtual CPU "
                        "devices are made when there is no accelerator)")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel size: batch shards (default: 1)")


def _dtype_arg(p, default: str, what: str) -> None:
    p.add_argument("--dtype", default=default, choices=DTYPE_CHOICES,
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
        demo, _ = decoding_defaults(demo_model_path())
        demo_text = _describe_decoding(demo)
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
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens to generate per prompt at most (default: the model's "
                        f"generation_config.json max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="sampling temperature; 0 = greedy (default: see below)")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample from the K most likely tokens; 0 = all (default: see below)")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= P, "
                        "in (0, 1]; 1 = off (default: see below)")
    g.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="drop tokens less likely than P x the most likely one; 0 = off "
                        "(default: see below)")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="HF repetition penalty on tokens already in prompt or output; 1 = off "
                        "(default: see below)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help="never repeat an N-gram (prompt included); 0 = off "
                        "(default: see below)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable)")
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed: the same seed gives the same text (default: random)")
    _dtype_arg(g, "float32", "weights and activations dtype")
    _mesh_args(g)
    g.set_defaults(func=_generate)

    c = sub.add_parser("convert", help="write an ftjax checkpoint that loads fast")
    c.add_argument("src", help="HuggingFace, Megatron-LM, NeMo (.nemo), FasterTransformer or "
                   "ftjax checkpoint")
    c.add_argument("dst", help="output directory")
    _dtype_arg(c, "float32", "dtype the float weights are stored in")
    c.add_argument("--to", choices=["orbax", "native", "ft"], default="orbax",
                   help="orbax: tensorstore checkpoint restored shard by shard onto a mesh "
                        "(default); native: one memory-mapped safetensors file; ft: a "
                        "FasterTransformer c-model directory")
    c.add_argument("--force", action="store_true", help="overwrite a non-empty dst")
    c.add_argument("--tp", type=int, default=1,
                   help="with --to ft: tensor-parallel ranks to split into (default: 1)")
    for flag in MEGATRON_FLAGS:  # only for Megatron-LM checkpoints saved without args
        c.add_argument("--" + flag.replace("_", "-"), type=int, dest=flag, metavar="N",
                       help=f"Megatron-LM {flag} for a checkpoint saved without args")
    c.add_argument("--quant", choices=QUANT_CHOICES,
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
    b.add_argument("--input-len", type=int, default=128, metavar="N",
                   help="prompt tokens per row (default: 128)")
    b.add_argument("--output-len", type=int, default=32, metavar="N",
                   help="generated tokens per row (default: 32)")
    _dtype_arg(b, "float32", "weights and activations dtype")
    b.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="timed runs per measurement; the median is reported (default: 3)")
    b.add_argument("--compare", choices=["hf"],
                   help="also time HuggingFace generate() on the same weights")
    _mesh_args(b)
    b.set_defaults(func=_bench)

    pl = sub.add_parser("plan", help="per-device memory of a sharded model (nothing allocated)")
    pl.add_argument("--preset", required=True, help="a named model shape, e.g. gpt3-175b")
    pl.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: 1)")
    pl.add_argument("--pp", type=int, default=1,
                    help="pipeline size: shards the layers axis (default: 1)")
    pl.add_argument("--dp", type=int, default=1, help="data-parallel size (default: 1)")
    pl.add_argument("--batch", type=int, default=1, help="sequences in flight (default: 1)")
    pl.add_argument("--max-len", type=int, default=None,
                    help="KV cache length per sequence (default: the model's positions)")
    _dtype_arg(pl, "float16", "weights, activations and KV cache dtype")
    pl.add_argument("--no-compile", action="store_true",
                    help="skip XLA's compiled memory analysis (shape arithmetic only)")
    pl.set_defaults(func=_plan)

    e = sub.add_parser("eval", help="perplexity / next-token accuracy (and LAMBADA) of a model")
    e.add_argument("--model", help="checkpoint directory (default: the bundled demo model)")
    e.add_argument("--text", nargs="+", required=True, metavar="FILE", help="text files to score")
    e.add_argument("--quant", choices=QUANT_CHOICES, help="quantize at load")
    e.add_argument("--calibration", nargs="+", metavar="FILE",
                   help="w8a8: text files to calibrate activation scales on")
    e.add_argument("--smoothquant-alpha", type=float, default=0.5, metavar="A",
                   help="w8a8: SmoothQuant migration strength in [0, 1] (default: 0.5)")
    e.add_argument("--kv-cache-dtype", choices=["int8"], help="quantize the KV cache")
    e.add_argument("--compare", choices=["hf"],
                   help="also score with HuggingFace transformers on the same float weights")
    e.add_argument("--lambada", metavar="FILE.jsonl",
                   help="LAMBADA-format jsonl ({\"text\": ...} per line): last-word accuracy")
    _dtype_arg(e, "float32", "weights and activations dtype")
    e.add_argument("--window", type=int, metavar="N",
                   help="tokens per window (default: the model's max_positions)")
    e.add_argument("--stride", type=int, metavar="N",
                   help="window stride (default: window // 2)")
    e.add_argument("--max-tokens", type=int, metavar="N",
                   help="score only the first N tokens of each text")
    e.set_defaults(func=_eval)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    use_devices(getattr(args, "tp", 1) * getattr(args, "dp", 1) * getattr(args, "pp", 1))
    from ftjax.errors import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, ValueError) as e:
        print(f"ftjax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
