"""Pallas GPU kernels (decode attention, paged decode attention, prefill attention, int8
weight-only matmul), each with a jnp reference beside it.

Written for the Pallas Triton backend (Ampere / Hopper). On CPU they run only with
`interpret=True` (tests); each has a plain-jnp reference with the same arguments.
"""

# jax >= 0.12 imports pallas' fuser lazily, the first time a pallas_call is traced, and
# it registers a config value that is part of every jit cache key: every function
# compiled before that point would compile once more afterwards. Importing it here,
# before anything is compiled, keeps the key stable.
try:
    import jax.experimental.pallas.fuser  # noqa: F401
except ImportError:  # older jax: no fuser module, nothing registered lazily
    pass

from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.flash_prefill import prefill_attention, prefill_attention_reference
from pallas_kernels.int8_matmul import dequantize as dequantize_int8
from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_reference
from pallas_kernels.int8_matmul import quantize as quantize_int8
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference

__all__ = ["decode_attention", "decode_attention_reference", "dequantize_int8", "int8_matmul",
           "int8_matmul_reference", "paged_attention", "paged_attention_reference",
           "prefill_attention", "prefill_attention_reference", "quantize_int8"]
