"""Engine behaviour: ragged batches, seeds, limits, bad input, compile counts (no torch)."""

import jax
import numpy as np
import pytest

import ftjax
from ftjax.api import Model
from tiny import tiny_model

NO_STOP = ftjax.SamplingParams(stop_token_ids=[])


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_ragged_batch_equals_single_runs(model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (1, 5, 17, 9, 30)]
    batch = model.generate(prompts, max_new_tokens=12, sampling=NO_STOP)
    for i, p in enumerate(prompts):
        single = model.generate([p], max_new_tokens=12, sampling=NO_STOP)
        assert batch.tokens[i] == single.tokens[0]
        assert np.allclose(batch.log_probs[i], single.log_probs[0], atol=1e-5)
    assert all(len(t) == 12 for t in batch.tokens)
    assert len({tuple(t) for t in batch.tokens}) > 1


def test_greedy_tokens_are_argmax_of_teacher_forced_logits(model):
    """The cached decode path agrees with the uncached forward pass."""
    prompt = [4, 8, 15, 16, 23, 42]
    out = model.generate([prompt], max_new_tokens=10, sampling=NO_STOP).tokens[0]
    logits = np.asarray(model.forward([prompt + out]))[0]
    assert out == logits[len(prompt) - 1:-1].argmax(-1).tolist()


def test_same_seed_same_sample_and_rows_independent(model):
    prompts = [[1, 2, 3], [9, 9]]
    sp = ftjax.SamplingParams(temperature=1.0, seed=1234, stop_token_ids=[])
    a = model.generate(prompts, max_new_tokens=16, sampling=sp)
    b = model.generate(prompts, max_new_tokens=16, sampling=sp)
    assert a.tokens == b.tokens
    alone = model.generate([prompts[1]], max_new_tokens=16, sampling=sp)
    assert alone.tokens[0] == a.tokens[1]
    other = model.generate(prompts, max_new_tokens=16,
                           sampling=ftjax.SamplingParams(temperature=1.0, seed=99,
                                                         stop_token_ids=[]))
    assert other.tokens != a.tokens


def test_sampling_filters(model):
    greedy = model.generate([[5, 6]], max_new_tokens=8, sampling=NO_STOP).tokens
    for sp in (ftjax.SamplingParams(temperature=2.0, top_k=1, seed=0, stop_token_ids=[]),
               ftjax.SamplingParams(temperature=2.0, top_p=1e-6, seed=0, stop_token_ids=[])):
        assert model.generate([[5, 6]], max_new_tokens=8, sampling=sp).tokens == greedy
    # top_k=3: every sampled token is among the 3 most likely at its step.
    sp = ftjax.SamplingParams(temperature=5.0, top_k=3, seed=7, stop_token_ids=[])
    toks = model.generate([[5, 6]], max_new_tokens=8, sampling=sp).tokens[0]
    logits = np.asarray(model.forward([[5, 6] + toks]))[0, 1:-1]
    for t, row in zip(toks, logits):
        assert t in np.argsort(-row)[:3]


def test_per_request_sampling_list(model):
    sps = [NO_STOP, ftjax.SamplingParams(temperature=1.0, seed=3, stop_token_ids=[])]
    out = model.generate([[1, 2], [1, 2]], max_new_tokens=8, sampling=sps)
    assert out.tokens[0] == model.generate([[1, 2]], max_new_tokens=8, sampling=NO_STOP).tokens[0]


def test_stop_token_ends_request(model):
    free = model.generate([[3, 1, 4]], max_new_tokens=12, sampling=NO_STOP).tokens[0]
    stop = free[4]
    first = free.index(stop)
    out = model.generate([[3, 1, 4], [3, 1, 4]], max_new_tokens=12,
                         sampling=[ftjax.SamplingParams(stop_token_ids=[stop]), NO_STOP])
    assert out.tokens[0] == free[:first + 1] and out.finish_reasons[0] == "stop"
    assert out.tokens[1] == free and out.finish_reasons[1] == "length"


def test_every_eos_id_of_the_model_stops_by_default(model):
    free = model.generate([[3, 1, 4]], max_new_tokens=12, sampling=NO_STOP).tokens[0]
    stop = free[5]
    first = free.index(stop)
    eos_model = tiny_model(eos_token_id=(96, stop))  # same weights: same seed and shapes
    out = eos_model.generate([[3, 1, 4]], max_new_tokens=12)
    assert out.tokens[0] == free[:first + 1] and out.finish_reasons == ["stop"]


