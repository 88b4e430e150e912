"""Tensor and data parallelism on `jax.sharding` meshes.

The model names no mesh axes. Every array it reads or writes has *logical* axes
(vocab, embed, heads, kv_heads, ffn, layers, batch, cache_seq, ...); ONE rules
table (`RULES`) maps them to the mesh axes ("data", "pipe", "tensor"), and the
parameter spec table (`ftjax.specs`) gives the logical axes of each param. XLA's partitioner
then inserts the collectives: with q/k/v/wi/wg split on heads/ffn (column
parallel) and o/wo split on their input axis (row parallel) that is Megatron's
two all-reduces per layer; embedding and LM head are split on the vocabulary.

Rules that need a decision:
  - the vocabulary is padded with zero rows to a multiple of the tensor size;
    the model slices the padded logits off before anyone can sample them;
  - heads and ffn must divide by the tensor size (else a ValueError listing
    the sizes that work);
  - any other dimension that does not divide its mesh axis is replicated: MQA /
    GQA with fewer kv heads than tensor ranks keep every kv head (weights and
    KV cache) on every rank that needs it;
  - the batch is padded up to a multiple of the data size by the caller
    (`Layout.batch_size`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax import pipeline, quant
from ftjax.config import ModelConfig
from ftjax.specs import ParamSpec, flatten, param_specs, unflatten

MESH_AXES = ("data", "pipe", "tensor")

# Logical axis -> mesh axis (None: replicated). The one table.
RULES: Mapping[str, Optional[str]] = {
    "batch": "data",
    "layers": "pipe",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "ffn": "tensor",
    "embed": None,
    "head_dim": None,
    "positions": None,
    "cache_seq": None,
    "seq": None,
}

# KVCache k/v `[L, B, K, S, H]`.
CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")


def make_mesh(tensor: int = 1, data: int = 1, pipe: int = 1, devices=None) -> Mesh:
    """A mesh with axes ("data", "pipe", "tensor"), tensor the fastest-varying.

    Neighbouring devices (those of one host first) form a tensor group, so the
    per-layer all-reduces stay inside a host when tensor <= devices per host.
    Axes are `AxisType.Auto` on every jax version (new jax defaults to Explicit).

    Args:
      tensor, data, pipe: axis sizes; their product devices are used.
      devices: the devices to use (default: the first `data * pipe * tensor` of
        `jax.devices()`, which spans every process in a multi-host run).
    Raises:
      ValueError: a size < 1, or more devices asked for than exist.
    """
    sizes = {"data": data, "pipe": pipe, "tensor": tensor}
    for name, n in sizes.items():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"make_mesh: {name} must be an int >= 1, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    need = data * pipe * tensor
    if need > len(devices):
        hint = ""
        if all(d.platform == "cpu" for d in devices):
            hint = (f"; for {need} virtual CPU devices, run "
                    f"jax.config.update('jax_num_cpu_devices', {need}) before jax is first used "
                    f"(or set XLA_FLAGS=--xla_force_host_platform_device_count={need} before "
                    "jax is imported)")
        raise ValueError(f"make_mesh: data*pipe*tensor = {data}*{pipe}*{tensor} = {need} devices, "
                         f"but only {len(devices)} are available{hint}")
    grid = np.asarray(devices[:need], dtype=object).reshape(data, pipe, tensor)
    auto = (jax.sharding.AxisType.Auto,) * 3
    return Mesh(grid, MESH_AXES, axis_types=auto)


def mesh_for(tensor: int = 1, data: int = 1, pipe: int = 1) -> Optional[Mesh]:
    """`make_mesh(tensor, data, pipe)`, or None for one device (the command line's --tp /
    --dp / --pp)."""
    if tensor == 1 and data == 1 and pipe == 1:
        return None
    return make_mesh(tensor=tensor, data=data, pipe=pipe)


def use_cpu_devices(n: int) -> None:
    """Makes n virtual CPU devices available (for --tp/--dp on a CPU-only machine).

    Only possible before jax's backends start; a no-op when XLA_FLAGS already asks
    for host devices or when there are enough devices anyway."""
    if n <= 1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already running: make_mesh reports a shortage
        pass


def allowed_tensor_sizes(cfg: ModelConfig, limit: int = 1024) -> list:
    """Tensor-parallel sizes this config supports (heads and ffn both divide)."""
    return [t for t in range(1, min(cfg.n_heads, limit) + 1)
            if cfg.n_heads % t == 0 and cfg.d_ff % t == 0]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh plus `RULES`, applied to one model config.

    Attributes:
      mesh: the device mesh.
      cfg: the model config (checked against the mesh on creation).
    """

    mesh: Mesh
    cfg: ModelConfig

    def __post_init__(self):
        if tuple(self.mesh.axis_names) != MESH_AXES:
            raise ValueError(f"mesh axes must be {MESH_AXES} (use ftjax.make_mesh), got "
                             f"{tuple(self.mesh.axis_names)}")
        tp = self.tensor
        bad = [f"{name} ({n})" for name, n in (("n_heads", self.cfg.n_heads),
                                                ("d_ff", self.cfg.d_ff)) if n % tp]
        if bad:
            raise ValueError(f"tensor parallel size {tp} does not divide {' and '.join(bad)}; "
                             f"allowed tensor sizes: {allowed_tensor_sizes(self.cfg)}")
        pipeline.check_layers(self.cfg.n_layers, self.pipe)

    @property
    def tensor(self) -> int:
        return self.mesh.shape["tensor"]

    @property
    def pipe(self) -> int:
        return self.mesh.shape["pipe"]

    @property
    def data(self) -> int:
        return self.mesh.shape["data"]

    @property
    def padded_vocab(self) -> int:
        """The vocabulary rounded up to a multiple of the tensor size."""
        return -(-self.cfg.vocab_size // self.tensor) * self.tensor

    def batch_size(self, batch: int) -> int:
        """`batch` rounded up to a multiple of the data size."""
        return -(-batch // self.data) * self.data

    # -- logical axes -> shardings --------------------------------------------

    def spec(self, axes: Sequence[Optional[str]], shape: Sequence[int]) -> PartitionSpec:
        """PartitionSpec of an array with these logical axes; a dimension that
        does not divide its mesh axis is replicated."""
        out = []
        for name, n in zip(axes, shape):
            mesh_axis = RULES.get(name) if name else None
            if mesh_axis is not None and n % self.mesh.shape[mesh_axis]:
                mesh_axis = None
            out.append(mesh_axis)
        return PartitionSpec(*out)

    def sharding(self, axes, shape) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    @functools.cached_property
    def specs(self) -> dict:
        """The flat spec table with the vocabulary padded: {"a/b/c": ParamSpec}."""
        return flatten(param_specs(self.cfg, self.padded_vocab))

    def spec_of(self, path: str) -> ParamSpec:
        if path not in self.specs:
            raise ValueError(f"no parameter {path!r} in this model's spec table")
        return self.specs[path]

    def param_shapes(self) -> dict:
        """Global shapes of the params once the vocabulary is padded."""
        return unflatten({p: s.shape for p, s in self.specs.items()})

    def stored_shardings(self, shapes) -> dict:
        """Shardings for params of the canonical (unpadded) shapes, e.g. to restore a
        checkpoint onto the mesh; a vocabulary that does not divide stays replicated."""
        return unflatten({p: self.sharding(self.spec_of(p).axes, tuple(x.shape))
                          for p, x in flatten(shapes).items()})

    def param_shardings(self) -> dict:
        """NamedSharding of every param (padded shapes)."""
        return unflatten({p: self.sharding(s.axes, s.shape) for p, s in self.specs.items()})

    def cache_sharding(self, batch: int, max_len: int) -> NamedSharding:
        c = self.cfg
        return self.sharding(CACHE_AXES, (c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim))

    def batch_sharding(self, shape) -> NamedSharding:
        """Leading axis on "data", the rest replicated."""
        return self.sharding(("batch",) + (None,) * (len(shape) - 1), shape)

    # -- placing and fetching -------------------------------------------------

    def place_params(self, params, dtype) -> dict:
        """Host params (numpy / memory-mapped, canonical layout) -> sharded jax arrays.

        Each device's shard is read from the host array by its index slice and
        cast on its own (`jax.make_array_from_callback`): no device, and no
        host buffer, ever holds a whole split param. Vocabulary params are padded
        with zero rows to `padded_vocab`.
        """
        def place(spec: ParamSpec, x, x_dtype):
            # Only the vocabulary axis grows (zero rows up to padded_vocab).
            shape = tuple(x.shape)
            if spec.axes[0] == "vocab":
                shape = (spec.shape[0],) + shape[1:]
            # A size-1 axis (an int8 scale's contraction axis) does not divide: replicated.
            return _place(x, shape, self.sharding(spec.axes, shape), x_dtype)

        out = {}
        for path, x in flatten(params, is_leaf=quant.is_quantized).items():
            spec = self.spec_of(path)
            if not quant.is_quantized(x):
                out[path] = place(spec, x, dtype)
            elif isinstance(x, quant.Int8Weight) and not x.group_size:
                # Per-channel int8: the scale keeps the weight's axes (contraction axes
                # of size 1), so it shards with its weight's output axes.
                scale_shape = (spec.shape[0],) + tuple(x.scale.shape[1:])
                out[path] = x.replace(
                    q=place(spec, x.q, np.int8),
                    scale=_place(x.scale, scale_shape, self.sharding(spec.axes, scale_shape),
                                 np.float32))
            else:
                raise ValueError(f"{path}: {type(x).__name__} with groups or W8A8 cannot be "
                                 "placed on a mesh yet; use quant='int8' (per channel)")
        return unflatten(out)

    def unpad_params(self, params) -> dict:
        """Slices the vocabulary padding off (the canonical shapes again)."""
        v = self.cfg.vocab_size

        def unpad(path, x):
            if self.spec_of(path).axes[0] != "vocab":
                return x
            if quant.is_quantized(x):
                return x.replace(q=x.q[:v], scale=x.scale[:v])
            return x[:v]

        return unflatten({p: unpad(p, x)
                          for p, x in flatten(params, is_leaf=quant.is_quantized).items()})

    def shard_batch(self, tree):
        """Host or device arrays with a leading batch axis -> global arrays on "data"."""
        def put(x):
            x = np.asarray(x)
            return _place(x, x.shape, self.batch_sharding(x.shape), x.dtype)
        return jax.tree_util.tree_map(put, tree)

    def constrain_cache(self, cache):
        """The KV cache pinned to its sharding (batch on data, kv heads on tensor
        when they divide); used where the engine creates or returns a cache."""
        b, s = cache.k.shape[1], cache.k.shape[3]
        spec = tuple(self.cache_sharding(b, s).spec) + (None,) * 5

        def pin(x):  # k / v [L, B, K, S, H]; int8 scales [L, B, K, S] shard alike
            sh = NamedSharding(self.mesh, PartitionSpec(*spec[:x.ndim]))
            return jax.lax.with_sharding_constraint(x, sh)

        return jax.tree_util.tree_map(pin, cache)


def _place(host, shape, sharding, dtype) -> jax.Array:
    """One global array built shard by shard from `host` (zero rows past its end)."""
    host_shape = tuple(host.shape)
    if (isinstance(host, jax.Array) and host_shape == tuple(shape)
            and host.dtype == np.dtype(dtype) and host.sharding.is_equivalent_to(
                sharding, len(shape))):
        return host  # already placed (e.g. restored from orbax onto this mesh)

    def shard(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        want = [len(range(*s.indices(n))) for s, n in zip(index, shape)]
        clipped = tuple(slice(*s.indices(h)[:2]) for s, h in zip(index, host_shape))
        block = np.asarray(host[clipped], dtype=dtype)
        if list(block.shape) != want:  # a vocabulary shard reaching into the padding
            block = np.pad(block, [(0, w - b) for w, b in zip(want, block.shape)])
        return block

    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def fetch(tree):
    """Device arrays -> numpy on every process (gathers shards held by other hosts)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def nbytes_per_device(shapes, shardings, dtype) -> int:
    """Bytes one device holds of arrays with these global shapes and shardings."""
    itemsize = np.dtype(dtype).itemsize
    leaves = zip(jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)),
                 jax.tree_util.tree_leaves(shardings))
    return sum(math.prod(sh.shard_shape(s)) * itemsize for s, sh in leaves)
