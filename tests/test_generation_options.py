"""Request options end to end: against HF `generate()` where HF has the option,
otherwise against their definition (teacher-forced logits, single runs)."""

import numpy as np
import pytest
from tiny import tiny_model

import ftjax
from ftjax import serving
from ftjax import batching

SP = ftjax.SamplingParams
NO_STOP = SP(stop_token_ids=[])


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# -- against HuggingFace generate --------------------------------------------------

@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    pytest.importorskip("torch")
    from hf_models import make_gpt2

    d = tmp_path_factory.mktemp("gpt2")
    hf = make_gpt2(d, vocab_size=61, n_embd=32, n_layer=2, n_head=4, seed=3)
    return hf, ftjax.load(str(d))


def _hf_generate(hf, prompt, **kw):
    import torch

    ids = torch.tensor([prompt])
    kw.setdefault("pad_token_id", 0)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    return out


PROMPTS = [[5, 9, 14, 3, 22], [7, 7, 1], [40, 2, 33, 18, 5, 9, 11, 2]]


@pytest.mark.torch
@pytest.mark.parametrize("ours, theirs", [
    (dict(repetition_penalty=1.8), dict(repetition_penalty=1.8)),
    (dict(repetition_penalty=0.6), dict(repetition_penalty=0.6)),
    (dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=2)),
    (dict(bad_words=[[12], [7, 30], [5, 9, 14]]), dict(bad_words_ids=[[12], [7, 30], [5, 9, 14]])),
    (dict(min_new_tokens=10, repetition_penalty=1.3), dict(min_new_tokens=10, repetition_penalty=1.3)),
])
def test_greedy_with_processors_equals_hf(hf_pair, ours, theirs):
    hf, model = hf_pair
    # eos = 0 (the HF config's); greedy free-running continuations often reach it.
    out = model.generate(PROMPTS, max_new_tokens=20, sampling=SP(stop_token_ids=[0], **ours))
    for i, p in enumerate(PROMPTS):
        ref = _hf_generate(hf, p, do_sample=False, max_new_tokens=20, eos_token_id=0, **theirs)
        assert out.tokens[i] == ref[0, len(p):].tolist(), (i, ours)


@pytest.mark.torch
@pytest.mark.parametrize("kw", [
    dict(num_beams=3, n=2),
    dict(num_beams=4, n=4, length_penalty=0.5, early_stopping=True),
    dict(num_beams=3, n=1, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=2, n=2, no_repeat_ngram_size=2, repetition_penalty=1.4),
])
def test_beam_search_equals_hf(hf_pair, kw):
    hf, model = hf_pair
    ours = dict(kw)
    theirs = dict(kw)
    theirs["num_return_sequences"] = theirs.pop("n")
    # An eos the model produces early, so beams finish at different lengths.
    eos = 2
    sp = SP(stop_token_ids=[eos], max_new_tokens=12, **ours)
    out = model.generate(PROMPTS, sampling=sp)
    # The serving engine's beams (pages forked copy-on-write), all requests at once.
    eng = model.serving_engine()
    rids = [eng.add_request(p, sp) for p in PROMPTS]
    served = list(eng.iterate(rids))
    for i, p in enumerate(PROMPTS):
        ref = _hf_generate(hf, p, do_sample=False, max_new_tokens=12, eos_token_id=eos,
                           output_scores=True, return_dict_in_generate=True, **theirs)
        seqs = [s[len(p):].tolist() for s in ref.sequences]
        # HF pads finished beams with pad (0) after eos: cut at the first eos.
        seqs = [s[:s.index(eos) + 1] if eos in s else s for s in seqs]
        got = out.tokens[i] if kw["n"] > 1 else [out.tokens[i]]
        scores = out.cum_log_probs[i] if kw["n"] > 1 else [out.cum_log_probs[i]]
        engine = serving.sequences([o for o in served if o.request_id == rids[i]], kw["n"])
        for toks, sc in ((got, scores), (engine.tokens, engine.cum_log_probs)):
            assert toks == seqs, (i, kw)
            np.testing.assert_allclose(sc, ref.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)


# -- sessions -------------------------------------------------------------------------

def test_session_equals_full_recompute(model):
    s = model.session(max_len=48)
    s.append([3, 1, 4, 1, 5])
    a = s.generate(max_new_tokens=6, sampling=NO_STOP)
    ref_a = model.generate([[3, 1, 4, 1, 5]], max_new_tokens=6, sampling=NO_STOP)
    assert a.tokens == ref_a.tokens
    s.append([9, 2, 6])
    b = s.generate(max_new_tokens=7, sampling=NO_STOP)
    full = [3, 1, 4, 1, 5] + a.tokens[0] + [9, 2, 6]
    ref_b = model.generate([full], max_new_tokens=7, sampling=NO_STOP)
    assert b.tokens == ref_b.tokens
    np.testing.assert_allclose(b.log_probs[0], ref_b.log_probs[0], atol=1e-5)
    assert s.history == full + b.tokens[0]
    # continuing without new user tokens also works
    c = s.generate(max_new_tokens=4, sampling=NO_STOP)
    ref_c = model.generate([s.history[:-4]], max_new_tokens=4, sampling=NO_STOP)
    assert c.tokens == ref_c.tokens
    with pytest.raises(ValueError, match="session length exceeded"):
        s.generate(max_new_tokens=40)
    with pytest.raises(ValueError, match="session length exceeded"):
        s.append(list(range(40)))


