"""Pallas GPU kernels (decode attention, int8 matmul) with jnp references beside them.

Written for the Pallas Triton backend (Ampere / Hopper). On CPU they run only with
`interpret=True` (tests); each has a plain-jnp reference with the same arguments.
"""

from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.int8_matmul import dequantize as dequantize_int8
from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_reference
from pallas_kernels.int8_matmul import quantize as quantize_int8

__all__ = ["decode_attention", "decode_attention_reference", "dequantize_int8", "int8_matmul",
           "int8_matmul_reference", "quantize_int8"]
