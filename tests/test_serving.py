"""ftjax.LLMEngine: in-flight batching over the paged KV cache gives every request what
`Model.generate` gives it, compiles nothing while requests come and go, and leaks nothing.

The reference is one `model.generate` call over the whole workload: its rows do not depend
on their batch mates (tests/test_generation_options.py::
test_mixed_batch_equals_one_by_one_and_compiles_once), so each row is what generate gives
that request alone; a few are also checked alone here.
"""

import asyncio
import random

import numpy as np
import pytest

import ftjax
from ftjax import serving
from ftjax import SamplingParams as SP
from tiny import tiny_model

POSITIONS = 64
MAX_PROMPT = 32        # prompts 1..32, budgets 1..32: prompt + budget <= positions
EOS = 3


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4, eos_token_id=EOS, max_positions=POSITIONS)


@pytest.fixture(scope="module")
def engine(model):
    # prefill: 4 rows x 4 tokens per step, so long prompts span several rows and steps
    return ftjax.LLMEngine(model, max_slots=8, page_size=8, chunk=4, prefill_budget=16,
                           prefill_rows=4, max_logprobs=4)


def _options(rng: random.Random, budget: int) -> SP:
    kind = rng.randrange(8)
    seed = rng.randrange(2**31)
    common = dict(max_new_tokens=budget, logprobs=rng.choice([0, 0, 2, 4]))
    if kind == 0:
        return SP(**common)
    if kind == 1:
        return SP(temperature=0.9, seed=seed, top_k=rng.choice([0, 20]), **common)
    if kind == 2:
        return SP(temperature=1.1, seed=seed, top_p=0.9, n=rng.choice([2, 3]), **common)
    if kind == 3:
        return SP(repetition_penalty=1.4, presence_penalty=0.3, **common)
    if kind == 4:
        return SP(temperature=0.8, seed=seed, repetition_penalty=1.2,
                  no_repeat_ngram_size=2, **common)
    if kind == 5:
        return SP(stop_token_ids=[rng.randrange(97), rng.randrange(97)], ignore_eos=True,
                  **common)
    if kind == 6:
        return SP(stop_sequences=[[rng.randrange(97), rng.randrange(97)], [13]],
                  bad_words=[[5], [9, 3]], min_new_tokens=min(budget, 2), **common)
    return SP(temperature=0.7, seed=seed, n=2, frequency_penalty=0.5, **common)


def _workload(seed: int, count: int, max_prompt=MAX_PROMPT, max_budget=32):
    rng = random.Random(seed)
    stem = [rng.randrange(97) for _ in range(16)]     # a shared prefix (prefix caching)
    out = []
    for _ in range(count):
        length = rng.randint(1, max_prompt)
        prompt = [rng.randrange(97) for _ in range(length)]
        if length > 16 and rng.random() < 0.4:
            prompt = stem + prompt[16:]
        out.append((prompt, _options(rng, rng.randint(1, max_budget))))
    return out


def _drive(eng, work, seed: int, abort_p: float = 0.0):
    """Adds the requests at random steps, steps until done; returns {rid: (request
    index, per sample: [tokens, log-probs, tops, reason, tokens as streamed])}."""
    rng = random.Random(seed)
    pending = list(enumerate(work))
    ids, got, aborted = {}, {}, set()
    while pending or eng.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 2, 5])):
            if pending:
                i, (prompt, sp) = pending.pop(0)
                ids[eng.add_request(prompt, sp)] = i
        if abort_p and ids and rng.random() < abort_p:
            rid = rng.choice(list(ids))
            if rid not in aborted and rid in eng._requests:
                eng.abort(rid)
                aborted.add(rid)
        for o in eng.step():
            assert o.request_id not in aborted
            rec = got.setdefault(o.request_id, {}).setdefault(
                o.sample, dict(streamed=[], lps=[], tops=[], reason=None, tokens=None,
                               score=None))
            assert rec["reason"] is None, "output after the sequence finished"
            rec["streamed"] += o.new_tokens
            rec["lps"] += o.new_log_probs
            rec["tops"] += o.new_top_logprobs or []
            assert o.tokens == rec["streamed"]
            if o.finished:
                rec["reason"], rec["score"] = o.finish_reason, o.score
    return ids, got, aborted


