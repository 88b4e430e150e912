"""Activation names of each checkpoint format -> `ModelConfig.activation`, in one place.

HuggingFace configs name the activation by `transformers.activations.ACT2FN` keys:
"gelu" is the exact (erf) GELU, "gelu_new" and "gelu_pytorch_tanh" the tanh
approximation, "swish" is "silu". FasterTransformer's config.ini `activation_type`
"Gelu" is the tanh approximation. NeMo's yaml names the MLP ("fast-swiglu": SwiGLU).
A name missing here is refused by the converter (naming the key), never loaded
with another activation.
"""

from __future__ import annotations

from converters.rules import require_value

HF = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
      "relu": "relu", "silu": "silu", "swish": "silu"}
# FasterTransformer config.ini activation_type (lower-cased) -> ftjax.
FT = {"gelu": "gelu_new", "relu": "relu"}
# NeMo model_config.yaml activation -> Megatron's args.swiglu (else GELU, as Megatron's).
NEMO_SWIGLU = {"gelu": False, "fast-swiglu": True, "swiglu": True}


def hf_activation(hf: dict, key: str, where: str, default: str) -> str:
    """The ftjax activation of config.json `key` (absent: `default`, an HF name);
    CheckpointError naming the key for a name without an ftjax activation."""
    return HF[require_value(hf, key, list(HF), where, default)]
