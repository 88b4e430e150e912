"""Accuracy of a loaded model: perplexity, next-token accuracy, LAMBADA last-word accuracy.

Perplexity uses sliding windows of the model's `max_positions` tokens (W) moved by a
stride (default W // 2): the first window scores all its tokens, each later window
only the tokens the previous windows did not score, so every token but the first is
scored exactly once, with at least W - stride tokens of context (HF's recipe).
Next-token accuracy counts the scored tokens whose argmax prediction is right.

The same windows can be scored by HuggingFace transformers on the same float weights
(`hf_scorer`, torch imported lazily) for a side-by-side check.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Callable, List, Optional, Sequence

import numpy as np

from ftjax.specs import n_params
from ftjax.tokenizer import encode_long

BATCH = 8  # windows per forward call


@dataclasses.dataclass
class Score:
    """Totals over the scored tokens.

    Attributes:
      nll: summed negative log-likelihood (nats); tokens: how many were scored;
      correct: argmax hits; seconds: wall time of the forward calls after the first
        (which includes compilation); timed_tokens: the tokens those calls processed.
    """

    nll: float = 0.0
    tokens: int = 0
    correct: int = 0
    seconds: float = 0.0
    timed_tokens: int = 0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.tokens, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.timed_tokens / self.seconds if self.seconds else float("nan")


def windows(n: int, width: int, stride: int):
    """[(begin, end, first scored target index)] covering targets 1..n-1 once each."""
    # Each later window must keep >= 1 token of context before its first scored target.
    if not 0 < stride < width:
        raise ValueError(f"stride must be in [1, window - 1 = {width - 1}], got {stride}")
    out, scored, begin = [], 1, 0
    while scored < n:
        end = min(begin + width, n)
        out.append((begin, end, scored))
        scored, begin = end, begin + stride
    return out


def score_ids(forward: Callable, ids: Sequence[int], width: int, stride: Optional[int] = None,
              score: Optional[Score] = None) -> Score:
    """Scores one token sequence with `forward(int [B, W]) -> logits [B, W, V]`."""
    stride = stride or max(width // 2, 1)
    score = score or Score()
    ids = np.asarray(ids, np.int32)
    spans = windows(len(ids), width, stride)
    for i in range(0, len(spans), BATCH):
        group = spans[i:i + BATCH]
        batch = np.zeros((BATCH, width), np.int32)  # fixed shape: one compilation
        for r, (b, e, _) in enumerate(group):
            batch[r, :e - b] = ids[b:e]
        t0 = time.perf_counter()
        logits = np.asarray(forward(batch), np.float32)
        dt = time.perf_counter() - t0
        if score.tokens:  # the first call compiles: keep it out of tokens/s
            score.seconds += dt
            score.timed_tokens += sum(e - b for b, e, _ in group)
        for r, (b, e, first) in enumerate(group):
            # logits at position p predict token p + 1; targets first..e-1.
            lg = logits[r, first - 1 - b:e - 1 - b]
            tgt = ids[first:e]
            logz = np.logaddexp.reduce(lg, axis=-1)
            score.nll += float(np.sum(logz - lg[np.arange(len(tgt)), tgt]))
            score.correct += int(np.sum(lg.argmax(-1) == tgt))
            score.tokens += len(tgt)
    return score


def lambada(forward: Callable, encode: Callable, path: str, bucket: int = 64) -> tuple:
    """LAMBADA last-word accuracy over a jsonl of {"text": ...}.

    The target is the last whitespace-separated word (with its leading space); an
    example counts when every target token is the argmax under teacher forcing.
    Returns (accuracy, examples).
    """
    hits = n = 0
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'text' "
                                 f"string ({e})") from e
            context, _, word = text.rstrip().rpartition(" ")
            if not context:
                raise ValueError(f"{path}:{line_no}: text has no space before its last word")
            ctx, full = encode(context), encode(context + " " + word)
            if full[:len(ctx)] != ctx:  # the word merged with the context's last token
                ctx = full[:len(ctx) - 1]
            length = -(-len(full) // bucket) * bucket
            # BATCH rows like score_ids: with window == bucket, one compiled shape for both.
            batch = np.zeros((BATCH, length), np.int32)
            batch[0, :len(full)] = full
            logits = np.asarray(forward(batch))[0]
            pred = logits[len(ctx) - 1:len(full) - 1].argmax(-1)
            hits += int(np.array_equal(pred, full[len(ctx):]))
            n += 1
    return hits / max(n, 1), n


def hf_scorer(model) -> Callable:
    """A forward function running HF transformers on `model`'s checkpoint (float32).

    The reference is `ftjax.hf_reference.hf_causal_lm` (the one `bench --compare hf`
    uses): HF directories load directly, anything else is exported from the loaded
    float params. Quantized models have no HF reference here (ValueError).
    """
    import torch

    from ftjax.hf_reference import hf_causal_lm

    hf = hf_causal_lm(model, "float32")

    def forward(batch):
        with torch.no_grad():
            return hf(torch.from_numpy(np.asarray(batch, np.int64))).logits.float().numpy()

    return forward


def evaluate_texts(forward: Callable, texts: List[List[int]], width: int,
                   stride: Optional[int] = None) -> Score:
    score = Score()
    for ids in texts:
        score_ids(forward, ids, width, stride, score)
    return score


def read_text(path: str, flag: str) -> str:
    """A UTF-8 text file's contents; ValueError naming the flag and file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{flag} {path}: is a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot be read ({e.strerror})") from None