def _check_against_generate(model, work, ids, got):
    ref = model.generate([p for p, _ in work], max_new_tokens=32,
                         sampling=[sp for _, sp in work])
    for rid, i in ids.items():
        sp = work[i][1]
        listed = (lambda x: x) if sp.n > 1 else (lambda x: [x])
        toks, reasons, lps, cums = (listed(f[i]) for f in (
            ref.tokens, ref.finish_reasons, ref.log_probs, ref.cum_log_probs))
        tops = listed(ref.top_logprobs[i]) if sp.logprobs else None
        assert sorted(got[rid]) == list(range(sp.n)), (rid, i)
        for j in range(sp.n):
            rec = got[rid][j]
            assert rec["streamed"] == toks[j], (i, j, sp)
            assert rec["reason"] == reasons[j], (i, j, sp)
            # fp32; tolerance: paged vs contiguous attention sum masked slots in another
            # order and chunked prefill changes matmul shapes (measured <= 1e-6).
            np.testing.assert_allclose(rec["lps"], lps[j], atol=1e-5, rtol=0)
            if sp.num_beams > 1:      # the beam's length-penalized score
                np.testing.assert_allclose(rec["score"], cums[j], atol=1e-5, rtol=0)
            if tops is not None:
                assert [sorted(d) for d in rec["tops"]] == [sorted(d) for d in tops[j]]
                for a, b in zip(rec["tops"], tops[j]):
                    np.testing.assert_allclose([a[t] for t in sorted(a)],
                                               [b[t] for t in sorted(b)], atol=1e-5)


def _idle(eng):
    s = eng.stats()
    assert (s["running"], s["waiting"], s["slots_busy"], s["pages_in_use"]) == (0, 0, 0, 0), s
    eng.blocks.check()


def test_workload_equals_generate(model, engine):
    work = _workload(0, 72)
    ids, got, _ = _drive(engine, work, seed=1)
    assert len(ids) == 72
    _check_against_generate(model, work, ids, got)
    _idle(engine)
    s = engine.stats()
    assert s["prefix_hits"] > 0 and s["preemptions"] == 0
    # a few requests alone, with a fresh engine-free call each
    for prompt, sp in work[:3]:
        alone = model.generate([prompt], max_new_tokens=32, sampling=sp)
        rid = next(r for r, i in ids.items() if work[i][0] is prompt)
        assert got[rid][0]["streamed"] == (alone.tokens[0] if sp.n == 1 else alone.tokens[0][0])


@pytest.mark.slow
def test_long_workload_equals_generate():
    """The issue's lengths: 64 requests, prompts 1..400, budgets 1..128, mixed options
    (stop ids / sequences, logprobs, n > 1, seeds, penalties), added at random steps,
    long prompts prefilled over several steps of a 4 x 64-token budget."""
    model = tiny_model(seed=6, eos_token_id=EOS, max_positions=544)
    eng = ftjax.LLMEngine(model, max_slots=8, page_size=16, chunk=8, prefill_budget=256,
                          prefill_rows=4, max_logprobs=4)
    work = _workload(9, 64, max_prompt=400, max_budget=128)
    ids, got, _ = _drive(eng, work, seed=10)
    _check_against_generate(model, work, ids, got)
    _idle(eng)


# Beam options of tests/test_generation_options.py::test_beam_search_equals_hf (generate's
# beams equal HF's), and all 8 slots' worth of beams.
BEAM_OPTIONS = [dict(num_beams=3, n=2), dict(num_beams=4, n=4, length_penalty=0.5,
                                             early_stopping=True),
                dict(num_beams=3, n=1, length_penalty=2.0, early_stopping="never"),
                dict(num_beams=2, n=2, no_repeat_ngram_size=2, repetition_penalty=1.4),
                dict(num_beams=8, n=3, early_stopping=True)]


