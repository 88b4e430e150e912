"""ftjax: GPT-family inference on JAX/XLA (FasterTransformer's feature set, native to JAX).

    import ftjax
    model = ftjax.load("path/to/hf_checkpoint")             # or ftjax.demo_model_path()
    out = model.generate(["def fibonacci(n):"], max_new_tokens=32)
    model = ftjax.load(path, mesh=ftjax.make_mesh(tensor=4, data=2))   # sharded
"""

from ftjax.api import GenerateOutput, Model, StreamEvent, load
from ftjax.assets import demo_model_path
from ftjax.config import ModelConfig, preset
from ftjax.errors import CheckpointError
from ftjax.sampling import SamplingParams
from ftjax.sharding import make_mesh

__version__ = "0.1.0"

__all__ = ["CheckpointError", "GenerateOutput", "Model", "ModelConfig", "SamplingParams",
           "StreamEvent", "demo_model_path", "load", "make_mesh", "preset"]