# -- per-request options in one batch --------------------------------------------------

MIXED = [
    SP(temperature=0.9, top_k=7, seed=1, stop_token_ids=[]),
    SP(temperature=1.2, top_p=0.8, min_p=0.05, seed=2, repetition_penalty=1.3),
    SP(presence_penalty=0.7, frequency_penalty=0.4, no_repeat_ngram_size=3,
       bad_words=[[5], [9, 3]], min_new_tokens=4, max_new_tokens=9),
    SP(temperature=0.7, seed=5, stop_sequences=[[11, 12]], ignore_eos=True),
]


def test_mixed_batch_equals_one_by_one_and_compiles_once():
    model = tiny_model(seed=2, eos_token_id=3)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [11, 12, 13]]
    out = model.generate(prompts, max_new_tokens=12, sampling=MIXED)
    for i, (p, sp) in enumerate(zip(prompts, MIXED)):
        alone = model.generate([p], max_new_tokens=12, sampling=sp)
        assert out.tokens[i] == alone.tokens[0], i
        assert out.finish_reasons[i] == alone.finish_reasons[0]
    # another mix of the same kinds of options: no new compilation
    before = dict(model.engine.trace_counts)
    model.generate(prompts[::-1], max_new_tokens=10, sampling=MIXED[::-1])
    model.generate(prompts[:3], max_new_tokens=14, sampling=[MIXED[1]] * 3)
    assert dict(model.engine.trace_counts) == before


def test_processors_are_applied(model):
    free = model.generate([[1, 2]], max_new_tokens=16, sampling=NO_STOP).tokens[0]
    banned = free[2]
    out = model.generate([[1, 2]], max_new_tokens=16,
                         sampling=SP(stop_token_ids=[], bad_words=[[banned]])).tokens[0]
    assert banned not in out
    out = model.generate([[1, 2]], max_new_tokens=16,
                         sampling=SP(stop_token_ids=[], no_repeat_ngram_size=2)).tokens[0]
    seq = [1, 2] + out
    grams = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1)]
    assert len(grams) == len(set(grams))


def test_min_new_tokens_and_ignore_eos():
    model = tiny_model(seed=2, eos_token_id=3)
    free = model.generate([[8, 9]], max_new_tokens=20, sampling=SP(stop_token_ids=[])).tokens[0]
    k = next(i for i in range(1, 20) if free.index(free[i]) == i)  # first new token after 0
    stop = free[k]
    early = model.generate([[8, 9]], max_new_tokens=20, sampling=SP(stop_token_ids=[stop]))
    assert len(early.tokens[0]) == k + 1 and early.finish_reasons == ["stop"]
    late = model.generate([[8, 9]], max_new_tokens=20, sampling=SP(stop_token_ids=[stop],
                                                                min_new_tokens=6))
    assert stop not in late.tokens[0][:6] and late.tokens[0][:k] == free[:k]
    assert model.generate([[8, 9]], max_new_tokens=20).tokens[0] == [3]  # eos 3 stops
    ignore = model.generate([[8, 9]] * 2, max_new_tokens=20, sampling=SP(ignore_eos=True))
    assert ignore.tokens == [free, free]


def test_stop_sequences(model):
    free = model.generate([[8, 9]], max_new_tokens=16, sampling=NO_STOP).tokens[0]
    seq = free[4:6]
    first = next(i for i in range(len(free) - 1) if free[i:i + 2] == seq)
    out = model.generate([[8, 9]], max_new_tokens=16,
                         sampling=SP(stop_token_ids=[], stop_sequences=[[96, 95], seq]))
    assert out.tokens[0] == free[:first + 2] and out.finish_reasons == ["stop"]


def test_stop_strings_with_the_bundled_tokenizer():
    m = ftjax.load(ftjax.demo_model_path())
    prompt = "def add(a, b):\n"
    free = m.generate([prompt], max_new_tokens=24, sampling=NO_STOP).texts[0]
    stop = free[6:9]
    out = m.generate([prompt], max_new_tokens=24,
                     sampling=SP(stop_token_ids=[], stop_strings=[stop, "@@@"]))
    text = out.texts[0]
    assert stop in text and out.finish_reasons == ["stop"]
    # the output ends at the first token completing the stop string
    assert stop not in m.tokenizer.decode(out.tokens[0][:-1])
    assert free.startswith(m.tokenizer.decode(out.tokens[0]))
    events = list(m.stream([prompt], max_new_tokens=24,
                           sampling=SP(stop_token_ids=[], stop_strings=[stop])))
    assert [e.token for e in events] == out.tokens[0] and events[-1].finish_reason == "stop"


# -- returned log-probabilities ----------------------------------------------------------

