"""ftjax checkpoints as orbax: canonical params restored straight onto a mesh.

A directory holding:
  ftjax_config.json  {"format": "ftjax-orbax", "version": 1, "dtype", "config"}
  params/            an orbax (tensorstore) checkpoint of the canonical params pytree
  tokenizer files    copied from the source checkpoint, when it had them.

`load_orbax(path, shardings)` restores each parameter with the given sharding:
every process reads only the shards its devices hold, so a model larger than
one host's memory loads on many hosts.
"""

from __future__ import annotations

import json
import os

import jax

from converters.native import CONFIG_NAME, copy_tokenizer, read_meta
from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from ftjax.specs import flatten, shapes as param_shapes

FORMAT = "ftjax-orbax"
VERSION = 1
PARAMS_DIR = "params"


def is_orbax(directory: str) -> bool:
    return (os.path.exists(os.path.join(directory, CONFIG_NAME))
            and os.path.isdir(os.path.join(directory, PARAMS_DIR)))


def save_orbax(directory: str, cfg: ModelConfig, params, dtype_name: str, source: str = None):
    """Writes `params` (numpy or jax arrays, canonical layout) as an orbax checkpoint."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, PARAMS_DIR)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(target, params, force=True)
        ckpt.wait_until_finished()
    meta = {"format": FORMAT, "version": VERSION, "dtype": dtype_name, "config": cfg.to_dict()}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    copy_tokenizer(source, directory)


def load_orbax(directory: str, shardings=None, dtype=None):
    """Restores (ModelConfig, params of jax arrays, stored dtype name).

    Args:
      shardings: optional pytree of `jax.sharding.Sharding`, one per canonical param
        (e.g. from `ftjax.sharding`); default: everything on the first device.
      dtype: optional dtype to restore as (cast while reading).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    meta, cfg = read_meta(directory, FORMAT, VERSION)
    stored = meta.get("dtype", "float32")
    shapes = param_shapes(cfg)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, shapes)
    abstract = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or stored, sharding=sh),
        shapes, shardings)
    target = os.path.join(directory, PARAMS_DIR)
    _check_stored_shapes(target, shapes)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(target, abstract)
    except Exception as e:  # orbax raises bare Exception around tensorstore's errors
        raise CheckpointError(f"{target}: cannot restore the canonical params of the "
                              f"config in {CONFIG_NAME} ({_brief(e)})"
                              ) from e
    return cfg, params, stored


def _check_stored_shapes(target: str, shapes) -> None:
    """Compares the stored arrays' metadata with the config's canonical shapes, so a
    mismatch is reported by name before any read starts."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckpt:
            meta = ckpt.metadata(target)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{target}: not a readable orbax checkpoint "
                              f"({_brief(e)})") from e
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if not isinstance(tree, dict):
        return  # another orbax metadata layout: restore reports problems itself
    stored = {k: tuple(getattr(v, "shape", ())) for k, v in flatten(tree).items()}
    expected = {k: tuple(v.shape) for k, v in flatten(shapes).items()}
    for key in sorted(set(stored) | set(expected)):
        if stored.get(key) != expected.get(key):
            raise CheckpointError(
                f"{target}: tensor {key!r} is stored as {stored.get(key)} but the config in "
                f"{CONFIG_NAME} needs {expected.get(key)}: cannot restore")


def _brief(e: Exception, limit: int = 300) -> str:
    """The gist of a tensorstore error: its first line, shortened (the full text, a
    C++ status with a stack of contexts, runs to 150 lines)."""
    seen = []
    while e is not None and e not in seen:  # the innermost error says what broke
        seen.append(e)
        e = e.__cause__ or e.__context__
    e = seen[-1]
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
