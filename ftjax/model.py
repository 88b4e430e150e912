"""The one decoder-only transformer, configured by `ModelConfig`.

Shape legend (used in every einsum and docstring here):
  B batch, T query length, S key length (cache slots), L layers,
  D model width, N query heads, K kv heads, G = N // K query heads per kv head,
  H head width, F MLP width, V vocabulary, E embedding width.

Params are the canonical pytree of `ftjax.specs.param_specs` (every shape is taken
from that table): attention unfused with heads explicit, block weights stacked on a
leading `L` axis under "layers".

The model is three functions, so that pipeline stages can run them apart:
`embed` (tokens -> activations), `stage` (a slice of the stacked layers, with its
slice of the KV cache) and `head` (activations -> float32 logits). `stage` runs one
`Block` per layer with `lax.scan` over the stacked weights. XLA:CPU copies a
layer's weights out of the stack before every matmul inside a loop (a dynamic slice
is never a view there), so on CPU the caller may hand `stage` the stack as a tuple of
per-layer trees (`split_layers`, done once at load); the same `Block` then runs in an
unrolled loop over them. Both read the same params and give the same logits
(`tests/test_generate.py::test_layer_loops_agree`).

The KV cache is an explicit object passed in and returned (`ftjax.cache`); it owns
its attention dispatch, so the model never asks which platform it runs on.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax import pipeline, quant
from ftjax.config import ModelConfig
from ftjax.numerics import activation, alibi_slopes, attend, rotate  # noqa: F401 (re-exported)
from ftjax.specs import INIT_STDDEV, ParamSpec, block_specs, param_specs
from pallas_kernels.sharded import KernelMesh

_INITS = {"normal": nn.initializers.normal(stddev=INIT_STDDEV),
          "zeros": nn.initializers.zeros, "ones": nn.initializers.ones}


def weight(module: nn.Module, name: str, spec: ParamSpec, dtype):
    """The param `name` of `spec`'s shape; an existing quantized weight type
    (`quant.Int8Weight` / `W8A8Weight`) is returned as is (flax's `param` would check
    its leaves against the float shape)."""
    if module.has_variable("params", name):
        w = module.get_variable("params", name)
        if quant.is_quantized(w):
            return w
        # flax's `param` checks an existing value by `jax.eval_shape` of its initializer
        # (a random-init trace per weight, ~40% of a model trace): the same check, direct.
        if tuple(jnp.shape(w)) != tuple(spec.shape):
            raise flax.errors.ScopeParamShapeError(name, module.scope.path_text,
                                                   jnp.shape(w), tuple(spec.shape))
        return w
    return module.param(name, _INITS[spec.init], spec.shape, dtype)


class Linear(nn.Module):
    """`einsum(spec, x, kernel) + bias`; the kernel may be a quantized weight type."""

    spec: str
    params_spec: dict  # {"kernel": ParamSpec, optional "bias": ParamSpec}
    dtype: jnp.dtype
    kernels: str = "xla"  # "pallas" / "mosaic": int8 weights through an int8_matmul kernel;
                          # "cpu": a decode step's few rows through pallas_kernels.cpu_matmul
    mesh: Optional[KernelMesh] = None   # x and the kernel are sharded on it: runs per shard

    @nn.compact
    def __call__(self, x):
        kernel = weight(self, "kernel", self.params_spec["kernel"], self.dtype)
        y = quant.einsum(self.spec, x, kernel, pallas=self.kernels != "xla" and self.kernels,
                         mesh=self.mesh)
        if "bias" in self.params_spec:
            y = y + weight(self, "bias", self.params_spec["bias"], self.dtype)
        return y


class Norm(nn.Module):
    """LayerNorm or RMSNorm; statistics in float32, output in the model dtype."""

    cfg: ModelConfig
    params_spec: dict  # {"scale": ParamSpec, "bias": ParamSpec for layernorm}
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = weight(self, "scale", self.params_spec["scale"], self.dtype)
        xf = x.astype(jnp.float32)
        if self.cfg.norm == "layernorm":
            bias = weight(self, "bias", self.params_spec["bias"], self.dtype)
            mean = xf.mean(-1, keepdims=True)
            var = jnp.square(xf - mean).mean(-1, keepdims=True)
            y = (xf - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
            return y.astype(self.dtype)
        # As HF Llama: normalize in float32, cast, then scale in the model dtype.
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.cfg.norm_eps)
        return y.astype(self.dtype) * scale


class BlockPart(nn.Module):
    """The fields every part of a block shares: the architecture, the dtype, which
    matmul kernels run int8 weights, and the mesh those kernels run per shard on."""

    cfg: ModelConfig
    dtype: jnp.dtype
    kernels: str = "xla"
    mesh: Optional[KernelMesh] = None


class Attention(BlockPart):
    """q/k/v projections, positions (rotary / ALiBi), the cache's attention, o projection."""

    @nn.compact
    def __call__(self, x, positions, layer, cache):
        cfg, dt, kn = self.cfg, self.dtype, self.kernels
        specs = block_specs(cfg)["attn"]
        q = Linear("btd,dnh->btnh", specs["q"], dt, kn, self.mesh, name="q")(x)
        k = Linear("btd,dkh->btkh", specs["k"], dt, kn, self.mesh, name="k")(x)
        v = Linear("btd,dkh->btkh", specs["v"], dt, kn, self.mesh, name="v")(x)
        if cfg.positions == "rotary":
            q = rotate(q, positions, cfg.n_rotary, cfg.rope_theta)
            k = rotate(k, positions, cfg.n_rotary, cfg.rope_theta)
        slopes = alibi_slopes(cfg.n_heads) if cfg.positions == "alibi" else None
        if cache is None:
            out = attend(q, k, v, positions, positions, slopes)
        else:
            # Write this step's keys / values at their positions, then attend over
            # the layer's slots: slots past a row's position are masked out.
            cache = cache.update(layer, k, v, positions)
            out = cache.attend(layer, q, positions, slopes)
        y = Linear("btnh,nhd->btd", specs["o"], dt, kn, self.mesh, name="o")(out)
        return y, cache


