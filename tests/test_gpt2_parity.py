"""ftjax vs HuggingFace GPT2LMHeadModel on tiny random checkpoints (fp32).

Tolerance: 1e-4 max abs on logits. Both sides compute in float32 with the same
op order up to matmul blocking; observed differences are ~1e-6, so 1e-4 leaves
room for BLAS differences while catching any layout or formula error (those
give O(0.1..1) errors at these weight scales).
"""

import numpy as np
import pytest

import ftjax
from hf_models import check_low_precision, hf_greedy, hf_logits, make_gpt2

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
