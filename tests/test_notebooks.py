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
    # d_model 128: int8-g128 has whole groups.
    make_gpt2(d, vocab_size=4096, n_positions=128, n_embd=128, n_layer=2, n_head=4)
    # generation_config.json too (sampling with repetition penalty 1.2): HF's greedy
    # reference in compare_with_hf must not pick up the checkpoint's processors.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(ftjax.demo_model_path(), name), d / name)
    return str(d)


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


def test_quantization(tmp_path, tiny_gpt2):
    res = tmp_path / "r.json"
    run_notebook("quantization", tmp_path, model_path=tiny_gpt2, n_windows=2, n_prompts=4,
                 new_tokens=8, compare_hf=True, results_path=str(res))
    r = json.loads(res.read_text())
    assert set(r["rows"]) == {"float32", "int8", "int8-g128", "w8a8", "kv int8"}
    assert r["rows"]["int8"]["hf_dequantized_max_dlogit"] < 1e-3
    # per-layer errors: one per layer, below the half-step bound (127 levels: < 1%)
    assert all(len(v) == 2 and max(v) < 0.01 for v in r["weight_error"]["int8"].values())


def test_sharding(tmp_path, tiny_gpt2):
    res = tmp_path / "r.json"
    run_notebook("sharding", tmp_path, model_path=tiny_gpt2, meshes=["tp4xdp2", "pp2"],
                 dtypes=["float32"], n_prompts=2, new_tokens=8, results_path=str(res))
    r = json.loads(res.read_text())
    assert r["tokens_identical"] == [[True], [True]]   # pipeline parallelism runs too
    assert max(e[0] for e in r["max_abs_dlogit"]) <= 1e-4
    assert r["not_run"] == {}


def test_checkpoints_with_megatron(tmp_path, tiny_gpt2):
    """Every conversion ftjax writes, plus a Megatron-LM TP=2 checkpoint of the same
    weights (written by tests/megatron_ckpt.py, independently of ftjax's reader)."""
    import transformers
    from megatron_ckpt import gpt2_weights, write_megatron

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    c = hf.config
    args = {"num_layers": c.n_layer, "hidden_size": c.n_embd,
            "num_attention_heads": c.n_head, "max_position_embeddings": c.n_positions,
            "ffn_hidden_size": 4 * c.n_embd, "padded_vocab_size": c.vocab_size,
            "layernorm_epsilon": c.layer_norm_epsilon, "group_query_attention": False,
            "num_query_groups": 1}
    root = write_megatron(tmp_path / "megatron", gpt2_weights(hf), c.n_layer, tp=2, args=args)
    # Megatron keeps a GPT-2 BPE pair beside the checkpoint: the bundled tokenizer's.
    tj = json.load(open(os.path.join(ftjax.demo_model_path(), "tokenizer.json")))
    with open(os.path.join(root, "vocab.json"), "w") as f:
        json.dump(tj["model"]["vocab"], f)
    with open(os.path.join(root, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for m in tj["model"]["merges"]:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    res = tmp_path / "r.json"
    run_notebook("checkpoints", tmp_path, model_path=tiny_gpt2, n_prompts=2, prompt_len=16,
                 extra_checkpoints={"megatron tp2": str(root)}, results_path=str(res))
    r = json.loads(res.read_text())
    assert not any("error" in v for v in r.values()), r
    assert r["megatron tp2"]["max_abs_dlogit"] < 1e-4
    assert r["hf export"]["hf_reload_max_abs_dlogit"] < 1e-4
