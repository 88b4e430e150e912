"""Trains the bundled demo model: a small GPT-2 on this interpreter's standard library.

    python examples/train_demo_model.py --seconds 1500     # writes ftjax/assets/demo-model

Data: every `*.py` under `sysconfig.get_paths()["stdlib"]` (site-packages excluded,
files that are not UTF-8 skipped), sorted by path; a file goes to validation when
crc32(path) % 100 < 2, so the split is deterministic. Files are joined into one
token stream, each preceded by "<|endoftext|>" (id 0, also bos and eos). Training
windows are random crops of --seq-len tokens; one step in --long-every instead
takes windows of n_positions (512) tokens (as many as keep the step's token count),
so that the learned positions past --seq-len are trained too.

Tokenizer: byte-level BPE (`tokenizers`), trained on the training files.
Model: `ftjax.model.Transformer` in float32, trained with optax AdamW. The learning
rate warms up linearly, then follows a cosine to 10% of its peak over the run's
progress, max(step / --steps, elapsed / --seconds): a wall-clock budget still
gets a full schedule. Output: `save_hf_gpt2` weights + a HuggingFace fast
tokenizer + TRAINING.md, loadable by `ftjax.load` and by transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import sysconfig
import time
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converters.hf_export import save_hf_gpt2  # noqa: E402
from ftjax.config import ModelConfig  # noqa: E402
from ftjax.model import Transformer  # noqa: E402
from ftjax.specs import init_params, n_params  # noqa: E402

EOT = "<|endoftext|>"
EVAL_WINDOWS = 256  # fixed windows of --seq-len tokens for the train / validation losses
EVAL_BATCH = 16
PROMPT = "def fibonacci(n):"
# The decoding written to generation_config.json (the default of `ftjax generate`): greedy
# decoding of a model this small loops on one phrase; sampling at a moderate temperature
# with a repetition penalty reads as code.
GENERATION = {"temperature": 0.7, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "ftjax" / "assets" / "demo-model"))
    p.add_argument("--steps", type=int, default=100_000, help="most optimizer steps")
    p.add_argument("--seconds", type=float, default=1500, help="training wall-clock budget")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate (300-step trials: 2e-3 beat 1e-3; 4e-3 trailed)")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--long-every", type=int, default=4,
                   help="every Nth step trains on n_positions-long windows (0: never)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="dtype of the saved weights (training is float32; bfloat16 halves the "
                   "file, ftjax.load upcasts to the dtype asked for)")
    p.add_argument("--resume", help="continue from a model this script saved (its weights and "
                   "tokenizer; the architecture flags are then read from it)")
    return p.parse_args(argv)


# -- data ----------------------------------------------------------------------

def stdlib_sources():
    """(train texts, validation texts) of the stdlib's .py files, in path order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    train, val, skipped = [], [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if {"site-packages", "dist-packages"} & set(rel.split("/")):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        (val if zlib.crc32(rel.encode()) % 100 < 2 else train).append(text)
    print(f"{root}: {len(train)} train files, {len(val)} validation files, "
          f"{skipped} skipped (unreadable or not UTF-8)", flush=True)
    return train, val


def train_tokenizer(texts, vocab_size):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOT], show_progress=False)
    assert tok.token_to_id(EOT) == 0
    return tok


def token_stream(tok, texts) -> np.ndarray:
    """All files as one uint16 stream, each file preceded by EOT (id 0)."""
    parts = []
    for enc in tok.encode_batch(texts):
        parts.append(np.zeros(1, np.uint16))
        parts.append(np.asarray(enc.ids, np.uint16))
    return np.concatenate(parts)


def windows(stream, starts, length):
    return stream[np.asarray(starts)[:, None] + np.arange(length)].astype(np.int32)


# -- model and training ----------------------------------------------------------

def model_config(args) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                       n_heads=args.heads, n_kv_heads=args.heads,
                       head_dim=args.d_model // args.heads, d_ff=4 * args.d_model,
                       max_positions=512, bos_token_id=0, eos_token_id=0)


def initial_params(cfg, seed):
    """init_params, with residual-output projections scaled by 1/sqrt(2L) as in GPT-2."""
    params = init_params(cfg, seed=seed)
    scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    layers = params["layers"]
    layers["attn"]["o"]["kernel"] = layers["attn"]["o"]["kernel"] * scale
    layers["mlp"]["wo"]["kernel"] = layers["mlp"]["wo"]["kernel"] * scale
    return params


