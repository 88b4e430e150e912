"""Layout transforms shared by the converter tables: checkpoint tensor -> canonical param.

Each is `f(x, cfg) -> array`. PyTorch `nn.Linear` weights are `[out, in]`;
canonical kernels are `[in, ...out]` with heads explicit (module docstring of
`converters`). A tensor of the wrong size makes a transform raise; `apply_rules`
turns that into a CheckpointError naming the tensor.
"""

from __future__ import annotations

from ftjax.config import ModelConfig


def transpose(x, cfg: ModelConfig):
    """`nn.Linear` weight `[out, in]` -> kernel `[in, out]`."""
    return x.T


def linear_out_heads(x, cfg: ModelConfig):
    """Attention output `nn.Linear` weight `[D, N*H]` -> `[N, H, D]`."""
    return x.T.reshape(cfg.n_heads, cfg.head_dim, x.shape[0])


def linear_in_heads(kv: bool = False):
    """q (or k/v with kv=True) `nn.Linear` weight `[X*H, D]` -> `[D, X, H]`; bias -> `[X, H]`."""
    def f(x, cfg: ModelConfig):
        heads = cfg.n_kv_heads if kv else cfg.n_heads
        if x.ndim == 2:
            return x.reshape(heads, cfg.head_dim, x.shape[1]).transpose(2, 0, 1)
        return x.reshape(heads, cfg.head_dim)
    return f


def fused_per_head(part: int):
    """Part (0 q, 1 k, 2 v) of a fused QKV `nn.Linear` whose output axis is laid out
    per head, `[N, 3, H]` (BLOOM, GPT-NeoX, GPTBigCode MHA): weight `[N*3*H, D]` ->
    `[D, N, H]`, bias `[N*3*H]` -> `[N, H]`."""
    def f(x, cfg: ModelConfig):
        n, h = cfg.n_heads, cfg.head_dim
        if x.ndim == 2:
            return x.reshape(n, 3, h, x.shape[1])[:, part].transpose(2, 0, 1)
        return x.reshape(n, 3, h)[:, part]
    return f
