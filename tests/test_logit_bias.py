"""SamplingParams.logit_bias (OpenAI's): generate equals a by-hand greedy reference."""

import numpy as np
import pytest

import ftjax
from tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _reference(model, prompt, bias, steps):
    """Greedy decoding by hand: full forward each step, bias added, argmax."""
    ids = list(prompt)
    add = np.zeros(model.config.vocab_size, np.float32)
    for t, b in bias.items():
        add[t] = b
    for _ in range(steps):
        logits = np.asarray(model.forward(np.asarray([ids])))[0, -1]
        ids.append(int(np.argmax(logits + add)))
    return ids[len(prompt):]


def test_logit_bias_equals_reference(model):
    prompt = [5, 17, 42, 8]
    plain = model.generate([prompt], 6).tokens[0]
    # Ban the unbiased first choice outright and favour two other tokens a little, so the
    # result depends on the bias values (not only on a ban).
    bias = {plain[0]: -100.0, 11: 2.5, 60: 1.5}
    out = model.generate([prompt], 6, sampling=ftjax.SamplingParams(logit_bias=bias)).tokens[0]
    assert out != plain
    assert out == _reference(model, prompt, bias, 6)
    # A batch mixing biased and unbiased rows: each row keeps its own options.
    both = model.generate([prompt, prompt], 6, sampling=[
        ftjax.SamplingParams(logit_bias=bias), ftjax.SamplingParams()]).tokens
    assert both == [out, plain]


def test_logit_bias_forces_a_token(model):
    out = model.generate([[1, 2, 3]], 5, sampling=ftjax.SamplingParams(
        temperature=1.0, seed=0, logit_bias={7: 100.0}))
    assert out.tokens[0] == [7] * 5


@pytest.mark.parametrize("bias, match", [
    ({1: 101.0}, r"logit_bias\[1\] must be a number in \[-100, 100\]"),
    ({-1: 1.0}, "logit_bias keys must be token ids >= 0"),
    ({1: float("nan")}, r"logit_bias\[1\]"),
    ([1, 2], "logit_bias must be a mapping"),
])
def test_bad_logit_bias_is_refused(bias, match):
    with pytest.raises(ValueError, match=match):
        ftjax.SamplingParams(logit_bias=bias)


def test_logit_bias_outside_vocab_is_refused(model):
    with pytest.raises(ValueError, match=r"logit_bias has token ids \[500\] outside the vocabulary"):
        model.generate([[1, 2]], 2, sampling=ftjax.SamplingParams(logit_bias={500: 1.0}))