def decay_mask(params):
    """Weight decay on matrices (kernels, embeddings), not on biases and norms."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key in ("kernel", "embed", "pos_embed"), params)


def learning_rate(args, step, progress):
    warm = min(1.0, (step + 1) / args.warmup)
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * cosine


def build(cfg, params):
    model = Transformer(cfg, jnp.float32)
    # AdamW at learning rate 1, scaled by the schedule's value each step (decoupled
    # weight decay included, as optax.adamw(lr) does).
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1.0, b1=0.9, b2=0.95, weight_decay=0.1,
                                 mask=decay_mask(params)))

    def loss_fn(params, batch):
        x, y = batch[:, :-1], batch[:, 1:]
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)
        logits, _ = model(params, x, positions)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(params, opt_state, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    return tx, jax.jit(loss_fn), train_step


def mean_loss(eval_fn, params, batches):
    return float(np.mean([float(eval_fn(params, b)) for b in batches]))


def fixed_batches(stream, length):
    """EVAL_WINDOWS windows evenly spaced over the stream (the same every run), batched."""
    starts = np.linspace(0, len(stream) - length - 1, EVAL_WINDOWS).astype(np.int64)
    return [windows(stream, s, length) for s in starts.reshape(-1, EVAL_BATCH)]


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    train_texts, val_texts = stdlib_sources()
    if args.resume:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(args.resume, "tokenizer.json"))
    else:
        tok = train_tokenizer(train_texts, args.vocab)
    train, val = token_stream(tok, train_texts), token_stream(tok, val_texts)
    del train_texts
    n_bytes = sum(len(t.encode()) for t in val_texts)
    print(f"tokenizer: vocab {tok.get_vocab_size()}; {len(train):,} train tokens, "
          f"{len(val):,} validation tokens ({n_bytes / len(val):.2f} bytes/token); "
          f"{time.time() - t_start:.0f}s", flush=True)

    if args.resume:
        from converters import load_checkpoint

        cfg, params = load_checkpoint(args.resume)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
        args.d_model, args.layers, args.heads = cfg.d_model, cfg.n_layers, cfg.n_heads
        args.vocab = cfg.vocab_size
    else:
        cfg = model_config(args)
        params = initial_params(cfg, args.seed)
    tx, eval_fn, train_step = build(cfg, params)
    opt_state = tx.init(params)
    if args.seq_len > cfg.max_positions:
        raise SystemExit(f"--seq-len {args.seq_len} is over n_positions {cfg.max_positions}")
    length, long_length = args.seq_len + 1, cfg.max_positions + 1
    long_every = args.long_every if cfg.max_positions > args.seq_len else 0
    val_batches = fixed_batches(val, length)
    train_eval_batches = fixed_batches(train, length)
    rng = np.random.default_rng(args.seed)
    print(f"model: {n_params(cfg):,} params (d_model {cfg.d_model}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads); batch {args.batch} x {args.seq_len}; peak lr {args.lr}",
          flush=True)

    t0 = time.time()
    step, tokens, recent, history = 0, 0, [], []
    while step < args.steps:
        elapsed = time.time() - t0
        progress = max(step / args.steps, elapsed / args.seconds if args.seconds else 0.0)
        if progress >= 1.0:
            break
        lr = learning_rate(args, step, progress)
        rows, cols = args.batch, length
        if long_every and step % long_every == long_every - 1:
            rows, cols = max(1, args.batch * args.seq_len // cfg.max_positions), long_length
        batch = windows(train, rng.integers(0, len(train) - cols, rows), cols)
        params, opt_state, loss = train_step(params, opt_state, batch, jnp.float32(lr))
        step += 1
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        recent.append(loss)
        if step % 25 == 0 or step == 1:
            history += [float(x) for x in recent]
            recent = []
            print(f"step {step:5d}  loss {np.mean(history[-25:]):.4f}  lr {lr:.2e}  "
                  f"{tokens / (time.time() - t0):.0f} tok/s  {time.time() - t0:.0f}s", flush=True)
        if step % 500 == 0:
            print(f"step {step:5d}  validation loss {mean_loss(eval_fn, params, val_batches):.4f}",
                  flush=True)
    jax.block_until_ready(params)
    wall = time.time() - t0
    history += [float(x) for x in recent]
    train_tail = float(np.mean(history[-50:]))
    train_loss = mean_loss(eval_fn, params, train_eval_batches)
    val_loss = mean_loss(eval_fn, params, val_batches)

    saved_params = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    saved_val_loss = (mean_loss(eval_fn, saved_params, val_batches)
                      if args.save_dtype == "bfloat16" else val_loss)
    del saved_params
    out = pathlib.Path(args.out)
    save_dtype = jnp.bfloat16 if args.save_dtype == "bfloat16" else jnp.float32
    save_hf_gpt2(out, cfg, jax.device_get(
        jax.tree_util.tree_map(lambda x: x.astype(save_dtype), params)))
    save_tokenizer(tok, out, cfg.max_positions)
    save_generation_config(out)
    sample, sampled = check_saved(out, tok)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    rows = [
        ("parameters", f"{n_params(cfg):,}"),
        ("config", f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
                   f"d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, n_positions {cfg.max_positions}"),
        ("data", f"Python {platform.python_version()} stdlib .py files: {len(train):,} train "
                 f"tokens, {len(val):,} validation tokens (~2% of files held out)"),
        ("tokens trained on", f"{tokens:,} ({step} steps of {args.batch} x {args.seq_len}"
                              + (f"; 1 step in {long_every} on {cfg.max_positions}-token "
                                 "windows" if long_every else "") + ")"),
        ("steps", f"{step}"),
        ("resumed from", args.resume or "(fresh start)"),
        ("wall time (training)", f"{wall:.0f} s"),
        ("optimizer", f"AdamW b=(0.9, 0.95) wd 0.1, peak lr {args.lr}, warmup {args.warmup} "
                      "steps, cosine to 10%, grad clip 1.0, float32"),
        ("final train loss", f"{train_tail:.4f} (mean of the last 50 steps); "
                             f"{train_loss:.4f} on {EVAL_WINDOWS} fixed train windows"),
        ("validation loss", f"{val_loss:.4f} (mean over {EVAL_WINDOWS} fixed held-out windows "
                            f"of {args.seq_len} tokens; float32 weights)"),
        ("validation loss, saved weights", f"{saved_val_loss:.4f} ({args.save_dtype} weights "
                                           "as saved, upcast to float32)"),
        ("size on disk", f"{size / 1e6:.1f} MB"),
        ("seed", f"{args.seed}"),
        ("jax", jax.__version__),
        ("python", platform.python_version()),
    ]
    command = " ".join(sys.argv[1:] if argv is None else argv)
    report = ["# Demo model training run", "",
              f"Trained by `examples/train_demo_model.py {command}`.", "",
              "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    report += ["", f"Greedy continuation of `{PROMPT}` (48 new tokens):", "", "```python",
               PROMPT + sample, "```", "",
               f"With `generation_config.json` ({GENERATION}; seed 0), 48 new tokens:",
               "", "```python", PROMPT + sampled, "```", ""]
    (out / "TRAINING.md").write_text("\n".join(report))
    print("\n".join(report), flush=True)
    if size > 20e6:
        raise SystemExit(f"{out}: {size / 1e6:.1f} MB is over the 20 MB budget")


def save_tokenizer(tok, out, max_length):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   unk_token=EOT, model_max_length=max_length)
    fast.save_pretrained(out)
    # transformers 5 names the class "TokenizersBackend", which 4.x does not know;
    # "PreTrainedTokenizerFast" is the same class in 5 and loads in both.
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


def save_generation_config(out):
    """HF `generation_config.json`: the decoding `ftjax generate` and HF `generate()` use."""
    config = {"bos_token_id": 0, "eos_token_id": 0, "do_sample": True, **GENERATION}
    (out / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_saved(out, tok) -> tuple[str, str]:
    """Reloads with AutoTokenizer and ftjax.load; returns a greedy and a sampled sample."""
    import ftjax
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(out)
    text = 'def f(x):\n    """Doc."""\n    return {"a": x ** 2}  # é\n'
    ids = auto.encode(text)
    assert ids == tok.encode(text).ids, (ids, tok.encode(text).ids)
    assert auto.decode(ids) == text, auto.decode(ids)
    assert auto.eos_token_id == auto.bos_token_id == 0
    print(f"AutoTokenizer: {type(auto).__name__} round-trips", flush=True)
    model = ftjax.load(out)
    greedy = model.generate([PROMPT], max_new_tokens=48).texts[0]
    sampling = ftjax.SamplingParams(seed=0, **GENERATION)
    return greedy, model.generate([PROMPT], max_new_tokens=48, sampling=sampling).texts[0]


if __name__ == "__main__":
    main()