def _beam_workload(model, seed: int, count: int):
    """`_workload`'s mix with every other request a beam search. A beam request stops
    on tokens its prompt's greedy continuation takes early (so its hypotheses end at
    different lengths, by stop and by length)."""
    work = _workload(seed, count)
    rng = random.Random(seed + 100)
    beams = list(range(0, count, 2))
    greedy = model.generate([work[i][0] for i in beams], max_new_tokens=6).tokens
    for k, (i, g) in enumerate(zip(beams, greedy)):
        stop = sorted({g[1], g[4]} - {EOS}) if len(g) > 4 else []
        work[i] = (work[i][0], SP(max_new_tokens=rng.randint(1, 32), stop_token_ids=stop,
                                  **BEAM_OPTIONS[k % len(BEAM_OPTIONS)]))
    return work


def test_beam_requests_equal_generate(model, engine):
    """Beam searches join and leave the running batch beside sampled requests: each
    gives what `Model.generate` gives it (tokens, reasons, log-probs, scores), with
    nothing compiled after warm-up, and every forked page is returned."""
    engine.warmup()
    before = dict(engine.trace_counts)
    work = _beam_workload(model, 11, 30)
    ids, got, _ = _drive(engine, work, seed=12)
    assert dict(engine.trace_counts) == before
    _check_against_generate(model, work, ids, got)
    reasons = {got[r][j]["reason"] for r, i in ids.items() if work[i][1].num_beams > 1
               for j in got[r]}
    assert reasons == {"stop", "length"}
    _idle(engine)


def test_beams_share_their_pages(model):
    """Beams fork their parents' pages: 8 beams of a 40-token prompt (5 pages of 8)
    hold the prompt's pages once, plus at most a page each for their own last tokens."""
    eng = ftjax.LLMEngine(model, max_slots=8, page_size=8, chunk=4, prefill_budget=64)
    prompt = list(range(4, 44))
    rid = eng.add_request(prompt, SP(num_beams=8, n=2, stop_token_ids=[]), max_new_tokens=12)
    peak, out = 0, []
    while eng.has_unfinished():
        out += eng.step()
        peak = max(peak, eng.stats()["pages_in_use"])
    assert peak <= 5 + 2 * 8 < 8 * 7
    seq = serving.sequences(out, 2)
    ref = model.generate([prompt], sampling=SP(num_beams=8, n=2, stop_token_ids=[],
                                               max_new_tokens=12))
    assert seq.tokens == ref.tokens[0] and out[0].request_id == rid
    _idle(eng)


def test_preemption_gives_the_same_results(model):
    # 8 pages of 8 tokens hold one full-length sequence, n = 3 samples need 24: 25 usable
    # pages for 8 slots (up to 64 pages in use) force preemptions.
    eng = ftjax.LLMEngine(model, max_slots=8, page_size=8, num_pages=26, chunk=4,
                          prefill_budget=16, prefill_rows=4, max_logprobs=4)
    work = _workload(2, 24) + _beam_workload(model, 5, 8)
    ids, got, _ = _drive(eng, work, seed=3)
    assert eng.stats()["preemptions"] > 0
    _check_against_generate(model, work, ids, got)
    _idle(eng)


def test_no_recompiles_and_no_leaks(engine):
    """After warm-up (the workload test), 200 requests with random lengths and options
    compile nothing; then a 1,000-request soak with random aborts (and 60 more, half
    of them beam searches) leaves 0 pages and 0 slots busy."""
    engine.warmup()  # (when run alone)
    before = dict(engine.trace_counts)
    _drive(engine, _workload(5, 200, max_budget=6), seed=6)
    assert dict(engine.trace_counts) == before
    _idle(engine)
    ids, _, aborted = _drive(engine, _workload(7, 1000, max_prompt=12, max_budget=3),
                             seed=8, abort_p=0.2)
    assert len(ids) == 1000 and aborted
    assert dict(engine.trace_counts) == before
    _idle(engine)
    # Beam searches aborted mid-search (their beams' pages forked) return every page.
    rng = random.Random(9)
    mix = _workload(8, 60, max_prompt=12, max_budget=3)
    for i in range(0, 60, 2):
        mix[i] = (mix[i][0], SP(max_new_tokens=rng.randint(1, 8), **rng.choice(BEAM_OPTIONS)))
    ids, _, aborted = _drive(engine, mix, seed=9, abort_p=0.3)
    assert aborted & {r for r, i in ids.items() if mix[i][1].num_beams > 1}
    assert dict(engine.trace_counts) == before
    _idle(engine)


