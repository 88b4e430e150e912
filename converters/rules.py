"""One loader over declarative key tables: checkpoint tensors -> canonical params.

An architecture provides a list of `Rule`s. Each rule names a canonical param path
(e.g. "layers/attn/q/kernel"), the checkpoint key it comes from ("{i}" stands for
the layer index; such rules are stacked on a leading layers axis) and a transform
to the canonical layout. Several rules may read one fused tensor (QKV). Every
checkpoint tensor must be consumed by a rule or explicitly ignorable: nothing a
user gave is dropped silently, and a tensor of the wrong shape is an error.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Sequence

import numpy as np

from ftjax.errors import CheckpointError
from ftjax.specs import flatten, unflatten


def _identity(x, cfg):
    return x


@dataclasses.dataclass(frozen=True)
class Rule:
    dst: str
    src: str
    transform: Callable = _identity


def norm(dst: str, src: str, cfg, scale: Callable = _identity) -> List[Rule]:
    """A norm's rules: `dst/scale` from `src.weight` (through `scale`), and `dst/bias` from
    `src.bias` when the config's norm has one (layernorm)."""
    out = [Rule(f"{dst}/scale", f"{src}.weight", scale)]
    if cfg.norm == "layernorm":
        out.append(Rule(f"{dst}/bias", f"{src}.bias"))
    return out


def linear(dst: str, src: str, kernel: Callable = _identity, bias: bool = False,
           bias_transform: Callable = _identity) -> List[Rule]:
    """A projection's rules: `dst/kernel` from `src.weight` (through `kernel`), and
    `dst/bias` from `src.bias` (through `bias_transform`) when `bias`."""
    out = [Rule(f"{dst}/kernel", f"{src}.weight", kernel)]
    if bias:
        out.append(Rule(f"{dst}/bias", f"{src}.bias", bias_transform))
    return out


def apply_rules(tensors: Dict[str, np.ndarray], rules: Sequence[Rule], cfg, expected,
                ignore: Sequence[str] = (), where: str = "checkpoint") -> dict:
    """Builds the canonical params pytree (numpy leaves) from checkpoint tensors.

    Args:
      tensors: checkpoint key -> array.
      rules: the architecture's table.
      cfg: the ModelConfig (transforms read head counts from it).
      expected: the canonical params of shapes, nested or flat ("a/b/c" paths):
        `ftjax.specs.shapes(cfg)` or a part of it.
      ignore: regexes of checkpoint keys that carry no weights (e.g. causal-mask buffers).
      where: the checkpoint's path, for messages.
    """
    want = {k: tuple(v.shape) for k, v in flatten(expected).items()}
    used: set = set()
    flat: dict = {}

    def fetch(key):
        if key not in tensors:
            raise CheckpointError(f"{where}: missing tensor {key!r}")
        used.add(key)
        return np.asarray(tensors[key])

    def convert(rule, key):
        x = fetch(key)
        try:
            return rule.transform(x, cfg)
        except (ValueError, IndexError) as e:  # a reshape of a tensor of the wrong size
            raise CheckpointError(
                f"{where}: tensor {key!r} of shape {tuple(x.shape)} does not fit {rule.dst} "
                f"for this config ({e})") from e

    for rule in rules:
        if rule.dst not in want:
            raise CheckpointError(f"{where}: converter rule targets unknown param {rule.dst!r}")
        if "{i}" in rule.src:
            value = np.stack([convert(rule, rule.src.format(i=i)) for i in range(cfg.n_layers)])
        else:
            value = convert(rule, rule.src)
        if tuple(value.shape) != want[rule.dst]:
            raise CheckpointError(
                f"{where}: tensor {rule.src!r} gives {rule.dst} of shape {tuple(value.shape)}, "
                f"expected {want[rule.dst]} for this config")
        flat[rule.dst] = value

    missing = sorted(set(want) - {r.dst for r in rules})
    if missing:
        raise CheckpointError(f"{where}: no checkpoint tensor maps to params {missing}")
    patterns = [re.compile(p) for p in ignore]
    extra = sorted(k for k in tensors
                   if k not in used and not any(p.fullmatch(k) for p in patterns))
    if extra:
        shown = extra[:8] + (["..."] if len(extra) > 8 else [])
        raise CheckpointError(
            f"{where}: tensors this converter does not understand (refusing to drop them): {shown}")
    return unflatten(flat)


def check_keys(hf_config: dict, where: str, required: Sequence[str]) -> None:
    """Raises unless every `required` key holds a positive int."""
    missing = [k for k in required if k not in hf_config]
    if missing:
        raise CheckpointError(f"{where}: config.json lacks required keys {missing}")
    for k in required:
        v = hf_config[k]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(f"{where}: config.json key {k!r} must be a positive int, "
                                  f"got {v!r}")


def supported(value, allowed, what: str, where: str):
    """`value` if it is one of `allowed`; else CheckpointError naming `what` (e.g. "args.x",
    "config.json key 'x'"): a math-changing setting ftjax does not implement."""
    if value not in allowed:
        raise CheckpointError(f"{where}: {what} = {value!r} is not supported (supported: "
                              f"{list(allowed)}); refusing to load with different numerics")
    return value


def require_value(hf_config: dict, key: str, allowed: List, where: str, default=None):
    """`supported` for a config.json key (absent: `default`)."""
    return supported(hf_config.get(key, default), allowed, f"config.json key {key!r}", where)