def run_eval(args) -> int:
    """`ftjax eval`: prints one row per scorer (ftjax, and HF with --compare hf)."""
    import ftjax
    from ftjax.progress import bar, stages

    calibration = [read_text(p, "--calibration") for p in args.calibration] \
        if args.calibration else None
    raw = [read_text(p, "--text") for p in args.text]  # bad files named before loading
    with stages("load" + (f" + {args.quant}" if args.quant else ""), desc="ftjax eval") as step:
        model = ftjax.load(args.model or ftjax.demo_model_path(), dtype=args.dtype,
                           quant=args.quant, calibration=calibration,
                           smoothquant_alpha=args.smoothquant_alpha,
                           kv_cache_dtype=args.kv_cache_dtype)
        step()
    if model.tokenizer is None:
        raise ValueError(f"{model.path} has no tokenizer; ftjax eval reads text files")
    texts = []
    for p, text in zip(args.text, raw):
        ids = encode_long(model.tokenizer, text)
        ids = ids if args.max_tokens is None else ids[:args.max_tokens]
        if len(ids) < 2:  # the first token has no context: nothing would be scored
            raise ValueError(f"--text {p}: {len(ids)} token(s); perplexity needs at least 2 "
                             "(nothing to score)")
        texts.append(ids)
    width = args.window or model.config.max_positions
    if width > model.config.max_positions:
        raise ValueError(f"--window {width} exceeds the model's max_positions "
                         f"{model.config.max_positions}")
    stride = args.stride or width // 2
    scorers = [("ftjax", model.forward)]
    if args.compare == "hf":
        with stages("HF reference", desc="ftjax eval") as step:
            scorers.append(("hf", hf_scorer(model)))
            step()
    label = model.quant or "float"
    if model.kv_cache_dtype:
        label += f", kv {model.kv_cache_dtype}"
    print(f"model {model.path}: {n_params(model.config) / 1e6:.2f}M params, {args.dtype}, "
          f"{label}, parameter bytes {model.param_bytes:,}")
    print(f"texts {len(texts)}, {sum(map(len, texts)):,} tokens; windows of {width} tokens, "
          f"stride {stride}")
    print(f"{'scorer':<8}{'ppl':>10}{'acc':>9}{'scored':>9}{'tok/s':>10}"
          + (f"{'lambada':>10}" if args.lambada else ""))
    calls = sum(-(-len(windows(len(ids), width, stride)) // BATCH) for ids in texts)
    for name, fwd in scorers:
        with bar(total=calls, desc=f"eval {name}", unit="batch") as progress:
            def counted(batch, fwd=fwd):
                logits = fwd(batch)
                progress.update(1)
                return logits

            s = evaluate_texts(counted, texts, width, stride)
        row = f"{name:<8}{s.perplexity:>10.4f}{s.accuracy:>9.4f}{s.tokens:>9}" \
              f"{s.tokens_per_second:>10.0f}"
        if args.lambada:
            acc, n = lambada(fwd, model.tokenizer.encode, args.lambada)
            row += f"{acc:>10.4f} ({n})"
        print(row)
    return 0
