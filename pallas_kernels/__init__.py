"""Pallas GPU kernels (decode attention, int8 matmul) with jnp references beside them."""
