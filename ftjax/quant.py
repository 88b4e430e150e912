"""Int8 weights as a weight TYPE, and the one matmul helper that dispatches on it.

Model code never branches on a quantization flag: `Linear` calls `einsum(spec, x, w)`
and the embedding calls `take(table, ids)`; both accept a float array, an
`Int8Weight` (weight-only, W8A16) or a `W8A8Weight` (SmoothQuant: int8 weights and
int8 activations, int32 accumulation).

Layout. Every canonical kernel has its contraction axes first (q `[D, N, H]`,
o `[N, H, D]`, wi `[D, F]`, ...): `q` keeps the float weight's shape and
  - per output channel: `scale` has the weight's shape with the contraction axes
    set to 1 (q `[D, N, H]` -> scale `[1, N, H]`; o `[N, H, D]` -> `[1, 1, D]`);
  - per group of `group_size` input rows: the contraction axes flatten to
    K = G * group_size and `scale` is `[G, 1, *out]`.
Embedding tables `[V, E]` are quantized per row (scale `[V, 1]`), which serves both
the gather and the tied LM head ("bte,ve->btv", where v is the output channel).
Weights stacked on a leading layers axis carry that axis on `q` and `scale` too.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from ftjax.config import ModelConfig
from ftjax.numerics import QMAX, quantize_int8, round_int8
from ftjax.specs import ParamSpec, flatten, param_specs, unflatten
from pallas_kernels import cpu_matmul, select, sharded


@flax.struct.dataclass
class Int8Weight:
    """An int8 weight and its float32 scales; `dequantize()` gives `q * scale`.

    Attributes:
      q: int8, the float weight's shape.
      scale: float32, see the module docstring for its shape.
      group_size: 0 for per-channel scales (static), else input rows per scale.
      out_ndim: with groups, how many trailing axes are output axes (static: unlike
        the ranks, it survives stacking on a layers axis).
    """

    q: jax.Array
    scale: jax.Array
    group_size: int = flax.struct.field(pytree_node=False, default=0)
    out_ndim: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def shape(self):
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self).astype(dtype)


@flax.struct.dataclass
class W8A8Weight:
    """SmoothQuant W8A8: per-output-channel int8 weight of the smoothed float weight
    `W * s[:, None]`, plus how to quantize the activation `x / s` it multiplies.

    Attributes:
      q, scale: as `Int8Weight` (per channel only).
      smooth: float32 `[*contraction dims]`, 1/s: multiplies the activation before it
        is quantized (one fused elementwise op in the activation quantization).
      act_scale: float32 `[]` static per-tensor activation scale; None: per token, dynamic.
    """

    q: jax.Array
    scale: jax.Array
    smooth: jax.Array
    act_scale: Optional[jax.Array] = None

    @property
    def shape(self):
        return self.q.shape

    @property
    def nbytes(self) -> int:
        extra = 0 if self.act_scale is None else self.act_scale.nbytes
        return self.q.nbytes + self.scale.nbytes + self.smooth.nbytes + extra


def is_quantized(x) -> bool:
    return isinstance(x, (Int8Weight, W8A8Weight))


def is_leaf(x) -> bool:
    """For `jax.tree_util` maps that must treat a quantized weight as one leaf."""
    return is_quantized(x)


# -- quantize / dequantize -------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2))
def quantize(w, n_contract: int = 1, group_size: int = 0) -> Int8Weight:
    """Symmetric int8 quantization of one (unstacked) kernel.

    Args:
      w: float `[*contraction dims, *output dims]`.
      n_contract: how many leading axes are contracted.
      group_size: 0: one scale per output channel; else one per `group_size`
        input rows (K = prod(contraction dims) must divide by it).
    """
    k_dims, out_dims = w.shape[:n_contract], w.shape[n_contract:]
    if group_size:
        k = 1
        for d in k_dims:
            k *= d
        if k % group_size:
            raise ValueError(f"group_size {group_size} does not divide the {k} input rows "
                             f"of a weight of shape {w.shape}")
        q, scale = quantize_int8(w.reshape(k // group_size, group_size, *out_dims), (1,))
        return Int8Weight(q.reshape(w.shape), scale, group_size, len(out_dims))
    return Int8Weight(*quantize_int8(w, tuple(range(n_contract))))


@jax.jit
def quantize_rows(table) -> Int8Weight:
    """Per-row int8 of an embedding table `[V, E]` (scale `[V, 1]`)."""
    return Int8Weight(*quantize_int8(table, (-1,)))


def dequantize(w) -> jax.Array:
    """float32 weight of an `Int8Weight` / `W8A8Weight` (the smoothing stays folded in)."""
    if isinstance(w, Int8Weight) and w.group_size:
        lead = w.scale.ndim - 2 - w.out_ndim  # a stacked layers axis, if any
        qg = w.q.reshape(*w.scale.shape[:lead + 1], w.group_size, *w.scale.shape[lead + 2:])
        return (qg.astype(jnp.float32) * w.scale).reshape(w.q.shape)
    return w.q.astype(jnp.float32) * w.scale


# -- the matmul helper ------------------------------------------------------------


def _split_spec(spec: str):
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    contract = [c for c in ws if c not in out]
    return xs, ws, out, len(contract)


def _trailing_leading(spec: str) -> int:
    """Number of contraction axes if they are x's last and w's first axes, else 0."""
    xs, ws, out, n = _split_spec(spec)
    if n and xs[-n:] == ws[:n] and out == xs[:-n] + ws[n:]:
        return n
    return 0


def _as_matrix(w, n: int):
    """An unstacked per-channel or grouped weight as the Pallas kernel's operands:
    (q `[K, N]` int8, scale `[N]` or `[K // g, N]`)."""
    k = 1
    for d in w.q.shape[:n]:
        k *= d
    q2 = w.q.reshape(k, -1)
    scale2 = w.scale.reshape(-1, q2.shape[1])
    return q2, (scale2 if getattr(w, "group_size", 0) else scale2[0])


def _w8a8_matmul(x, w: W8A8Weight, n: int):
    """int8 x int8 -> int32 accumulation, rescaled by activation and weight scales."""
    lead = x.shape[:x.ndim - n]
    x2 = (x.astype(jnp.float32) * w.smooth).reshape(-1, w.smooth.size)
    if w.act_scale is None:   # dynamic, one scale per token
        a_scale = jnp.max(jnp.abs(x2), axis=-1, keepdims=True) / QMAX
        a_scale = jnp.where(a_scale == 0, 1.0, a_scale)
    else:                     # static, per tensor, from calibration
        a_scale = w.act_scale
    xq = round_int8(x2, a_scale)
    q2, scale2 = _as_matrix(w, n)
    acc = jax.lax.dot(xq, q2, preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * a_scale * scale2
    return y.reshape(*lead, *w.q.shape[n:]).astype(x.dtype)


def _cpu_einsum(spec: str, x, w):
    """`einsum` through `pallas_kernels.cpu_matmul` when it applies (a decode step's few
    rows against one layer's float, bf16 or per-channel int8 weight, contracted over x's
    last axes), else None."""
    n = _trailing_leading(spec)
    if not n or isinstance(w, W8A8Weight) or len(w.shape) != len(_split_spec(spec)[1]):
        return None
    lead = x.shape[:x.ndim - n]
    rows = 1
    for d in lead:
        rows *= d
    if not cpu_matmul.preferred(rows, w.q.dtype if is_quantized(w) else w.dtype):
        return None
    if isinstance(w, Int8Weight):
        if w.group_size:
            return None
        q2, scale2 = _as_matrix(w, n)
        dtype = x.dtype
    else:
        k = 1
        for d in w.shape[:n]:
            k *= d
        q2, scale2, dtype = w.reshape(k, -1), None, jnp.result_type(x, w)
    if cpu_matmul.supported(x.reshape(rows, q2.shape[0]), q2, scale2) is not None:
        return None
    y = cpu_matmul.matmul(x.reshape(rows, q2.shape[0]), q2, scale2)
    return y.reshape(*lead, *w.shape[n:]).astype(dtype)


def einsum(spec: str, x, w, pallas=False, mesh=None):
    """`jnp.einsum(spec, x, w)` for a float, `Int8Weight` or `W8A8Weight` w.

    pallas: True / "pallas" (Triton) or "mosaic" (Mosaic GPU where it applies): an
    `Int8Weight` contracted over x's last axes goes through that int8 matmul kernel
    (dequantized inside the kernel; interpreted off GPU). "cpu": a decode step's few
    rows against a float32, bf16 or per-channel int8 weight go through the native CPU
    matmul where it is faster (`pallas_kernels.cpu_matmul.preferred`; one CPU device).
    mesh: a `pallas_kernels.sharded.KernelMesh` x and w are sharded on: the kernel then
    runs per shard (column-parallel local, row-parallel local + psum).

    Returns:
      the product in x's dtype (float weights: the promoted dtype, as jnp.einsum).
    """
    if pallas == "cpu":
        y = _cpu_einsum(spec, x, w)
        if y is not None:
            return y
        pallas = False
    if isinstance(w, W8A8Weight):
        n = _trailing_leading(spec)
        if not n:
            raise ValueError(f"W8A8 needs the contraction axes last in x and first in w; "
                             f"got {spec!r}")
        return _w8a8_matmul(x, w, n)
    if isinstance(w, Int8Weight):
        n = _trailing_leading(spec)
        if pallas and n and w.q.ndim == len(_split_spec(spec)[1]):  # one layer's weight
            def local(x, w):
                q2, scale2 = _as_matrix(w, n)
                lead = x.shape[:x.ndim - n]
                y = select.int8_matmul(x.reshape(-1, q2.shape[0]), q2, scale2,
                                       impl="mosaic" if pallas == "mosaic" else "pallas",
                                       group_size=w.group_size or None,
                                       interpret=sharded.interpret(mesh))
                return y.reshape(*lead, *w.q.shape[n:])

            return local(x, w) if mesh is None else sharded.einsum(spec, x, w, local, mesh)
        # XLA: dequantize then dot (XLA fuses the convert into the dot on GPU; not on CPU).
        w = dequantize(w).astype(x.dtype)
    n = _trailing_leading(spec)
    if n:
        # x [..., *K] @ w [*K, *out] as one 2-D matmul over the flattened contraction
        # axes: for a multi-axis contraction (o: heads x head width) XLA:CPU otherwise
        # picks a layout that transposes the whole weight on every call.
        k = 1
        for d in w.shape[:n]:
            k *= d
        lead, out = x.shape[:x.ndim - n], w.shape[n:]
        y = _dot(x.reshape(*lead, k), w.reshape(k, -1))
        return y.reshape(*lead, *out)
    return jnp.einsum(spec, x, w, **_accumulate(x, w)).astype(jnp.result_type(x, w))


def _accumulate(x, w) -> dict:
    """bf16 / fp16 operands: accumulate (and return) in float32, rounded by the caller.
    The same products and sums as a bf16 dot (XLA accumulates in float32 and rounds the
    result), asked for explicitly because XLA:CPU of jax < 0.11 then takes its native
    bf16 GEMM (YNNPACK) instead of converting both operands to float32 first: 180-370 vs
    64-164 GFLOP/s on prefill shapes of gpt2 (2-core AMD EPYC, AVX-512 BF16); jax 0.12
    runs either form natively."""
    low = jnp.result_type(x, w)
    return ({"preferred_element_type": jnp.float32}
            if low in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else {})


def _dot(x, w):
    """`x @ w` in the promoted dtype, accumulated as `_accumulate` says."""
    return jnp.matmul(x, w, **_accumulate(x, w)).astype(jnp.result_type(x, w))


def take(table, ids, dtype):
    """Rows `ids` of an embedding table (float or per-row `Int8Weight`) in `dtype`."""
    if isinstance(table, Int8Weight):
        rows = jnp.take(table.q, ids, axis=0).astype(jnp.float32)
        return (rows * jnp.take(table.scale, ids, axis=0)).astype(dtype)
    return jnp.take(table, ids, axis=0)


def logits(x, head, kernels: str = "xla"):
    """`x [B, T, E] @ head [V, E]^T` in float32 (head float or per-row `Int8Weight`).
    kernels "cpu": a few rows against a bf16 / int8 table go through
    `pallas_kernels.cpu_matmul` (the table read once, as stored; see `preferred`)."""
    b, t, e = x.shape
    if kernels == "cpu":
        table, scale = (head.q, head.scale[:, 0]) if isinstance(head, Int8Weight) else (head, None)
        x2 = x.reshape(b * t, e)
        if (cpu_matmul.preferred(b * t, table.dtype, nk=True)
                and cpu_matmul.supported(x2, table, scale, nk=True) is None):
            return cpu_matmul.matmul(x2, table, scale, nk=True).reshape(b, t, -1)
    if isinstance(head, Int8Weight):
        # Per-row scale = per output channel: scale the [B, T, V] result, not the table.
        y = jnp.einsum("bte,ve->btv", x, head.q.astype(x.dtype),
                       preferred_element_type=jnp.float32)
        return y * head.scale[:, 0]
    return jnp.einsum("bte,ve->btv", x, head, preferred_element_type=jnp.float32)


# -- whole params pytrees -----------------------------------------------------------

MODES = ("int8", "int8-g128", "w8a8")


def check_mode(mode):
    if mode is not None and mode not in MODES:
        raise ValueError(f"quant must be one of {[None, *MODES]}, got {mode!r}")


def map_quantizable(cfg: ModelConfig, params: dict, kernel_fn, table_fn) -> dict:
    """Applies `kernel_fn(path, weight, spec)` to every param the spec table marks
    "channel" (block matmul kernels, stacked) and `table_fn(weight)` to every "rows"
    param (embedding tables); everything else (norms, biases, project_in/out) is kept.
    A weight that is quantized already is kept as it is."""
    flat_specs = flatten(param_specs(cfg))
    out = {}
    for path, w in flatten(params, is_leaf=is_quantized).items():
        spec: ParamSpec = flat_specs.get(path)
        if spec is None or is_quantized(w) or spec.quant is None:
            out[path] = w
        elif spec.quant == "rows":
            out[path] = table_fn(w)
        else:
            out[path] = kernel_fn(path, w, spec)
    return unflatten(out)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_stacked(w, n_contract: int, group_size: int) -> Int8Weight:
    return jax.vmap(lambda x: quantize(x, n_contract, group_size))(w)  # over the layers axis


def quantize_params(cfg: ModelConfig, params: dict, group_size: int = 0) -> dict:
    """Weight-only int8 of canonical (stacked) params: block kernels per output channel
    (or per group of input rows), embedding tables per row."""
    return map_quantizable(
        cfg, params, lambda path, w, spec: _quantize_stacked(w, spec.contract, group_size),
        quantize_rows)


def mode_of(params) -> Optional[str]:
    """"int8", "int8-g<N>", "w8a8" or None, from the weight types found in params."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_quantized)
    if any(isinstance(x, W8A8Weight) for x in leaves):
        return "w8a8"
    groups = {x.group_size for x in leaves if isinstance(x, Int8Weight)}
    if not groups:
        return None
    g = max(groups)
    return f"int8-g{g}" if g else "int8"