def test_bad_input_is_rejected_and_disturbs_nothing(model, engine):
    rid = engine.add_request([1, 2, 3], SP(), max_new_tokens=5)
    with pytest.raises(ValueError, match="limit is 63"):
        engine.add_request(list(range(64)), SP())
    small = ftjax.LLMEngine(model, max_slots=2, page_size=8, num_pages=4)
    with pytest.raises(ValueError, match="pool has 3 usable pages"):
        small.add_request(list(range(30)), SP(), max_new_tokens=4)
    with pytest.raises(KeyError, match="req-nope"):
        engine.abort("req-nope")
    with pytest.raises(ValueError, match="num_beams > 1 does not support"):
        engine.add_request([1, 2], SP(num_beams=2, logprobs=1))
    with pytest.raises(ValueError, match="num_beams=9 exceeds the engine's max_slots=8"):
        engine.add_request([1, 2], SP(num_beams=9))
    with pytest.raises(ValueError, match="max_logprobs=4"):
        engine.add_request([1, 2], SP(logprobs=5))
    with pytest.raises(ValueError, match="max_slots=8"):
        engine.add_request([1, 2], SP(temperature=1.0, n=9))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 200])
    bad = np.full((2, model.config.embed_dim), np.nan, np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        engine.add_request([1, 2], soft_prompt=bad)
    with pytest.raises(ValueError, match=r"prompt_logprobs=5 exceeds.*max_logprobs=4"):
        engine.add_request([1, 2], SP(prompt_logprobs=5))
    with pytest.raises(KeyError, match="session-nope"):
        engine.add_request([1, 2], session="session-nope")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == [rid]
    _idle(engine)


def test_abort_frees_at_once_and_zero_budget(engine):
    a = engine.add_request(list(range(1, 20)), SP(), max_new_tokens=30)
    engine.step()
    assert engine.stats()["pages_in_use"] > 0
    engine.abort(a)
    _idle(engine)
    z = engine.add_request([1, 2], SP(), max_new_tokens=0)
    (o,) = engine.step()
    assert (o.request_id, o.new_tokens, o.finished, o.finish_reason) == (z, [], True, "length")
    _idle(engine)


def test_shared_prefix_arriving_together_is_computed_once(engine):
    stem = list(range(40, 64))                       # 3 pages of 8
    before = engine.stats()["prefill_tokens"]
    for tail in range(4):
        engine.add_request(stem + [tail + 1, tail + 2], SP(), max_new_tokens=2)
    while engine.has_unfinished():
        engine.step()
    # the first computes all 26 tokens; the others reuse the 3 stem pages, compute 2
    assert engine.stats()["prefill_tokens"] - before == 26 + 3 * 2
    _idle(engine)


def test_a_prompt_is_computed_ahead_of_a_free_slot(model):
    """One slot, 4 prompt tokens a step: while A decodes, B's prompt is computed but for
    its last chunk, which runs (with B's first tokens) in the step right after A frees
    the slot; B's tokens are still what generate gives it."""
    eng = ftjax.LLMEngine(model, max_slots=1, page_size=8, chunk=4, prefill_budget=4,
                          prefill_rows=1, max_logprobs=0)
    sp = SP(ignore_eos=True)
    a = eng.add_request([5, 6, 7], sp, max_new_tokens=16)
    b_prompt = list(range(10, 22))                   # 12 tokens: 3 prefill chunks
    b = eng.add_request(b_prompt, sp, max_new_tokens=6)
    first, done, got, step = {}, {}, {a: [], b: []}, 0
    while eng.has_unfinished():
        step += 1
        for o in eng.step():
            got[o.request_id] += o.new_tokens
            if o.new_tokens:
                first.setdefault(o.request_id, step)
            if o.finished:
                done[o.request_id] = step
        if b not in first and done.get(a) is None:
            assert eng.stats()["slots_busy"] == 1
    assert first[a] == 1 and done[a] == 4
    # Holding a slot through its prefill, B would start at step 7 (3 chunks after A).
    assert first[b] == done[a] + 1, (first, done)
    assert eng.stats()["prefill_tokens"] == 3 + 12
    ref = model.generate([[5, 6, 7], b_prompt], max_new_tokens=16,
                         sampling=[SP(ignore_eos=True, max_new_tokens=16),
                                   SP(ignore_eos=True, max_new_tokens=6)])
    assert got[a] == ref.tokens[0] and got[b] == ref.tokens[1]
    _idle(eng)


def test_generate_async_and_cancel(model, engine):
    work = [([1, 2, 3], SP(max_new_tokens=7)), ([4, 5], SP(temperature=1.0, seed=1, n=2))]

    async def collect(prompt, sp):
        toks = {}
        async for o in engine.generate_async(prompt, sp, max_new_tokens=9):
            toks.setdefault(o.sample, []).extend(o.new_tokens)
        return toks

    async def cancelled():
        async for _ in engine.generate_async([6, 7, 8], SP(), max_new_tokens=30):
            break  # closing the generator aborts the request

    async def main():
        return await asyncio.gather(*(collect(p, sp) for p, sp in work), cancelled())

    a, b, _ = asyncio.run(main())
    ref = model.generate([p for p, _ in work], max_new_tokens=9, sampling=[s for _, s in work])
    assert a[0] == ref.tokens[0] and [b[0], b[1]] == ref.tokens[1]
    _idle(engine)


@pytest.mark.slow
def test_pallas_paged_decode_kernel_gives_the_same_results():
    """kernels="pallas": decode reads the pages through the paged Pallas kernel
    (interpreted on CPU), prefill chunks through the gather; vs generate's contiguous
    Pallas path."""
    import jax
    from ftjax.api import Model
    from tiny import tiny_config, tiny_params

    cfg = tiny_config(max_positions=POSITIONS, eos_token_id=EOS)
    m = Model(cfg, jax.tree_util.tree_map(np.asarray, tiny_params(cfg, 4)), "float32",
              kernels="pallas")
    eng = ftjax.LLMEngine(m, max_slots=2, page_size=8, chunk=2, prefill_budget=8,
                          prefill_rows=2, max_logprobs=0)
    work = [(list(range(1, 12)), SP(max_new_tokens=6)),
            ([5, 6], SP(temperature=0.9, seed=2, max_new_tokens=5))]
    ids, got, _ = _drive(eng, work, seed=0)
    ref = m.generate([p for p, _ in work], sampling=[s for _, s in work])
    for rid, i in ids.items():
        assert got[rid][0]["streamed"] == ref.tokens[i]
        # interpreted kernels vs the contiguous ones: measured <= 4e-7
        np.testing.assert_allclose(got[rid][0]["lps"], ref.log_probs[i], atol=1e-5, rtol=0)
    _idle(eng)


@pytest.mark.slow
def test_tensor2_data2_mesh_gives_the_same_results():
    """On a TP=2 x DP=2 mesh of virtual devices (tests/conftest.py): pools split by kv
    head on "tensor"; results as `generate` on the same mesh model."""
    import jax
    from ftjax.api import Model
    from tiny import tiny_config, tiny_params

    cfg = tiny_config(max_positions=POSITIONS, eos_token_id=EOS)
    m = Model(cfg, jax.tree_util.tree_map(np.asarray, tiny_params(cfg, 4)), "float32",
              mesh=ftjax.make_mesh(tensor=2, data=2))
    eng = ftjax.LLMEngine(m, max_slots=4, page_size=8, chunk=4, prefill_budget=16,
                          prefill_rows=4, max_logprobs=4)
    work = _workload(9, 12) + _beam_workload(m, 13, 6)     # beams of 3 and 4
    ids, got, _ = _drive(eng, work, seed=10)
    _check_against_generate(m, work, ids, got)
    assert eng.state.cache.k.sharding.spec[2] == "tensor"
    assert eng.trace_counts["decode"] <= len(eng.row_buckets)
    assert max(v for k, v in eng.trace_counts.items() if k != "decode") == 1
    _idle(eng)


def test_soft_prompts_and_prompt_logprobs_equal_generate(model, engine):
    rng = np.random.default_rng(0)
    e = model.config.embed_dim
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [21, 22, 23], list(range(30, 52)), [7]]
    softs = [rng.normal(size=(3, e)).astype(np.float32), None,
             rng.normal(size=(6, e)).astype(np.float32), None]
    sps = [SP(prompt_logprobs=2, logprobs=1), SP(prompt_logprobs=4),
           SP(temperature=0.9, seed=3), SP(prompt_logprobs=0)]
    ref = model.generate(prompts, max_new_tokens=6, sampling=sps, soft_prompts=softs)
    rids = [engine.add_request(p, sp, 6, soft_prompt=s) for p, sp, s in zip(prompts, sps, softs)]
    outs = list(engine.iterate(rids))
    for i, rid in enumerate(rids):
        seq = serving.sequences([o for o in outs if o.request_id == rid], 1)
        assert seq.tokens[0] == ref.tokens[i], i
        np.testing.assert_allclose(seq.log_probs[0], ref.log_probs[i], atol=1e-5)
        want = ref.prompt_logprobs[i] if ref.prompt_logprobs else None
        if sps[i].prompt_logprobs is None:
            assert seq.prompt_logprobs is None
            continue
        assert len(seq.prompt_logprobs) == len(prompts[i]) and seq.prompt_logprobs[0] is None
        for a, b in zip(seq.prompt_logprobs[1:], want[1:]):
            assert sorted(a) == sorted(b)
            # fp32, chunked prefill vs one call: matmul shapes differ (measured <= 1e-6)
            np.testing.assert_allclose([a[t] for t in sorted(a)], [b[t] for t in sorted(b)],
                                       atol=1e-5)
    _idle(engine)