def test_logprobs_top_n_prompt_logprobs_and_cum(model):
    prompt = [5, 17, 2, 40, 8]
    out = model.generate([prompt], max_new_tokens=6,
                         sampling=SP(stop_token_ids=[], logprobs=3, prompt_logprobs=2))
    toks = out.tokens[0]
    ref = _log_softmax(np.asarray(model.forward([prompt + toks]))[0])
    for j, (t, alts) in enumerate(zip(toks, out.top_logprobs[0])):
        row = ref[len(prompt) - 1 + j]
        assert set(alts) == {t} | set(np.argsort(-row)[:3].tolist())
        for k, v in alts.items():
            assert abs(v - row[k]) < 1e-4
    assert abs(out.cum_log_probs[0] - sum(out.log_probs[0])) < 1e-4
    plp = out.prompt_logprobs[0]
    assert plp[0] is None and len(plp) == len(prompt)
    for k in range(1, len(prompt)):
        row = ref[k - 1]
        assert set(plp[k]) == {prompt[k]} | set(np.argsort(-row)[:2].tolist())
        assert abs(plp[k][prompt[k]] - row[prompt[k]]) < 1e-4
    # a request without the options in the same batch gets None
    both = model.generate([prompt, prompt], max_new_tokens=6,
                          sampling=[SP(stop_token_ids=[], logprobs=3), NO_STOP])
    assert both.top_logprobs[1] is None
    for a, b in zip(both.top_logprobs[0], out.top_logprobs[0]):
        assert a.keys() == b.keys() and np.allclose(list(a.values()), list(b.values()), atol=1e-5)


# -- n samples with one shared prefill -----------------------------------------------------

def test_n_samples_share_one_prefill(model):
    sp = SP(temperature=1.0, seed=11, n=4, stop_token_ids=[])
    out = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=8, sampling=sp)
    assert len(out.tokens[0]) == 4 and len(out.tokens[1]) == 4
    assert len({tuple(t) for t in out.tokens[0]}) > 1  # samples differ
    again = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=8, sampling=sp)
    assert again.tokens == out.tokens
    reqs = [batching.Request([1, 2, 3], sp, 8), batching.Request([4, 5], sp, 8),
            batching.Request([1, 2, 3], NO_STOP, 8)]
    batch = batching.build(reqs, [4, 4, 1], model.config, 8)
    assert batch.prefill_args["tokens"].shape[0] == 2  # distinct prompts: 2 of 9 rows
    assert len(batch.rows) == 9


# -- soft prompts ---------------------------------------------------------------------------

def test_soft_prompt_equals_the_tokens_it_embeds(model):
    embed = np.asarray(model.params["embed"])
    soft = embed[[7, 3, 9]]
    a = model.generate([[4, 5]], max_new_tokens=8, sampling=NO_STOP, soft_prompts=[soft])
    b = model.generate([[7, 3, 9, 4, 5]], max_new_tokens=8, sampling=NO_STOP)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.log_probs[0], b.log_probs[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"soft_prompts\[0\] must be \[P, 32\]"):
        model.generate([[4]], soft_prompts=[np.zeros((2, 5))])


# -- streaming ----------------------------------------------------------------------------

def test_stream_yields_before_decoding_ends(model):
    """Stream is a client of the model's serving engine: the first tokens are yielded
    after the engine's first step (prefill + one decode chunk), not after the whole
    request."""
    eng = model.serving_engine()
    steps = []
    real = eng.step

    def counting():
        steps.append(1)
        return real()

    eng.step = counting
    try:
        it = model.stream([[1, 2, 3]], max_new_tokens=30, sampling=NO_STOP)
        first = next(it)
        assert len(steps) == 1
        rest = [first] + list(it)
    finally:
        del eng.step
    assert len(steps) >= 30 // eng.chunk
    ref = model.generate([[1, 2, 3]], max_new_tokens=30, sampling=NO_STOP).tokens[0]
    assert [e.token for e in rest] == ref


def test_closing_a_stream_early_frees_its_slots(model):
    eng = model.serving_engine()
    it = model.stream([[1, 2, 3], [4, 5]], max_new_tokens=30, sampling=NO_STOP)
    next(it)
    assert eng.stats()["slots_busy"] == 2
    it.close()
    s = eng.stats()
    assert (s["slots_busy"], s["running"], s["pages_in_use"]) == (0, 0, 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(min_new_tokens=5, max_new_tokens=2), "min_new_tokens"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(bad_words=[[]]), "bad_words"),
    (dict(stop_sequences=[1, 2]), "stop_sequences"),
    (dict(stop_strings="x"), "stop_strings"),
    (dict(logprobs=50), "logprobs"),
    (dict(n=0), "n must"),
    (dict(num_beams=2, n=3), "n"),
    (dict(num_beams=2, temperature=1.0), "temperature"),
    (dict(early_stopping="sometimes"), "early_stopping"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SP(**kwargs)


def test_min_new_above_call_budget_raises(model):
    with pytest.raises(ValueError, match=r"sampling\[0\].min_new_tokens \(9\)"):
        model.generate([[1]], max_new_tokens=4, sampling=SP(min_new_tokens=9))
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        model.generate([[1]], sampling=SP(stop_strings=["a"]))
