"""CUDA lowering on this CPU-only machine, shared by the kernel tests."""

import warnings

import jax


def lower_for_cuda(fn, *args):
    """Lowers `fn` for CUDA on this CPU-only machine; returns the StableHLO text.

    Triton lowering needs a target GPU: jax 0.12 reads it from the abstract mesh's
    device (an H100 here: compute capability 9.0); jax 0.10 accepts it as well.
    """
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None,
                                      platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Triton backend, jax >= 0.11
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()
