"""Checkpoint converters: every supported format -> (ModelConfig, canonical params).

Canonical params (numpy leaves here; `ftjax.load` places them on devices):
attention unfused with heads explicit (q `[D, N, H]`, k/v `[D, K, H]`,
o `[N, H, D]`), MLP `wi [D, F]`, `wo [F, D]`, block weights stacked on a leading
layers axis. Fused layouts are de-interleaved here, once, at load.
"""

from converters.hf import ARCHITECTURES, load_hf
from converters.native import is_native, load_native, save_native
from converters.orbax_ckpt import is_orbax, load_orbax, save_orbax


def load_checkpoint(directory: str):
    """(ModelConfig, params) from an ftjax (orbax or native) or HuggingFace directory."""
    if is_orbax(directory):
        cfg, params, _ = load_orbax(directory)
        return cfg, params
    if is_native(directory):
        cfg, params, _ = load_native(directory)
        return cfg, params
    return load_hf(directory)


__all__ = ["ARCHITECTURES", "load_checkpoint", "load_hf", "load_native", "load_orbax",
           "save_native", "save_orbax"]
