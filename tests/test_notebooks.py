"""Every notebook in examples/notebooks runs top to bottom (papermill, a fresh kernel).

The notebooks are jupytext py:percent sources; each test converts one to .ipynb and
executes it with small parameters on tiny local models, so a notebook that raises (its
own accuracy asserts included) fails here. compare_with_hf also runs on a tiny random HF
GPT-2 it never saw (`-p model_path DIR`), and its perplexity is checked against the
lm-eval backend's.
"""

import json
import os
import shutil

import pytest

papermill = pytest.importorskip("papermill")
jupytext = pytest.importorskip("jupytext")

import ftjax  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "examples", "notebooks")


def run_notebook(name, tmp_path, **parameters):
    """Executes examples/notebooks/NAME.py with `parameters`; returns the output path."""
    import nbformat

    nb = jupytext.read(os.path.join(NOTEBOOKS, name + ".py"))
    src = tmp_path / f"{name}.ipynb"
    nbformat.write(nb, str(src))
    out = tmp_path / f"{name}.out.ipynb"
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    # The kernel is a fresh process: it inherits this environment (the repo first on its
    # path, so the worktree's ftjax is the one imported). XLA_FLAGS is not inherited
    # from conftest's 8 devices unless a notebook sets it itself (sharding does).
    os.environ.update(env)
    flags = os.environ.pop("XLA_FLAGS", None)
    try:
        papermill.execute_notebook(str(src), str(out), parameters=parameters, cwd=NOTEBOOKS,
                                   kernel_name="python3", progress_bar=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if flags is not None:
            os.environ["XLA_FLAGS"] = flags
    return out


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny random HF GPT-2 with the bundled model's tokenizer (the notebooks read text)."""
    from hf_models import make_gpt2

    d = tmp_path_factory.mktemp("nb-gpt2")
    make_gpt2(d, vocab_size=4096, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ftjax.demo_model_path(), name), d / name)
    return str(d)


def test_compare_with_hf_on_the_bundled_model(tmp_path):
    res = tmp_path / "r.json"
    run_notebook("compare_with_hf", tmp_path, n_prompts=4, new_tokens=16, max_tokens=1100,
                 results_path=str(res), figure_path=str(tmp_path / "f.png"))
    r = json.loads(res.read_text())
    assert r["float32"]["greedy_identical"] == 4
    assert r["float32"]["max_abs_dlogit"] < 1e-3
    assert os.path.getsize(tmp_path / "f.png") > 10_000


def test_compare_with_hf_on_a_model_it_never_saw(tmp_path, tiny_gpt2):
    """`-p model_path <an HF GPT-2 dir>`; the notebook's perplexity equals the lm-eval
    backend's on lm-eval's windows (the notebook asserts 1e-4 itself; checked again here)."""
    pytest.importorskip("lm_eval")
    res = tmp_path / "r.json"
    run_notebook("compare_with_hf", tmp_path, model_path=tiny_gpt2, n_prompts=4,
                 new_tokens=16, max_tokens=600, results_path=str(res))
    r = json.loads(res.read_text())
    ppl = r["perplexity"]
    assert abs(ppl["lm-eval (ftjax backend)"] / ppl["ftjax, lm-eval's windows"] - 1) < 1e-4
    assert abs(ppl["ftjax"] / ppl["hf"] - 1) < 1e-4
    assert r["float32"]["token_agreement"] == 1.0