class Mlp(BlockPart):
    """wi (and the gate wg for GLU), the activation, wo."""

    @nn.compact
    def __call__(self, x):
        cfg, dt, kn = self.cfg, self.dtype, self.kernels
        specs = block_specs(cfg)["mlp"]
        hdn = Linear("btd,df->btf", specs["wi"], dt, kn, self.mesh, name="wi")(x)
        if cfg.glu:
            gate = Linear("btd,df->btf", specs["wg"], dt, kn, self.mesh, name="wg")(x)
            hdn = activation(cfg.activation, gate) * hdn
        else:
            hdn = activation(cfg.activation, hdn)
        return Linear("btf,fd->btd", specs["wo"], dt, kn, self.mesh, name="wo")(hdn)


class Block(BlockPart):
    """One transformer block; `ModelConfig` picks the residual arrangement."""

    @nn.compact
    def __call__(self, x, positions, layer, cache):
        cfg = self.cfg
        specs = block_specs(cfg)
        attn = Attention(cfg, self.dtype, self.kernels, self.mesh, name="attn")
        mlp = Mlp(cfg, self.dtype, self.kernels, self.mesh, name="mlp")
        ln1 = Norm(cfg, specs["ln1"], self.dtype, name="ln1")
        ln2 = None if cfg.shared_norm else Norm(cfg, specs["ln2"], self.dtype, name="ln2")
        if cfg.norm_position == "post":      # norm(x + f(x))
            a, cache = attn(x, positions, layer, cache)
            x = ln1(x + a)
            x = ln2(x + mlp(x))
        elif cfg.parallel_residual:          # x + attn(norm1(x)) + mlp(norm2(x))
            h = ln1(x)
            a, cache = attn(h, positions, layer, cache)
            x = x + a + mlp(h if ln2 is None else ln2(x))
        else:                                # x + f(norm(x))
            h = ln1(x)
            a, cache = attn(h, positions, layer, cache)
            x = (h if cfg.residual_from_norm else x) + a
            h = ln2(x)
            x = (h if cfg.residual_from_norm else x) + mlp(h)
        return x, cache


class Embed(nn.Module):
    """Token ids (+ soft prompt rows) -> activations `[B, T, D]` (first pipeline stage)."""

    cfg: ModelConfig
    dtype: jnp.dtype
    vocab: Optional[int] = None

    @nn.compact
    def __call__(self, tokens, positions, soft=None):
        cfg = self.cfg
        specs = param_specs(cfg, self.vocab)
        x = quant.take(weight(self, "embed", specs["embed"], self.dtype), tokens, self.dtype)
        if soft is not None:
            x = jnp.where(soft[1][..., None], soft[0].astype(x.dtype), x)
        if "project_in" in specs:
            x = Linear("bte,ed->btd", specs["project_in"], self.dtype, name="project_in")(x)
        if "pos_embed" in specs:
            pos_embed = weight(self, "pos_embed", specs["pos_embed"], self.dtype)
            x = x + quant.take(pos_embed, positions + cfg.position_offset, self.dtype)
        if "embed_norm" in specs:
            x = Norm(cfg, specs["embed_norm"], self.dtype, name="embed_norm")(x)
        return x


class Head(nn.Module):
    """Activations -> float32 logits `[B, T, V]` (last pipeline stage)."""

    cfg: ModelConfig
    dtype: jnp.dtype
    vocab: Optional[int] = None
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        specs = param_specs(cfg, self.vocab)
        if "final_norm" in specs:
            x = Norm(cfg, specs["final_norm"], self.dtype, name="final_norm")(x)
        if "project_out" in specs:
            kn = "cpu" if self.kernels == "cpu" else "xla"  # Head runs no per-shard kernels
            x = Linear("btd,de->bte", specs["project_out"], self.dtype, kn, name="project_out")(x)
        name = "lm_head" if "lm_head" in specs else "embed"   # tied: the embedding table
        logits = quant.logits(x, weight(self, name, specs[name], self.dtype), self.kernels)
        if "lm_head_bias" in specs:
            bias = weight(self, "lm_head_bias", specs["lm_head_bias"], self.dtype)
            logits = logits + bias.astype(jnp.float32)
        if logits.shape[-1] != cfg.vocab_size:   # vocab padded for sharding: never sampled
            logits = logits[..., :cfg.vocab_size]
        return logits