def test_positions_run_out_gives_length(model):
    # max_positions 64: a 60-token prompt leaves room for 4 tokens.
    prompt = list(range(60))
    out = model.generate([prompt, [1, 2]], max_new_tokens=10, sampling=NO_STOP)
    assert len(out.tokens[0]) == 4 and out.finish_reasons[0] == "length"
    assert len(out.tokens[1]) == 10
    logits = np.asarray(model.forward([prompt + out.tokens[0]]))[0]
    assert out.tokens[0] == logits[59:63].argmax(-1).tolist()


def test_zero_new_tokens(model):
    out = model.generate([[1, 2, 3]], max_new_tokens=0)
    assert out.tokens == [[]] and out.finish_reasons == ["length"] and out.log_probs == [[]]


def test_stream_matches_generate(model):
    prompts = [[1, 2, 3], [7] * 11]
    ref = model.generate(prompts, max_new_tokens=9, sampling=NO_STOP)
    got = [[], []]
    reasons = [None, None]
    for ev in model.stream(prompts, max_new_tokens=9, sampling=NO_STOP):
        got[ev.index].append(ev.token)
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    assert got == ref.tokens and reasons == ref.finish_reasons


def test_no_recompile_within_bucket():
    model = tiny_model(seed=1)
    rng = np.random.default_rng(0)
    for i in range(10):
        batch = 3 + i % 2                    # batch bucket 4
        lengths = rng.integers(1, 16, batch)  # prompt bucket 16
        prompts = [rng.integers(0, 97, n).tolist() for n in lengths]
        model.generate(prompts, max_new_tokens=5 + i, sampling=NO_STOP)  # budget bucket 16
    assert model.engine.trace_counts["prefill"] == 1
    assert model.engine.trace_counts["decode"] == 1


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([], {}, "prompts is empty"),
    ([[]], {}, r"prompts\[0\] is empty"),
    ([[1, 2], [97]], {}, r"prompts\[1\] has token ids \[97\] outside the vocabulary"),
    ([[-1]], {}, "outside the vocabulary"),
    ([list(range(64))], {}, "the limit is 63"),
    ([[1]], {"max_new_tokens": -1}, "max_new_tokens must be an int >= 0"),
    (["text"], {}, "no tokenizer"),
    ("text", {}, "must be a list"),
    ([[1], [2]], {"sampling": [ftjax.SamplingParams()]}, "one per prompt"),
])
def test_bad_generate_input_raises(model, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(prompts, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(seed=-3), "seed must be an int"),
    (dict(stop_token_ids=[-2]), "stop_token_ids must be non-negative"),
])
def test_bad_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ftjax.SamplingParams(**kwargs)


def test_stop_id_outside_vocab_raises(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([[1]], sampling=ftjax.SamplingParams(stop_token_ids=[500]))


def test_bad_forward_input_raises(model):
    with pytest.raises(ValueError, match="input_ids must be an int array"):
        model.forward([1, 2, 3])
    with pytest.raises(ValueError, match=r"input_ids\[0\] has 65 tokens; the limit is 64"):
        model.forward([list(range(65))])


def test_bad_dtype_raises(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        ftjax.load(str(tmp_path), dtype="float64")


def test_layer_loops_agree(model):
    """The stacked-layer scan (what accelerators run, and what this suite runs: conftest
    sets FTJAX_LAYER_LOOP=scan) and the CPU default (the stack split per layer, an
    unrolled loop) are one model: the same logits (float32 rounding) and tokens."""
    assert model.layer_loop == "scan"
    unrolled = Model(model.config, model.params, layer_loop="unrolled")
    assert Model(model.config, model.params, layer_loop="auto").layer_loop == "unrolled"
    assert isinstance(unrolled.generator.params["layers"], tuple)
    ids = np.asarray([[5, 6, 7, 8, 9, 10]], np.int32)
    np.testing.assert_allclose(np.asarray(unrolled.forward(ids)), np.asarray(model.forward(ids)),
                               atol=1e-5)
    ref = model.generate([ids[0].tolist()], max_new_tokens=8, sampling=NO_STOP).tokens[0]
    got = unrolled.generate([ids[0].tolist()], max_new_tokens=8, sampling=NO_STOP).tokens[0]
    assert got == ref
    back = unrolled.params  # the canonical stacked layout again
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="layer_loop must be one of"):
        Model(model.config, model.params, layer_loop="python")
