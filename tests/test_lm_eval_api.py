"""`ftjax.lm_eval.FtjaxLM` without torch: its scores against ftjax's own teacher forcing.

(tests/test_lm_eval.py compares it with lm-eval's `hf` backend; this file runs on the
torch-free Python 3.12 job too.) On the bundled model (it has a tokenizer):
loglikelihood = the sum of log-softmax entries of `Model.forward`, computed here in
float64 (tolerance 1e-5 relative: float32 log-softmax vs float64 over a few tokens);
rolling = `ftjax.evaluate.score_ids` on lm-eval's windows (an independent windowing
implementation; 1e-4, as it sums in float32); generate_until = `Model.generate` greedy
cut at the stop string; and
batch_size 1 = batch_size 4 (padding rows do not leak into results).
"""

import math

import numpy as np
import pytest

pytest.importorskip("lm_eval")

import ftjax  # noqa: E402
from ftjax.evaluate import score_ids  # noqa: E402

REL = 1e-5
PAIRS = [("def add(a, b):\n    return", " a + b"), ("import", " os"),
         ("for i in range(10):\n   ", " print(i)"), ("", "class Point:")]


class Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def model():
    return ftjax.load(ftjax.demo_model_path())


@pytest.fixture(scope="module")
def lm(model):
    from ftjax.lm_eval import FtjaxLM

    return FtjaxLM(model=model, batch_size=4, max_length=32)


def _reference(model, lm, context, continuation):
    ctx, cont = (([lm.prefix_token_id], lm.tok_encode(continuation)) if not context
                 else lm._encode_pair(context, continuation))
    row = ctx + cont
    logits = np.asarray(model.forward(np.asarray([row[:-1]], np.int32)), np.float64)[0]
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    pos = np.arange(len(ctx) - 1, len(row) - 1)
    return float(logp[pos, cont].sum()), bool((logits[pos].argmax(-1) == cont).all())


def test_loglikelihood_is_the_models_log_softmax(model, lm):
    got = lm.loglikelihood([Req(c, x) for c, x in PAIRS])
    for (c, x), (ll, greedy) in zip(PAIRS, got):
        want, want_greedy = _reference(model, lm, c, x)
        assert math.isclose(ll, want, rel_tol=REL), (c, x, ll, want)
        assert greedy == want_greedy
    assert len({round(ll, 3) for ll, _ in got}) == len(PAIRS)  # distinct, not a constant


def test_batch_size_does_not_change_results(model, lm):
    from ftjax.lm_eval import FtjaxLM

    one = FtjaxLM(model=model, batch_size=1, max_length=32)
    reqs = [Req(c, x) for c, x in PAIRS]
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs), one.loglikelihood(reqs)):
        assert math.isclose(a, b, rel_tol=REL) and ga == gb


def test_rolling_equals_strided_scoring_on_lm_eval_windows(model, lm):
    text = "\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(12))
    ids = lm.tok_encode(text)
    ids = ids[:(len(ids) // 32) * 32]  # whole windows (see tests/test_lm_eval.py)
    text = lm.tok_decode(ids)
    assert lm.tok_encode(text) == ids and len(ids) >= 96
    ll = lm.loglikelihood_rolling([Req(text)])[0]
    s = score_ids(model.forward, [lm.prefix_token_id] + ids, 33, 32)
    assert s.tokens == len(ids)
    # 1e-4: score_ids sums float32 log-probs over other padded shapes (measured 1e-5).
    assert math.isclose(-ll, s.nll, rel_tol=1e-4), (-ll, s.nll)


def test_generate_until_is_greedy_generate_cut_at_the_stop(model, lm):
    prompts = ["def fibonacci(n):\n", "import os\n", "class Stack:\n"]
    kwargs = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}
    got = lm.generate_until([Req(p, kwargs) for p in prompts])
    out = model.generate(prompts, max_new_tokens=16)
    for text, toks in zip(got, out.tokens):
        want = model.tokenizer.decode(toks, skip_special_tokens=True).split("\n\n")[0]
        assert text == want
    assert any(got)


def test_bad_generation_kwargs_are_named(lm):
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([Req("x", {"until": ["\n"], "num_beams": 4})])


def test_tensor_parallel_backend_equals_one_device(model, lm):
    """model_args tp=2 (a mesh over conftest's virtual CPU devices) scores like one device
    (1e-5: the all-reduce only reorders partial sums)."""
    from ftjax.lm_eval import FtjaxLM

    tp = FtjaxLM(pretrained=ftjax.demo_model_path(), tp=2, batch_size=4, max_length=32)
    reqs = [Req(c, x) for c, x in PAIRS]
    for (a, ga), (b, gb) in zip(tp.loglikelihood(reqs), lm.loglikelihood(reqs)):
        assert math.isclose(a, b, rel_tol=REL) and ga == gb
