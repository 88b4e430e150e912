"""The one decoder-only transformer, configured by `ModelConfig`.

Shape legend (used in every einsum and docstring here):
  B batch, T query length, S key length (cache slots), L layers,
  D model width, N query heads, K kv heads, G = N // K query heads per kv head,
  H head width, F MLP width, V vocabulary.

Params are the canonical pytree (see `converters`): attention unfused with heads
explicit, q `[D, N, H]`, k/v `[D, K, H]`, o `[N, H, D]`; block weights stacked
on a leading `L` axis so one `nn.scan` runs the stack.

The KV cache is an explicit pytree passed in and returned (`KVCache`), never
state stored on a module.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ftjax import quant
from ftjax.config import ModelConfig
from pallas_kernels import prefill_attention, select, sharded

_init = nn.initializers.normal(stddev=0.02)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer: `k`, `v` are `[L, B, K, S, H]`.

    Heads before slots: attention then reads each head's keys as one contiguous
    `[S, H]` matrix, with no transpose copy per step.

    int8 cache: `k`, `v` are int8 and `k_scale`, `v_scale` float32 `[L, B, K, S]`
    hold one scale per written token and kv head (absmax / 127, set when written).
    """

    k: jax.Array
    v: jax.Array
    k_scale: Optional[jax.Array] = None
    v_scale: Optional[jax.Array] = None

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype,
              kv_dtype=None) -> "KVCache":
        """kv_dtype: None (the model dtype) or "int8"."""
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        # jnp.zeros, not jnp.empty: new jax returns uninitialized memory for empty.
        if kv_dtype == "int8":
            return cls(k=jnp.zeros(shape, jnp.int8), v=jnp.zeros(shape, jnp.int8),
                       k_scale=jnp.zeros(shape[:-1], jnp.float32),
                       v_scale=jnp.zeros(shape[:-1], jnp.float32))
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def weight(module: nn.Module, name: str, shape: tuple, dtype):
    """A param that may be quantized: an existing `quant.Int8Weight` / `W8A8Weight`
    is returned as is (flax's `param` would check its leaves against `shape`)."""
    if module.has_variable("params", name):
        w = module.get_variable("params", name)
        if quant.is_quantized(w):
            return w
    return module.param(name, _init, shape, dtype)


class Linear(nn.Module):
    """`einsum(spec, x, kernel) + bias`; the kernel may be a quantized weight type."""

    spec: str
    kernel_shape: tuple
    bias_shape: Optional[tuple]
    dtype: jnp.dtype
    kernels: str = "xla"  # "pallas" / "mosaic": int8 weights go through an int8_matmul kernel
    mesh: Optional[sharded.KernelMesh] = None   # the kernel runs per shard on this mesh

    @nn.compact
    def __call__(self, x):
        kernel = weight(self, "kernel", self.kernel_shape, self.dtype)
        y = quant.einsum(self.spec, x, kernel, pallas=self.kernels != "xla" and self.kernels,
                         mesh=self.mesh)
        if self.bias_shape is not None:
            y = y + self.param("bias", nn.initializers.zeros, self.bias_shape, self.dtype)
        return y


class Norm(nn.Module):
    """LayerNorm or RMSNorm; statistics in float32, output in the model dtype."""

    cfg: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        d = self.cfg.d_model
        scale = self.param("scale", nn.initializers.ones, (d,), self.dtype)
        xf = x.astype(jnp.float32)
        if self.cfg.norm == "layernorm":
            bias = self.param("bias", nn.initializers.zeros, (d,), self.dtype)
            mean = xf.mean(-1, keepdims=True)
            var = jnp.square(xf - mean).mean(-1, keepdims=True)
            y = (xf - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        else:
            # As HF Llama: normalize in float32, cast, then scale in the model dtype.
            y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.cfg.norm_eps)
            return y.astype(self.dtype) * scale
        return y.astype(self.dtype)


