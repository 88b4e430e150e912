"""ftjax as an EleutherAI lm-evaluation-harness backend: `import ftjax.lm_eval`.

Importing this module registers the lm-eval model name "ftjax", so

    import ftjax.lm_eval, lm_eval
    lm_eval.simple_evaluate(model="ftjax", model_args="pretrained=DIR,quant=int8", tasks=[...])

runs lm-eval's tasks on ftjax (`ftjax lm-eval ...` on the command line). model_args:
pretrained (any checkpoint `ftjax.load` reads; default the bundled model), dtype, quant,
kv_cache_dtype, kernels, tp, dp, batch_size, max_length, max_gen_toks, seed,
prefix_token_id, add_bos_token.

Scoring follows lm-eval's own `hf` backend token for token (same context truncation,
same rolling windows, same prefix token), so the two give the same metrics on the same
checkpoint; only the model underneath differs. It uses ftjax's public API only:
`ftjax.load`, `Model.forward` (loglikelihood, loglikelihood_rolling) and `Model.generate`
(generate_until, ragged batches, stop strings on the host).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)

import ftjax
from ftjax.buckets import MIN_PROMPT_BUCKET, next_pow2

# Generation kwargs of lm-eval task YAMLs that map onto SamplingParams; any other key
# is refused rather than ignored (an ignored option silently changes the metric).
_SAMPLING_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                  "min_p": "min_p", "repetition_penalty": "repetition_penalty"}
_IGNORED_KEYS = {"do_sample"}


@jax.jit
def _token_scores(logits, targets):
    """Per-position log-prob of the target and whether it is the argmax.

    Args:
      logits: float `[B, T, V]`; targets: int `[B, T]` (the token after each position).
    Returns:
      (float32 `[B, T]` log p(target), bool `[B, T]` target == argmax).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def _flag(value) -> Optional[bool]:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(f"expected a boolean (true/false), got {value!r}")
    return text in ("true", "1")