def param_bytes(params) -> int:
    """Bytes of every param leaf (int8 values and their scales included)."""
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def to_tensors(params, prefix: str = "") -> dict:
    """Flat {"a/b/kernel/q": array, ".../scale": ...} for the native checkpoint."""
    out = {}
    for k, v in params.items():
        path = f"{prefix}{k}"
        if isinstance(v, Int8Weight):
            out[f"{path}/q"], out[f"{path}/scale"] = v.q, v.scale
        elif isinstance(v, W8A8Weight):
            out.update({f"{path}/q": v.q, f"{path}/scale": v.scale, f"{path}/smooth": v.smooth})
            if v.act_scale is not None:
                out[f"{path}/act_scale"] = v.act_scale
        elif hasattr(v, "items"):
            out.update(to_tensors(v, f"{path}/"))
        else:
            out[path] = v
    return out


def from_tensors(tensors: dict, path: str, shape: tuple, group_size: int, where: str):
    """Rebuilds the quantized weight stored under `path` (None if it is not quantized).

    group_size: the checkpoint's group size for block kernels (0 for tables).

    Raises:
      ValueError: the int8 tensor's shape is not the float weight's `shape`.
    """
    if f"{path}/q" not in tensors:
        return None
    q = tensors[f"{path}/q"]
    scale = tensors.get(f"{path}/scale")
    if tuple(q.shape) != tuple(shape) or q.dtype != jnp.int8 or scale is None:
        raise ValueError(f"{where}: {path}/q is {q.dtype} {tuple(q.shape)} (scale "
                         f"{'missing' if scale is None else 'present'}); expected int8 "
                         f"{tuple(shape)} with a {path}/scale")
    if f"{path}/smooth" in tensors:
        return W8A8Weight(q, scale, tensors[f"{path}/smooth"], tensors.get(f"{path}/act_scale"))
    # Stored block kernels are stacked: scale is [L, G, 1, *out].
    return Int8Weight(q, scale, group_size, scale.ndim - 3 if group_size else 0)
