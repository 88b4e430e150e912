"""ftjax vs HuggingFace GPT2LMHeadModel on tiny random checkpoints (fp32).

Tolerance: 1e-4 max abs on logits. Both sides compute in float32 with the same
op order up to matmul blocking; observed differences are ~1e-6, so 1e-4 leaves
room for BLAS differences while catching any layout or formula error (those
give O(0.1..1) errors at these weight scales).
"""

import numpy as np
import pytest

import ftjax
from hf_models import EPS, LOW_TOL_EPS, check_low_precision, hf_greedy, hf_logits, make_gpt2

pytestmark = pytest.mark.torch
ATOL = 1e-4
NO_STOP = ftjax.SamplingParams(stop_token_ids=[])

CONFIGS = {
    "base": {},
    "heads_not_pow2": dict(n_embd=60, n_head=5, n_layer=2),
    "n_inner_relu": dict(n_inner=72, activation_function="relu"),
    "gelu_exact": dict(activation_function="gelu", layer_norm_epsilon=1e-3),
    "untied_head": dict(tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_gpt2(d, **CONFIGS[request.param])
    return hf, ftjax.load(str(d))


def test_logits_match_hf(pair):
    hf, model = pair
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (3, 17))
    ours = np.asarray(model.forward(ids))
    ref = hf_logits(hf, ids)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= ATOL


def test_greedy_32_tokens_match_hf(pair):
    hf, model = pair
    prompt = [3, 14, 15, 92, 65]
    out = model.generate([prompt], max_new_tokens=32, sampling=NO_STOP)
    assert out.tokens[0] == hf_greedy(hf, prompt, 32)
    assert out.finish_reasons == ["length"]
    assert len(set(out.tokens[0])) > 1  # a varied continuation, not one repeated token


def test_stops_at_eos_like_hf(tmp_path):
    probe = make_gpt2(tmp_path / "probe")
    prompt = [7, 8, 9]
    free = hf_greedy(probe, prompt, 20)
    eos = free[6]
    hf = make_gpt2(tmp_path / "eos", eos_token_id=eos)
    model = ftjax.load(str(tmp_path / "eos"))
    ref = hf_greedy(hf, prompt, 20, eos=eos)
    out = model.generate([prompt], max_new_tokens=20)
    assert out.tokens[0] == ref and ref[-1] == eos and len(ref) <= 7
    assert out.finish_reasons == ["stop"]


def test_pytorch_bin_checkpoint(tmp_path):
    hf = make_gpt2(tmp_path, safe=False)
    model = ftjax.load(str(tmp_path))
    ids = np.arange(12).reshape(2, 6)
    assert np.abs(np.asarray(model.forward(ids)) - hf_logits(hf, ids)).max() <= ATOL


def test_log_probs_are_hf_log_softmax(pair):
    import torch

    hf, model = pair
    prompt = [1, 2, 3, 4]
    out = model.generate([prompt], max_new_tokens=6, sampling=NO_STOP)
    seq = prompt + out.tokens[0]
    logits = torch.tensor(hf_logits(hf, [seq[:-1]]))[0]
    ref = torch.log_softmax(logits, -1)[len(prompt) - 1:, :]
    ref = ref[torch.arange(6), torch.tensor(out.tokens[0])].numpy()
    assert np.allclose(out.log_probs[0], ref, atol=ATOL)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_close_to_hf(tmp_path, dtype):
    """bf16 / fp16 against HF in the same dtype; tolerances: `check_low_precision`."""
    hf32 = make_gpt2(tmp_path, initializer_range=0.15)
    ids = np.random.default_rng(4).integers(0, 211, (8, 33))
    check_low_precision(tmp_path, hf32, dtype, ids, label="gpt2")


def test_batched_decode_matches_hf(pair):
    """Five prompts decoded together: a decode step's 2..5 live rows go through the native
    CPU kernels (each thread a range of weight rows; a tied float32 LM head at 4..8 rows
    with the rows in vector lanes). Each row's greedy tokens = HF's for that prompt alone
    (both stopping at eos), and its log-probs = HF's log-softmax within ATOL."""
    import torch

    hf, model = pair
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 200, n).tolist() for n in (3, 5, 7, 4, 6)]
    out = model.generate(prompts, max_new_tokens=12)  # rows end at eos (0) or 12 tokens
    assert max(len(t) for t in out.tokens) == 12
    for prompt, toks, lps in zip(prompts, out.tokens, out.log_probs):
        assert toks == hf_greedy(hf, prompt, 12, eos=0)
        seq = prompt + toks
        ref = torch.log_softmax(torch.tensor(hf_logits(hf, [seq[:-1]]))[0], -1)
        ref = ref[len(prompt) - 1:][torch.arange(len(toks)), torch.tensor(toks)].numpy()
        assert np.abs(np.asarray(lps) - ref).max() <= ATOL


def test_bf16_batched_decode_close_to_hf(tmp_path):
    """bf16 decode at 4 rows (the CPU kernel multiplies bf16 pairs where the CPU has
    them) against HF in bf16, teacher-forced on ftjax's tokens: the chosen tokens'
    log-probs within `check_low_precision`'s bounds (16 eps of the logit scale, and at
    most twice HF's own bf16-vs-fp32 error at those positions)."""
    import torch
    import transformers

    hf32 = make_gpt2(tmp_path, initializer_range=0.15)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.bfloat16).eval()
    model = ftjax.load(str(tmp_path), dtype="bfloat16")
    prompts = np.random.default_rng(6).integers(1, 200, (4, 9)).tolist()
    new = 8
    out = model.generate(prompts, max_new_tokens=new, sampling=NO_STOP)
    seqs = [p + t for p, t in zip(prompts, out.tokens)]
    ids = np.asarray([s[:-1] for s in seqs])
    ls = lambda m: torch.log_softmax(torch.tensor(hf_logits(m, ids)), -1)[:, 8:].numpy()
    ref, ref32 = ls(hf), ls(hf32)
    chosen = np.take_along_axis(ref, np.asarray(out.tokens)[:, :, None], -1)[..., 0]
    ours = np.asarray(out.log_probs)
    assert np.isfinite(ours).all()
    err = np.abs(ours - chosen).max()
    scale = np.abs(hf_logits(hf32, ids)).max()
    assert err <= LOW_TOL_EPS * EPS["bfloat16"] * scale
    assert err <= 2 * np.abs(ref - ref32).max()
