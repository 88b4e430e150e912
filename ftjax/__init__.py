"""ftjax: GPT-family inference on JAX/XLA (FasterTransformer's feature set, native to JAX).

    import ftjax
    model = ftjax.load("path/to/hf_checkpoint")             # or ftjax.demo_model_path()
    out = model.generate(["def fibonacci(n):"], max_new_tokens=32)
    model = ftjax.load(path, mesh=ftjax.make_mesh(tensor=4, data=2))   # sharded

The public names are imported on first use (PEP 562), so `import ftjax` and the
`ftjax` command's `--help` and argument errors do not import jax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ftjax.assets import demo_model_path
from ftjax.errors import CheckpointError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "GenerateOutput": "ftjax.api", "Model": "ftjax.api", "StreamEvent": "ftjax.api",
    "load": "ftjax.api", "ModelConfig": "ftjax.config", "preset": "ftjax.config",
    "SamplingParams": "ftjax.sampling", "make_mesh": "ftjax.sharding",
}

__all__ = ["CheckpointError", "GenerateOutput", "Model", "ModelConfig", "SamplingParams",
           "StreamEvent", "demo_model_path", "load", "make_mesh", "preset"]

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on demand
    from ftjax.api import GenerateOutput, Model, StreamEvent, load
    from ftjax.config import ModelConfig, preset
    from ftjax.sampling import SamplingParams
    from ftjax.sharding import make_mesh


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ftjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