def test_session_keeps_its_pages_between_turns(model, engine):
    sid = engine.open_session()
    first = list(range(1, 21))
    (o,) = [o for o in engine.iterate([engine.add_request(first, SP(), 5, session=sid)])
            if o.finished]
    s = engine.stats()
    assert s["sessions_kept"] == 1 and s["pages_in_use"] > 0 and s["slots_busy"] == 0
    before = s["prefill_tokens"]
    second = first + o.tokens + [30, 31, 32]
    outs = list(engine.iterate([engine.add_request(second, SP(), 6, session=sid)]))
    # only the 3 new tokens and the last reply token (sampled, never fed) are computed
    assert engine.stats()["prefill_tokens"] - before == 4
    assert serving.sequences(outs, 1).tokens[0] == model.generate([second], 6).tokens[0]
    engine.close_session(sid)
    _idle(engine)
    with pytest.raises(KeyError, match=sid):
        engine.add_request(second, SP(), 2, session=sid)


def test_kept_session_pages_give_way_to_new_requests(model):
    # 9 usable pages of 8 tokens: a kept 40-token conversation (5 pages) must be given up
    # for a request needing 7 pages; the session's next turn then recomputes, same result.
    eng = ftjax.LLMEngine(model, max_slots=2, page_size=8, num_pages=10, chunk=4)
    sid = eng.open_session()
    talk = list(range(1, 38))
    out = list(eng.iterate([eng.add_request(talk, SP(), 4, session=sid)]))
    talk += serving.sequences(out, 1).tokens[0]
    assert eng.stats()["sessions_kept"] == 1
    big = list(range(40, 90))
    list(eng.iterate([eng.add_request(big, SP(), 4)]))
    assert eng.stats()["sessions_kept"] == 0
    out = list(eng.iterate([eng.add_request(talk + [5], SP(), 3, session=sid)]))
    assert serving.sequences(out, 1).tokens[0] == model.generate([talk + [5]], 3).tokens[0]
    eng.close_session(sid)
    _idle(eng)