def activation(name: str, x):
    if name == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def alibi_slopes(n_heads: int) -> jax.Array:
    """ALiBi head slopes `[N]` (Press et al.; BLOOM's rule for non-powers of two)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(n_heads - closest)]
    return jnp.asarray(slopes, jnp.float32)


def rotate(x, positions, rotary_dim: int, theta: float):
    """Rotary embedding, rotate-half convention, on the first `rotary_dim` dims.

    Args:
      x: `[B, T, X, H]` (X heads); positions: `[B, T]`.
    """
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / rotary_dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xr = x[..., :rotary_dim].astype(jnp.float32)
    x1, x2 = xr[..., :half], xr[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)


def attend(q, k, v, q_pos, k_pos, slopes=None, heads_first=False, k_scale=None, v_scale=None):
    """Causal attention over keys whose position is <= the query's.

    Args:
      q: `[B, T, N, H]`; k, v: `[B, S, K, H]`, or `[B, K, S, H]` with heads_first.
      q_pos: `[B, T]` absolute query positions; k_pos: `[B, S]` or `[S]` key positions.
      slopes: optional ALiBi slopes `[N]`: adds slope * (k_pos - q_pos) to the scores.
      k_scale, v_scale: for an int8 k / v (heads_first): float32 `[B, K, S]` per-token
        scales, applied to the scores and the probabilities (no dequantized copy).
    Returns:
      `[B, T, N, H]` in q's dtype. Scores and softmax run in float32.
    """
    b, t, n, h = q.shape
    kv, s = (k.shape[1], k.shape[2]) if heads_first else (k.shape[2], k.shape[1])
    kspec = "bksh" if heads_first else "bskh"
    qg = q.reshape(b, t, kv, n // kv, h)
    if k_scale is not None:
        k = k.astype(q.dtype)
    scores = jnp.einsum(f"btkgh,{kspec}->bkgts", qg, k, preferred_element_type=jnp.float32)
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, None, :]
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(h)))
    k_pos = jnp.broadcast_to(k_pos, (b, s))
    if slopes is not None:
        dist = (k_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.float32)  # [B, T, S]
        scores = scores + slopes.reshape(kv, n // kv)[None, :, :, None, None] * dist[:, None, None]
    mask = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs, v = probs * v_scale[:, :, None, None, :], v.astype(q.dtype)
    out = jnp.einsum(f"bkgts,{kspec}->btkgh", probs.astype(v.dtype), v)
    return out.reshape(b, t, n, h)


def write_cache(cache: KVCache, layer, rows, slots, kk, vv, mode: str) -> KVCache:
    """Writes keys/values `[B, T, K, H]` at `[layer, rows, :, slots]` (int8: with scales)."""
    def put(a, x):
        return a.at[layer, rows, :, slots].set(x, mode=mode)

    if cache.k_scale is None:
        return KVCache(k=put(cache.k, kk), v=put(cache.v, vv))
    (kq, ks), (vq, vs) = quant.quantize_vectors(kk), quant.quantize_vectors(vv)
    return KVCache(k=put(cache.k, kq), v=put(cache.v, vq),
                   k_scale=put(cache.k_scale, ks), v_scale=put(cache.v_scale, vs))


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    kernels: str = "xla"
    mesh: Optional[sharded.KernelMesh] = None

    @nn.compact
    def __call__(self, x, positions, layer, cache: Optional[KVCache]):
        cfg = self.cfg
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attn_bias
        dt, kn = self.dtype, self.kernels
        q = Linear("btd,dnh->btnh", (d, n, h), (n, h) if bias else None, dt, kn, self.mesh, name="q")(x)
        kk = Linear("btd,dkh->btkh", (d, k, h), (k, h) if bias else None, dt, kn, self.mesh, name="k")(x)
        vv = Linear("btd,dkh->btkh", (d, k, h), (k, h) if bias else None, dt, kn, self.mesh, name="v")(x)
        if cfg.positions == "rotary":
            q = rotate(q, positions, cfg.n_rotary, cfg.rope_theta)
            kk = rotate(kk, positions, cfg.n_rotary, cfg.rope_theta)
        slopes = alibi_slopes(n) if cfg.positions == "alibi" else None
        if cache is None:
            out = attend(q, kk, vv, positions, positions, slopes)
        else:
            # Write this step's keys/values at their positions, then attend over
            # the whole cache: slots past a row's position are masked out.
            rows = jnp.arange(x.shape[0])[:, None]
            if x.shape[1] == 1:
                # Decode: the engine keeps positions inside the cache (the clamp makes
                # it certain), so the scatter needs no bounds handling.
                slots, mode = jnp.minimum(positions, cache.max_len - 1), "promise_in_bounds"
            else:
                # Prefill: padding past the cache end (a session's last chunk) is dropped.
                slots, mode = positions, "drop"
            # [B, T, K, H] written at [layer, b, :, slot]: index order puts (B, T) first.
            cache = write_cache(cache, layer, rows, slots, kk, vv, mode)
            # Pallas: the kernels read this layer of the whole cache in place (no slice
            # copy). The prefill kernel has no int8 cache path: XLA attends there.
            if self.kernels != "xla" and (x.shape[1] == 1 or cache.k_scale is None):
                interpret = sharded.interpret(self.mesh)
                if x.shape[1] == 1:
                    lengths = jnp.minimum(positions[:, 0] + 1, cache.max_len)
                    out = sharded.decode_attention(
                        q[:, 0], cache.k, cache.v, lengths, mesh=self.mesh,
                        kernel=functools.partial(select.decode_attention, impl=self.kernels),
                        alibi_slopes=slopes, k_scale=cache.k_scale,
                        v_scale=cache.v_scale, layer=layer, layout="BKSH",
                        interpret=interpret)[:, None]
                else:
                    out = sharded.prefill_attention(
                        q, cache.k, cache.v, positions, mesh=self.mesh, kernel=prefill_attention,
                        alibi_slopes=slopes, layer=layer, layout="BKSH", interpret=interpret)
            else:
                k_layer, v_layer, k_scale, v_scale = (
                    None if a is None else jax.lax.dynamic_index_in_dim(a, layer, 0,
                                                                         keepdims=False)
                    for a in (cache.k, cache.v, cache.k_scale, cache.v_scale))
                out = attend(q, k_layer, v_layer, positions, jnp.arange(cache.max_len), slopes,
                             heads_first=True, k_scale=k_scale, v_scale=v_scale)
        y = Linear("btnh,nhd->btd", (n, h, d), (d,) if bias else None, dt, kn, self.mesh, name="o")(out)
        return y, cache


class Mlp(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    kernels: str = "xla"
    mesh: Optional[sharded.KernelMesh] = None

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        d, f = cfg.d_model, cfg.d_ff
        bias = cfg.mlp_bias
        dt, kn = self.dtype, self.kernels
        hdn = Linear("btd,df->btf", (d, f), (f,) if bias else None, dt, kn, self.mesh, name="wi")(x)
        if cfg.glu:
            gate = Linear("btd,df->btf", (d, f), (f,) if bias else None, dt, kn, self.mesh, name="wg")(x)
            hdn = activation(cfg.activation, gate) * hdn
        else:
            hdn = activation(cfg.activation, hdn)
        return Linear("btf,fd->btd", (f, d), (d,) if bias else None, dt, kn, self.mesh, name="wo")(hdn)


class Block(nn.Module):
    """One transformer block; `ModelConfig` picks the residual arrangement."""

    cfg: ModelConfig
    dtype: jnp.dtype
    kernels: str = "xla"
    mesh: Optional[sharded.KernelMesh] = None

    @nn.compact
    def __call__(self, carry, layer):
        x, positions, cache = carry
        cfg = self.cfg
        attn = Attention(cfg, self.dtype, self.kernels, self.mesh, name="attn")
        mlp = Mlp(cfg, self.dtype, self.kernels, self.mesh, name="mlp")
        ln1 = Norm(cfg, self.dtype, name="ln1")
        ln2 = None if cfg.shared_norm else Norm(cfg, self.dtype, name="ln2")
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
        return (x, positions, cache), None


class Transformer(nn.Module):
    """Token ids -> float32 logits, optionally reading and writing a KV cache."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    # True: one nn.scan over the stacked "layers" params (the canonical layout).
    # False: a Python loop over per-layer params "layers_0", "layers_1", ... (see
    # `unstack_layers`): XLA:CPU copies each layer's weights out of the stacked array
    # before every matmul inside a scan, which costs ~1.6x per decode step.
    scan_layers: bool = True
    # "xla": attention as einsums. "pallas" (Triton) / "mosaic" (Mosaic GPU decode and
    # int8 matmul where supported, see `pallas_kernels.select`): attention over a cache runs in
    # pallas_kernels (decode_attention for T == 1, prefill_attention for T > 1),
    # interpreted off GPU (for tests).
    kernels: str = "xla"
    # A mesh the params and cache are sharded on: each kernel call runs per shard
    # (`pallas_kernels.sharded`); None: one device.
    mesh: Optional[sharded.KernelMesh] = None
    # Rows of embed / lm_head when padded past vocab_size (vocab-parallel sharding
    # pads to a multiple of the tensor size); the padded logits are sliced off.
    padded_vocab: Optional[int] = None

    @nn.compact
    def __call__(self, tokens, positions, cache: Optional[KVCache] = None,
                 last_index: Optional[jax.Array] = None, soft: Optional[tuple] = None):
        """Runs the model.

        Args:
          tokens: int `[B, T]`.
          positions: int `[B, T]`; also the cache slots written.
          cache: a `KVCache` to write and attend over, or None (attend within `tokens`).
          last_index: optional int `[B]`: return only the logits at these indices of T.
          soft: optional (embeddings `[B, T, E]`, mask bool `[B, T]`): where the mask
            is set, the embedding replaces the token's (soft prompts).
        Returns:
          (logits float32 `[B, T, V]` or `[B, 1, V]` with last_index, updated cache)
        """
        cfg = self.cfg
        d, e = cfg.d_model, cfg.embed_dim
        vocab = self.padded_vocab or cfg.vocab_size
        embed = weight(self, "embed", (vocab, e), self.dtype)
        x = quant.take(embed, tokens, self.dtype)
        if soft is not None:
            x = jnp.where(soft[1][..., None], soft[0].astype(x.dtype), x)
        if e != d:
            x = Linear("bte,ed->btd", (e, d), None, self.dtype, name="project_in")(x)
        if cfg.positions == "learned":
            pos_embed = weight(self, "pos_embed",
                               (cfg.max_positions + cfg.position_offset, d), self.dtype)
            x = x + quant.take(pos_embed, positions + cfg.position_offset, self.dtype)
        if cfg.embed_norm:
            x = Norm(cfg, self.dtype, name="embed_norm")(x)
        if self.scan_layers:
            blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                             length=cfg.n_layers)(cfg, self.dtype, self.kernels, self.mesh,
                                                  name="layers")
            (x, _, cache), _ = blocks((x, positions, cache), jnp.arange(cfg.n_layers))
        else:
            carry = (x, positions, cache)
            for i in range(cfg.n_layers):
                carry, _ = Block(cfg, self.dtype, self.kernels, self.mesh,
                                 name=f"layers_{i}")(carry, i)
            x, _, cache = carry
        if last_index is not None:
            x = jnp.take_along_axis(x, last_index[:, None, None], axis=1)
        if cfg.final_norm:
            x = Norm(cfg, self.dtype, name="final_norm")(x)
        if e != d:
            x = Linear("btd,de->bte", (d, e), None, self.dtype, name="project_out")(x)
        head = embed
        if not cfg.tied_embeddings:
            head = weight(self, "lm_head", (vocab, e), self.dtype)
        logits = quant.logits(x, head)
        if cfg.lm_head_bias:
            logits = logits + self.param("lm_head_bias", nn.initializers.zeros,
                                         (vocab,), self.dtype).astype(jnp.float32)
        if vocab != cfg.vocab_size:
            logits = logits[..., :cfg.vocab_size]
        return logits, cache


def param_shapes(cfg: ModelConfig, dtype=jnp.float32):
    """The canonical params pytree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    model = Transformer(cfg, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)
    return shapes["params"]


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32):
    """Random params of the canonical shape (for presets and tests)."""
    model = Transformer(cfg, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda key: model.init(key, tokens, tokens)["params"])
    return init(jax.random.PRNGKey(seed))


def unstack_layers(params, n_layers: int) -> dict:
    """Canonical params -> the `scan_layers=False` layout ("layers" split per layer)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda a: a[i], params["layers"])
    return out


def stack_layers(params, n_layers: int) -> dict:
    """The inverse of `unstack_layers`."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    per_layer = [params[f"layers_{i}"] for i in range(n_layers)]
    out["layers"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_layer)
    return out
