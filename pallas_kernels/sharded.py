"""The Pallas kernels on a device mesh: each call runs inside `jax.shard_map`.

XLA cannot partition a Pallas custom call: given sharded operands it gathers them
onto every device (the whole KV cache, every step) or refuses to compile. So every
kernel call here is wrapped in `shard_map` over the mesh axes its operands are
sharded on, and the kernel sees only its device's shard (local shapes):

  - attention: batch rows on "data", query and kv heads on "tensor". With fewer kv
    heads than tensor ranks (GQA / MQA, K < TP) the kv heads are replicated on every
    rank (as `ftjax.sharding` places them) and rank r's query heads all read kv head
    r // (TP / K) of its replica, in place (the kernels' `kv_head`);
  - int8 matmul, column-parallel (output features split, e.g. q/k/v, wi, wg): local;
    row-parallel (contraction split, o and wo): local, then `psum` over "tensor"
    (Megatron's all-reduce).

Only the axes a call uses are manual (`axis_names`); other mesh axes ("pipe") stay
with the enclosing program, so a pipeline stage's own shard_map composes with these.

Axis names are never hard-coded: `KernelMesh` pairs the mesh with the caller's
logical -> mesh axis rules (ftjax passes `ftjax.sharding.RULES`). An array dimension
that does not divide its mesh axis is replicated, the same rule the placement uses,
so the specs here match how the operands already lie (nothing moves).

Shape legend: B batch, T query length, N query heads, K kv heads, S slots, H head width.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Tuple

import jax
from jax.sharding import Mesh, PartitionSpec as P

# einsum letters of ftjax's model (its shape legend) -> logical axis names.
LETTERS: Mapping[str, str] = {"b": "batch", "t": "seq", "s": "cache_seq", "d": "embed",
                              "e": "embed", "n": "heads", "k": "kv_heads", "h": "head_dim",
                              "f": "ffn", "v": "vocab", "l": "layers"}


@dataclasses.dataclass(frozen=True)
class KernelMesh:
    """A mesh and the logical -> mesh axis rules its arrays were placed by (hashable,
    so it can be a flax module attribute).

    Attributes:
      mesh: the `jax.sharding.Mesh`.
      rules: ((logical axis, mesh axis or None), ...).
    """

    mesh: Mesh
    rules: Tuple[Tuple[str, Optional[str]], ...]

    @classmethod
    def of(cls, mesh: Mesh, rules: Mapping[str, Optional[str]]) -> "KernelMesh":
        unknown = {a for a in rules.values() if a is not None} - set(mesh.axis_names)
        if unknown:
            raise ValueError(f"rules name mesh axes {sorted(unknown)} that the mesh "
                             f"{tuple(mesh.axis_names)} does not have")
        return cls(mesh, tuple(sorted(rules.items())))

    def axis(self, logical: Optional[str], size: int) -> Optional[str]:
        """The mesh axis a dimension of `size` with this logical name is split on, or
        None (no rule, an axis of size 1, or a size it does not divide: replicated)."""
        name = dict(self.rules).get(logical) if logical else None
        if name is None or self.mesh.shape[name] == 1 or size % self.mesh.shape[name]:
            return None
        return name

    def size(self, name: Optional[str]) -> int:
        return 1 if name is None else self.mesh.shape[name]


def interpret(mesh: Optional[KernelMesh] = None) -> bool:
    """Whether the kernels must run in the Pallas interpreter: they compile only for
    GPUs. The platform is the mesh's (its devices, or an abstract mesh's device kind,
    e.g. when lowering for CUDA without one), else jax's default backend."""
    platform = jax.default_backend()
    if mesh is not None:
        m = mesh.mesh
        if isinstance(m, Mesh):
            platform = m.devices.flat[0].platform
        elif getattr(m, "abstract_device", None) is not None:
            platform = m.abstract_device.platform
    return platform not in ("gpu", "cuda", "rocm")


