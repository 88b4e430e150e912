"""The lm-evaluation-harness backend (`ftjax.lm_eval`) against lm-eval's own `hf` backend.

Both run the same tiny random GPT-2 (vocabulary and tokenizer of the bundled model,
64 positions so rolling documents span several windows) on local tasks written by the
test (tests/lm_eval_tasks.py): loglikelihood, multiple choice, rolling perplexity and
generate_until. No hub: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set.

Tolerance 1e-4 relative on every metric and per-request log-likelihood: both compute
in float32 and differ only in summation order (~1e-6 relative here); a wrong window,
off-by-one target or missed prefix token moves them by far more (a whole token's
log-prob, >1e-2 relative).
"""

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

import ftjax  # noqa: E402
from lm_eval_tasks import LINES, TASKS, write_tasks  # noqa: E402

pytestmark = pytest.mark.torch
REL = 1e-4
MAX_LEN = 63  # max_positions - 1: `ftjax eval --window 64 --stride 63` scores the same tokens


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from hf_models import make_gpt2

    d = tmp_path_factory.mktemp("tiny-gpt2-tok")
    make_gpt2(d, vocab_size=4096, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    demo = ftjax.demo_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(demo, name), d / name)
    return str(d)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(str(tmp_path_factory.mktemp("lm-eval-tasks")))


def _evaluate(model, model_args, tasks_dir, **kw):
    import ftjax.lm_eval  # noqa: F401  (registers "ftjax")
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=sorted(TASKS),
        # Only the test's tasks: indexing lm-eval's thousands of built-in YAMLs takes ~20 s.
        task_manager=TaskManager(include_path=tasks_dir, include_defaults=False),
        bootstrap_iters=0, log_samples=True, **kw)


@pytest.fixture(scope="module")
def both(offline, tiny_dir, tasks_dir):
    ours = _evaluate("ftjax", f"pretrained={tiny_dir},dtype=float32,max_length={MAX_LEN}",
                     tasks_dir, batch_size=4)
    # batch_size=1: HF's generate_until left-pads batches; one row at a time is plain
    # HF greedy decoding, the reference for generate_until.
    ref = _evaluate("hf", f"pretrained={tiny_dir},dtype=float32,max_length={MAX_LEN}",
                    tasks_dir, batch_size=1, device="cpu")
    return ours, ref


def _metrics(results, task):
    return {k: v for k, v in results["results"][task].items()
            if isinstance(v, float) and not k.endswith("_stderr,none")}


@pytest.mark.parametrize("task", ["ftjax_ll", "ftjax_mc", "ftjax_ppl"])
def test_scores_equal_lm_eval_hf_backend(both, task):
    ours, ref = both
    got, want = _metrics(ours, task), _metrics(ref, task)
    assert set(got) == set(want) and got, (got, want)
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=REL), (task, k, got[k], want[k])
    # Per request, not only the aggregate (a mean can hide compensating errors).
    for a, b in zip(ours["samples"][task], ref["samples"][task]):
        assert a["doc_id"] == b["doc_id"]
        for (ll_a, *greedy_a), (ll_b, *greedy_b) in zip(
                [r if isinstance(r, (list, tuple)) else [r] for r in a["filtered_resps"]],
                [r if isinstance(r, (list, tuple)) else [r] for r in b["filtered_resps"]]):
            assert math.isclose(float(ll_a), float(ll_b), rel_tol=REL), (task, ll_a, ll_b)
            assert [bool(g) for g in greedy_a] == [bool(g) for g in greedy_b]
    print(f"\n{task}: {got}")


def test_rolling_documents_span_several_windows(tiny_dir):
    from ftjax.lm_eval import FtjaxLM

    lm = FtjaxLM(pretrained=tiny_dir, max_length=MAX_LEN)
    n = len(lm.tok_encode("\n\n".join(LINES)))
    assert n > 2 * MAX_LEN, n  # the rolling test above exercises window boundaries


def test_generate_until_equals_hf_greedy(both, tiny_dir):
    from hf_models import hf_greedy

    ours, ref = both
    got = [s["filtered_resps"][0] for s in ours["samples"]["ftjax_gen"]]
    want = [s["filtered_resps"][0] for s in ref["samples"]["ftjax_gen"]]
    assert got == want
    assert sum(len(t) > 0 for t in got) >= len(got) // 2, got  # not trivially empty
    # And against HF generate called directly (no lm-eval code on the reference side).
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    for s, text in zip(ours["samples"]["ftjax_gen"], got):
        ctx = s["doc"]["context"]
        ids = hf_greedy(hf, tok.encode(ctx), 12, eos=0)
        assert tok.decode(ids, skip_special_tokens=True).split("\n")[0] == text


def test_bad_model_args_are_named(tiny_dir):
    from ftjax.lm_eval import FtjaxLM

    with pytest.raises(ValueError, match="unknown model_args.*'temprature'"):
        FtjaxLM(pretrained=tiny_dir, temprature=0.5)
    with pytest.raises(ValueError, match="max_length must be in"):
        FtjaxLM(pretrained=tiny_dir, max_length=65)


@pytest.mark.slow
def test_cli_lm_eval_and_ftjax_eval_agree_on_perplexity(offline, tiny_dir, tasks_dir,
                                                         tmp_path, both):
    """`ftjax lm-eval` (subprocess) scores the rolling task like the Python API, and
    `ftjax eval` on the same text (the prefix token written first, windows of 64 moved
    by 63: exactly lm-eval's disjoint windows of 63 predictions) gives the same
    perplexity."""
    import json

    from ftjax.lm_eval import FtjaxLM

    docs = [json.loads(line)["text"] for line in open(os.path.join(tasks_dir, "ppl.jsonl"))]
    lm = FtjaxLM(pretrained=tiny_dir, max_length=MAX_LEN)
    # Whole windows only: lm-eval's last, partial window looks back a full window for
    # context, a strided window does not (they would differ there by design).
    text = lm.tok_decode(lm.tok_encode(docs[0])[:2 * MAX_LEN])
    assert len(lm.tok_encode(text)) == 2 * MAX_LEN

    class Req:
        args = (text,)

    ll = lm.loglikelihood_rolling([Req()])[0]
    n = len(lm.tok_encode(text))
    lm_eval_ppl = math.exp(-ll / n)

    f = tmp_path / "doc.txt"
    f.write_text("<|endoftext|>" + text)  # the prefix token lm-eval conditions on
    out = subprocess.run(
        [sys.executable, "-m", "ftjax", "eval", "--model", tiny_dir, "--text", str(f),
         "--window", "64", "--stride", "63"], capture_output=True, text=True, check=True)
    row = next(line.split() for line in out.stdout.splitlines() if line.startswith("ftjax"))
    assert int(row[3]) == n  # the same tokens scored
    assert math.isclose(float(row[1]), lm_eval_ppl, rel_tol=REL), (row, lm_eval_ppl)

    out = subprocess.run(
        [sys.executable, "-m", "ftjax", "lm-eval", "--model_args",
         f"pretrained={tiny_dir},max_length={MAX_LEN}", "--tasks", "ftjax_ppl",
         "--include_path", tasks_dir, "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.load(open(next(p for p in (tmp_path / "out").rglob("results_*.json"))))
    want = both[0]["results"]["ftjax_ppl"]["word_perplexity,none"]  # the Python API's
    assert math.isclose(res["results"]["ftjax_ppl"]["word_perplexity,none"], want, rel_tol=REL)
    assert "ftjax_ppl" in out.stdout  # lm-eval's results table printed
    assert np.isfinite(want)