Layers = Union[dict, Sequence[dict]]


def split_layers(layers: dict, n_layers: int) -> tuple:
    """Stacked block params -> a tuple of per-layer trees (see the module docstring)."""
    return tuple(jax.tree_util.tree_map(lambda a: a[i], layers) for i in range(n_layers))


def stack_layers(layers: Sequence[dict]) -> dict:
    """The inverse of `split_layers`."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)


@dataclasses.dataclass(frozen=True)
class Transformer:
    """The model as pure functions of (params, inputs).

    Attributes:
      cfg: the architecture.
      dtype: weights' and activations' dtype.
      kernels: "xla", "pallas" or "mosaic" (int8 weight matmuls through pallas_kernels;
        the cache's own `kernels` picks the attention kernels), or "cpu" (one CPU device:
        matmuls of up to `cpu_matmul.MAX_ROWS` rows, the LM head's too, through the native
        `pallas_kernels.cpu_matmul`; the engine picks it with `paged_kv.kernels_for`).
      mesh: the `KernelMesh` params and activations are sharded on (the int8 matmul
        kernels then run per shard; the cache carries its own), or None.
      vocab: rows of embed / lm_head when padded past vocab_size (vocab-parallel
        sharding pads to a multiple of the tensor size); padded logits are sliced off.
      pipe: the device mesh when its "pipe" axis is > 1: the stacked layers then run
        stage by stage over it (`ftjax.pipeline`); None runs them in one `stage`.
      micro: micro-batches per pipelined call (see `ftjax.pipeline.run_stages`).
    """

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    kernels: str = "xla"
    vocab: Optional[int] = None
    mesh: Optional[KernelMesh] = None
    pipe: Optional[jax.sharding.Mesh] = None
    micro: int = 1

    def embed(self, params, tokens, positions, soft=None):
        """`[B, T]` ids (and optional soft prompt (embeddings `[B, T, E]`, mask `[B, T]`))
        -> activations `[B, T, D]`."""
        return Embed(self.cfg, self.dtype, self.vocab).apply({"params": params}, tokens,
                                                             positions, soft)

    def stage(self, layers: Layers, x, positions, cache=None, first_layer=0):
        """Runs the blocks of `layers` (stacked, or a tuple of per-layer trees) over
        activations `[B, T, D]`; layer i reads and writes cache layer first_layer + i.

        Returns:
          (activations `[B, T, D]`, updated cache or None)
        """
        block = Block(self.cfg, self.dtype, self.kernels, self.mesh)

        def run(carry, layer_params, i):
            x, cache = carry
            return block.apply({"params": layer_params}, x, positions, first_layer + i, cache)

        if isinstance(layers, (tuple, list)):
            carry = (x, cache)
            for i, p in enumerate(layers):
                carry = run(carry, p, i)
            return carry
        n = jax.tree_util.tree_leaves(layers)[0].shape[0]
        carry, _ = jax.lax.scan(lambda c, pi: (run(c, *pi), None), (x, cache),
                                (layers, jnp.arange(n)))
        return carry

    def head(self, params, x):
        """Activations `[B, T, D]` -> float32 logits `[B, T, V]`."""
        return Head(self.cfg, self.dtype, self.vocab, self.kernels).apply({"params": params}, x)

    def __call__(self, params, tokens, positions, cache=None, last_index=None, soft=None):
        """Runs the model.

        Args:
          params: the canonical params (their "layers" stacked, or split per layer).
          tokens: int `[B, T]`.
          positions: int `[B, T]`; also the cache slots written.
          cache: a KV cache (`ftjax.cache`) to write and attend over, or None
            (attend within `tokens`).
          last_index: optional int `[B]`: return only the logits at these indices of T.
          soft: optional (embeddings `[B, T, E]`, mask bool `[B, T]`): where the mask
            is set, the embedding replaces the token's (soft prompts).
        Returns:
          (logits float32 `[B, T, V]` or `[B, 1, V]` with last_index, updated cache)
        """
        x = self.embed(params, tokens, positions, soft)
        if self.pipe is None:
            x, cache = self.stage(params["layers"], x, positions, cache)
        else:
            x, cache = pipeline.run_stages(self.stage, self.pipe, params["layers"], x,
                                           positions, cache, self.micro)
        if last_index is not None:
            x = jnp.take_along_axis(x, last_index[:, None, None], axis=1)
        return self.head(params, x), cache