@register_model("ftjax")
class FtjaxLM(TemplateLM):
    """An lm-eval `TemplateLM` running an ftjax model (batched, any checkpoint ftjax loads).

    Args:
      pretrained: checkpoint path for `ftjax.load` (default: the bundled model).
      dtype, quant, kv_cache_dtype, kernels: as `ftjax.load`.
      tp, dp: tensor / data parallel sizes (a mesh over the visible devices).
      batch_size: rows per forward / generate call (lm-eval's `--batch_size`; "auto" = 8).
      max_length: the longest scored sequence (default: the model's max_positions).
      max_gen_toks: default generation budget when a task names none (lm-eval's 256).
      seed: the sampling seed for tasks that sample (do_sample=True).
      prefix_token_id: the token scored continuations of an empty context follow
        (default: the tokenizer's bos, else eos, as lm-eval's hf backend).
      add_bos_token: passed to the tokenizer as add_special_tokens (hf backend's meaning).
      model: an already loaded `ftjax.Model` instead of `pretrained` (Python use).
      device, max_batch_size: lm-eval passes these to every backend; ignored (JAX
        places the model; batches are fixed-size).
    Raises:
      ValueError: an unknown model_arg, a model without a tokenizer, or tp/dp/batch_size < 1.
    """

    def __init__(self, pretrained: Optional[str] = None, dtype: str = "float32",
                 quant: Optional[str] = None, kv_cache_dtype: Optional[str] = None,
                 kernels: str = "auto", tp: int = 1, dp: int = 1, batch_size=8,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, seed: int = 1234,
                 prefix_token_id: Optional[int] = None, add_bos_token=None,
                 model: Optional[ftjax.Model] = None, device=None, max_batch_size=None,
                 **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"ftjax lm-eval backend: unknown model_args {sorted(unknown)}; "
                             "known: pretrained, dtype, quant, kv_cache_dtype, kernels, tp, dp, "
                             "batch_size, max_length, max_gen_toks, seed, prefix_token_id, "
                             "add_bos_token")
        tp, dp = int(tp), int(dp)
        if tp < 1 or dp < 1:
            raise ValueError(f"tp and dp must be >= 1, got tp={tp} dp={dp}")
        if model is None:
            mesh = ftjax.make_mesh(tensor=tp, data=dp) if tp * dp > 1 else None
            model = ftjax.load(pretrained or ftjax.demo_model_path(), dtype=dtype, quant=quant,
                               kv_cache_dtype=kv_cache_dtype or None, kernels=kernels,
                               mesh=mesh)
        if model.tokenizer is None:
            raise ValueError(f"{model.path}: the lm-eval backend needs a tokenizer "
                             "(tokenizer.json or vocab.json + merges.txt beside the checkpoint)")
        self.model = model
        self.tokenizer = model.tokenizer
        # lm-eval passes batch_size as a string ("8", "auto", "auto:4").
        bs = str(batch_size)
        self.batch_size = 8 if bs.startswith("auto") else int(bs)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        limit = model.config.max_positions
        self._max_length = int(max_length) if max_length else limit
        if not 1 < self._max_length <= limit:
            raise ValueError(f"max_length must be in [2, {limit}] (the model's max_positions), "
                             f"got {max_length}")
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.add_bos_token = _flag(add_bos_token)
        self._prefix = None if prefix_token_id is None else int(prefix_token_id)

    # -- tokens ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos is None:
            raise ValueError(f"{self.model.path}: neither the tokenizer nor the config names an "
                             "eos token (lm-eval needs one)")
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return self._prefix
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else int(bos)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   **kwargs) -> List[int]:
        flag = self.add_bos_token if add_special_tokens is None else add_special_tokens
        kw = {} if flag is None else {"add_special_tokens": flag}
        # Rolling perplexity encodes whole documents: longer than model_max_length is fine
        # (the windows bound what the model sees), so silence the tokenizer's warning.
        saved = self.tokenizer.model_max_length
        self.tokenizer.model_max_length = max(saved, len(string) + 1)
        try:
            return self.tokenizer.encode(string, **kw)
        finally:
            self.tokenizer.model_max_length = saved

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # -- scoring --------------------------------------------------------------

    def _score_rows(self, rows: List[List[int]]) -> Tuple[List[np.ndarray], List[np.ndarray]]:
        """Teacher-forces token rows (each <= max_length + 1 tokens) in fixed-shape batches.

        Returns per row: log p(row[t + 1] | row[:t + 1]) and whether that token was the
        argmax, for t = 0 .. len(row) - 2.
        """
        logps: List[np.ndarray] = []
        greedy: List[np.ndarray] = []
        bs = self.batch_size
        for i in range(0, len(rows), bs):
            group = rows[i:i + bs]
            longest = max(len(r) - 1 for r in group)
            # Power-of-two lengths and a full batch: a handful of compiled shapes in all.
            width = min(next_pow2(longest, MIN_PROMPT_BUCKET), self.model.config.max_positions)
            inp = np.zeros((bs, width), np.int32)
            tgt = np.zeros((bs, width), np.int32)
            for r, row in enumerate(group):
                inp[r, :len(row) - 1] = row[:-1]
                tgt[r, :len(row) - 1] = row[1:]
            lp, hit = jax.device_get(_token_scores(self.model.forward(inp), jnp.asarray(tgt)))
            for r, row in enumerate(group):
                logps.append(np.asarray(lp[r, :len(row) - 1], np.float64))
                greedy.append(np.asarray(hit[r, :len(row) - 1]))
        return logps, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> List[Tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per request.

        As lm-eval's hf backend: context + continuation keeps its last max_length + 1
        tokens (the context is cut from the left)."""
        rows, n_cont = [], []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise ValueError("loglikelihood requests need a non-empty context and "
                                 "continuation (lm-eval's TemplateLM supplies the prefix token)")
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation_enc)} tokens exceeds "
                                 f"max_length {self.max_length}")
            rows.append((list(context_enc) + list(continuation_enc))[-(self.max_length + 1):])
            n_cont.append(len(continuation_enc))
        # Longest first (as hf), so a batch's rows have similar lengths.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        logps, greedy = self._score_rows([rows[i] for i in order])
        out: List[Optional[Tuple[float, bool]]] = [None] * len(rows)
        for k, i in enumerate(order):
            n = n_cont[i]
            out[i] = (float(logps[k][-n:].sum()), bool(greedy[k][-n:].all()))
            if self.cache_hook is not None and requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Summed log-likelihood of whole documents, scored in lm-eval's disjoint windows
        of max_length tokens (the first conditioned on the prefix token)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window,
                                 lm_utils.get_rolling_token_windows(
                                     token_list=self.tok_encode(text),
                                     prefix_token=self.prefix_token_id,
                                     max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # -- generation -----------------------------------------------------------

    def _sampling(self, kwargs: dict, until: List[str], max_gen: int) -> ftjax.SamplingParams:
        unknown = set(kwargs) - set(_SAMPLING_KEYS) - _IGNORED_KEYS
        if unknown:
            raise ValueError(f"generation kwargs {sorted(unknown)} are not supported by the "
                             f"ftjax backend (supported: until, max_gen_toks, do_sample, "
                             f"{', '.join(sorted(_SAMPLING_KEYS))})")
        opts = {v: kwargs[k] for k, v in _SAMPLING_KEYS.items() if kwargs.get(k) is not None}
        if not kwargs.get("do_sample"):
            opts["temperature"] = 0.0
        return ftjax.SamplingParams(stop_strings=[s for s in until if s] or None,
                                    seed=self.seed, max_new_tokens=max_gen, **opts)

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Continuations (greedy unless the task samples) cut at the task's stop strings.

        Requests are grouped by their generation kwargs and run through
        `Model.generate` in ragged batches of batch_size; contexts keep their last
        max_length - max_gen_toks tokens (as lm-eval's hf backend)."""
        eos = self.tokenizer.decode([self.eot_token_id])
        coll = Collator([req.args for req in requests],
                        sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
                        group_by="gen_kwargs", group_fn=lambda x: x[1])
        res = []
        for chunk in coll.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            sampling = self._sampling(kwargs, until, max_gen)
            max_ctx = self.max_length - max_gen
            if max_ctx < 1:
                raise ValueError(f"max_gen_toks {max_gen} leaves no room for a context in "
                                 f"max_length {self.max_length}")
            # generate needs one free position after the prompt.
            keep = min(max_ctx, self.model.config.max_positions - 1)
            prompts = [self.tok_encode(c)[-keep:] or [self.prefix_token_id] for c in contexts]
            out = self.model.generate(prompts, max_new_tokens=max_gen, sampling=sampling)
            for context, gen_kwargs, tokens in zip(contexts, all_kwargs, out.tokens):
                text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return coll.get_original(res)


def run_cli(argv: List[str]) -> int:
    """`ftjax lm-eval ARGS`: lm-eval's own command line (`lm-eval run ARGS`) with the
    ftjax backend registered and `--model ftjax` implied (lm-eval's CLI cannot discover
    an outside backend by itself)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = list(argv)
    if argv[:1] == ["run"]:
        argv = argv[1:]
    for i, a in enumerate(argv):
        if a == "--model" or a.startswith("--model="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            if value != "ftjax":
                raise ValueError(f"ftjax lm-eval runs the ftjax backend; got --model {value!r} "
                                 "(use lm-eval itself for other backends)")
    if not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv = ["--model", "ftjax"] + argv
    saved = sys.argv
    sys.argv = ["ftjax lm-eval", "run"] + argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
