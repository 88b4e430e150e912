"""ftjax: GPT-family inference on JAX/XLA (FasterTransformer's feature set, native to JAX).

    import ftjax
    model = ftjax.load("path/to/hf_checkpoint")             # or ftjax.demo_model_path()
    out = model.generate(["def fibonacci(n):"], max_new_tokens=32)
    model = ftjax.load(path, mesh=ftjax.make_mesh(tensor=4, data=2))   # sharded

The public names below are imported on first use (PEP 562), so `import ftjax.config`
or `import ftjax.numerics` (from the converters and the kernels, lower layers) never
pulls in the runtime above them, and `ftjax --help` starts without importing jax.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "ftjax.errors",
    "GenerateOutput": "ftjax.api",
    "Model": "ftjax.api",
    "ModelConfig": "ftjax.config",
    "SamplingParams": "ftjax.sampling",
    "StreamEvent": "ftjax.api",
    "demo_model_path": "ftjax.assets",
    "load": "ftjax.api",
    "make_mesh": "ftjax.sharding",
    "preset": "ftjax.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'ftjax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