def _axes(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _shard_map(fn, km: KernelMesh, in_specs, out_specs):
    mesh, manual = km.mesh, set()
    ctx = jax.sharding.get_abstract_mesh()
    if not ctx.empty and tuple(ctx.axis_names) == tuple(mesh.axis_names):
        # Inside an enclosing shard_map (a pipeline stage, `ftjax.pipeline`): nest in its
        # mesh; the axes it made manual are local already, so the specs drop them.
        mesh = ctx
        manual = {a for a, t in zip(ctx.axis_names, ctx.axis_types)
                  if t == jax.sharding.AxisType.Manual}

    def local(spec):
        kept = [tuple(a for a in _axes(e) if a not in manual) for e in spec]
        return P(*(None if not k else k[0] if len(k) == 1 else k for k in kept))

    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    in_specs, out_specs = (jax.tree_util.tree_map(local, s, is_leaf=is_spec)
                           for s in (in_specs, out_specs))
    used = {a for spec in jax.tree_util.tree_leaves((in_specs, out_specs), is_leaf=is_spec)
            for e in spec for a in _axes(e)}
    free = frozenset(mesh.axis_names) - manual
    # check_vma off: the kernels are opaque custom calls; the specs below are exact.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names=frozenset(used) or free, check_vma=False)


def _head_plan(km: KernelMesh, n: int, kv: int):
    """(query-head axis, kv-head axis, ranks per kv head or 0) for N query, K kv heads."""
    tp = km.axis("heads", n)
    if tp is None:
        return None, None, 0
    kv_axis = km.axis("kv_heads", kv)
    if kv_axis == tp:
        return tp, tp, 0              # K divides TP's size: both split, groups stay whole
    if km.size(tp) % kv == 0:
        return tp, None, km.size(tp) // kv   # K < TP: each rank's heads share one kv head
    # A rank's query heads would span kv heads it cannot name: attend on every rank
    # over all heads (correct; only the K-does-not-divide-TP corner pays for it).
    return None, None, 0


def _cache_spec(layout: str, stacked: bool, batch, kv, ndim: int) -> P:
    """Spec of a cache (ndim 4/5) or its int8 scales (ndim 3/4)."""
    dims = [batch, None, kv] if layout == "BSKH" else [batch, kv, None]
    if ndim - int(stacked) == 4:
        dims.append(None)
    return P(*([None] * stacked + dims))


def _attention(kernel: Callable, km: KernelMesh, q, k_cache, v_cache, per_row: dict,
               kw: dict, *, alibi_slopes, k_scale, v_scale, layer, layout: str,
               q_heads_axis: int):
    b, n = q.shape[0], q.shape[q_heads_axis]
    stacked = layer is not None
    kv = k_cache.shape[1 + stacked + (layout == "BSKH")]
    batch = km.axis("batch", b)
    tp, kv_axis, per_kv = _head_plan(km, n, kv)
    q_spec = [None] * q.ndim
    q_spec[0], q_spec[q_heads_axis] = batch, tp
    q_spec = P(*q_spec)
    args = {"q": q, "k_cache": k_cache, "v_cache": v_cache, **per_row}
    specs = {"q": q_spec, "k_cache": _cache_spec(layout, stacked, batch, kv_axis, k_cache.ndim),
             "v_cache": _cache_spec(layout, stacked, batch, kv_axis, v_cache.ndim)}
    specs.update({name: P(batch, *([None] * (x.ndim - 1))) for name, x in per_row.items()})
    for name, x in (("alibi_slopes", alibi_slopes), ("k_scale", k_scale), ("v_scale", v_scale),
                    ("layer", layer)):
        if x is None:
            continue
        args[name] = x
        specs[name] = (P(tp) if name == "alibi_slopes" else P() if name == "layer"
                       else _cache_spec(layout, stacked, batch, kv_axis, x.ndim))

    def local(a):
        kv_head = None
        if per_kv:
            kv_head = jax.lax.axis_index(tp) // per_kv
        return kernel(**a, kv_head=kv_head, layout=layout, **kw)

    return _shard_map(local, km, (specs,), q_spec)(args)


def decode_attention(q, k_cache, v_cache, lengths, *, mesh: Optional[KernelMesh],
                     kernel: Callable, alibi_slopes=None, k_scale=None, v_scale=None,
                     layer=None, layout: str = "BKSH", **kw):
    """`kernel` (a decode-attention kernel, e.g. `pallas_kernels.decode_attention`) on
    the mesh: arguments and result as the kernel's, global shapes; mesh None: a plain
    call. Extra keywords (block sizes, interpret) go to the kernel."""
    if mesh is None:
        return kernel(q, k_cache, v_cache, lengths, alibi_slopes=alibi_slopes, k_scale=k_scale,
                      v_scale=v_scale, layer=layer, layout=layout, **kw)
    return _attention(kernel, mesh, q, k_cache, v_cache, {"lengths": lengths}, kw,
                      alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale, layer=layer,
                      layout=layout, q_heads_axis=1)


def prefill_attention(q, k_cache, v_cache, positions, lengths=None, *,
                      mesh: Optional[KernelMesh], kernel: Callable, alibi_slopes=None,
                      layer=None, layout: str = "BKSH", **kw):
    """`kernel` (a prefill-attention kernel, e.g. `pallas_kernels.prefill_attention`) on
    the mesh; see `decode_attention`."""
    if mesh is None:
        return kernel(q, k_cache, v_cache, positions, lengths, alibi_slopes=alibi_slopes,
                      layer=layer, layout=layout, **kw)
    per_row = {"positions": positions}
    if lengths is not None:
        per_row["lengths"] = lengths
    return _attention(kernel, mesh, q, k_cache, v_cache, per_row, kw, alibi_slopes=alibi_slopes,
                      k_scale=None, v_scale=None, layer=layer, layout=layout, q_heads_axis=2)


def einsum(spec: str, x, w, local: Callable, mesh: KernelMesh):
    """`local(x, w)` (an einsum by `spec`, e.g. the int8 matmul kernel) on the mesh.

    Each operand dimension is split as its einsum letter's logical axis says (`LETTERS`);
    `w` may be a pytree (an int8 weight and its scales) whose leaves all carry the
    weight's axes, size-1 axes replicated. Contraction dimensions that are split
    (row-parallel) are summed over their mesh axes after the local product; split
    output dimensions (column-parallel) stay split.

    Returns:
      the product, global shape, sharded on the output letters' mesh axes.
    """
    ins, out = spec.split("->")
    xs, ws = ins.split(",")

    def spec_of(letters, shape):
        axes, seen = [], set()
        for c, size in zip(letters, shape):
            a = mesh.axis(LETTERS.get(c), size)
            a = None if a in seen else a      # one mesh axis splits one dimension
            seen.add(a)
            axes.append(a)
        return axes

    x_axes = spec_of(xs, x.shape)
    w_leaves, treedef = jax.tree_util.tree_flatten(w)
    w_axes = spec_of(ws, w_leaves[0].shape)   # the weight itself comes first
    w_specs = [P(*spec_of(ws, leaf.shape)) for leaf in w_leaves]
    by_letter = {}
    for letters, axes in ((ws, w_axes), (xs, x_axes)):
        by_letter.update({c: a for c, a in zip(letters, axes) if a is not None})
    out_axes = [by_letter.get(c) for c in out]
    # A contraction dimension split on one operand only would need a reshard first.
    for c in set(xs) & set(ws):
        if dict(zip(xs, x_axes)).get(c) != dict(zip(ws, w_axes)).get(c):
            raise ValueError(f"einsum {spec!r}: dimension {c!r} is split differently on x "
                             f"{x_axes} and w {w_axes}")
    summed = tuple(sorted({by_letter[c] for c in set(xs) & set(ws) - set(out)
                           if c in by_letter}))

    def body(xl, wl):
        y = local(xl, wl)
        return jax.lax.psum(y, summed) if summed else y

    w_spec_tree = jax.tree_util.tree_unflatten(treedef, w_specs)
    return _shard_map(body, mesh, (P(*x_axes), w_spec_tree), P(*out_axes))(x, w)
