"""ModelConfig: one frozen dataclass that describes the whole GPT family.

Architecture only: no runtime knobs (dtype, batch, cache length) live here.
A new architecture is a converter mapping plus values of these fields, never a
new model class.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Optional, Tuple, Union

from ftjax.errors import ModelConfigError

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu")
POSITIONS = ("learned", "rotary", "alibi", "none")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and variant fields of a decoder-only transformer.

    Attributes:
      vocab_size: V, rows of the token embedding.
      d_model: D, the residual width.
      n_layers: L, number of transformer blocks.
      n_heads: N, query heads.
      n_kv_heads: K, key/value heads (N: MHA, 1: MQA, in between: GQA).
      head_dim: H, per-head width.
      d_ff: F, MLP hidden width.
      max_positions: the longest sequence the model accepts.
      norm: "layernorm" or "rmsnorm".
      norm_eps: epsilon of every norm.
      activation: MLP activation ("gelu_new" is GPT-2's tanh approximation).
      positions: "learned" absolute embeddings, "rotary", "alibi" or "none".
      position_offset: added to position ids before the learned lookup (OPT: 2).
      rotary_dim: with rotary positions, how many leading dims of each head rotate
        (None: all). Rotation is always "rotate-half" (NeoX/Llama); converters
        permute rotate-every-two checkpoints (GPT-J) into it at load.
      rope_theta: rotary base.
      attn_bias: q/k/v/o projections carry biases.
      mlp_bias: MLP projections carry biases.
      glu: gated MLP, act(x @ wg) * (x @ wi) (Llama's SwiGLU with activation "silu").
      norm_position: "pre" (x + f(norm(x))) or "post" (norm(x + f(x)), OPT-350m).
      parallel_residual: x + attn(norm1(x)) + mlp(norm2(x)) (GPT-J, NeoX).
      shared_norm: with parallel_residual, attn and mlp read one norm (GPT-J).
      residual_from_norm: the residual is the norm's output, not its input
        (BLOOM's apply_residual_connection_post_layernorm).
      embed_norm: a norm right after the token embedding (BLOOM).
      final_norm: a norm before the LM head.
      d_embed: embedding width when it differs from d_model (OPT-350m's
        project_in / project_out); None means d_model.
      tied_embeddings: the LM head reuses the token embedding.
      lm_head_bias: the LM head carries a bias (GPT-J).
      bos_token_id: the begin-of-sequence id, or None.
      eos_token_id: the end-of-sequence id, several (a tuple: Llama 3 lists more
        than one), or None. Generation stops at any of them by default.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_positions: int
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu_new"
    positions: str = "learned"
    position_offset: int = 0
    rotary_dim: Optional[int] = None
    rope_theta: float = 10000.0
    attn_bias: bool = True
    mlp_bias: bool = True
    glu: bool = False
    norm_position: str = "pre"
    parallel_residual: bool = False
    shared_norm: bool = False
    residual_from_norm: bool = False
    embed_norm: bool = False
    final_norm: bool = True
    d_embed: Optional[int] = None
    tied_embeddings: bool = True
    lm_head_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Union[None, int, Tuple[int, ...]] = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, (list, tuple)):  # JSON gives lists; keep it hashable
            object.__setattr__(self, "eos_token_id", tuple(
                int(i) if isinstance(i, numbers.Integral) and not isinstance(i, bool) else i
                for i in self.eos_token_id))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "d_ff", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelConfigError(
                f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of "
                f"n_kv_heads ({self.n_kv_heads})")
        if self.norm not in NORMS:
            raise ModelConfigError(f"ModelConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ModelConfigError(
                f"ModelConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.positions not in POSITIONS:
            raise ModelConfigError(
                f"ModelConfig.positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.norm_position not in ("pre", "post"):
            raise ModelConfigError(
                f"ModelConfig.norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        rd = self.rotary_dim
        if rd is not None and not (0 < rd <= self.head_dim and rd % 2 == 0):
            raise ModelConfigError(f"ModelConfig.rotary_dim must be even and in (0, head_dim="
                             f"{self.head_dim}], got {rd!r}")
        if self.norm_position == "post" and (self.parallel_residual or self.residual_from_norm):
            raise ModelConfigError("ModelConfig.norm_position='post' cannot combine with "
                             "parallel_residual or residual_from_norm")
        if self.shared_norm and not self.parallel_residual:
            raise ModelConfigError("ModelConfig.shared_norm needs parallel_residual=True")
        self._check_numbers()

    def _check_numbers(self):
        """Floats finite and positive, token ids inside the vocabulary: a negative
        epsilon gives NaN logits and an eos id past the vocabulary never stops."""
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not math.isfinite(value) or value <= 0):
                raise ModelConfigError(f"ModelConfig.{name} must be a finite number > 0, "
                                       f"got {value!r}")
        if (isinstance(self.position_offset, bool) or not isinstance(self.position_offset, int)
                or self.position_offset < 0):
            raise ModelConfigError(f"ModelConfig.position_offset must be an int >= 0, got "
                                   f"{self.position_offset!r}")
        if self.d_embed is not None and (isinstance(self.d_embed, bool)
                                         or not isinstance(self.d_embed, int) or self.d_embed <= 0):
            raise ModelConfigError(f"ModelConfig.d_embed must be None or a positive int, got "
                                   f"{self.d_embed!r}")
        for name in ("attn_bias", "mlp_bias", "glu", "parallel_residual", "shared_norm",
                     "residual_from_norm", "embed_norm", "final_norm", "tied_embeddings",
                     "lm_head_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(f"ModelConfig.{name} must be a bool, got "
                                       f"{getattr(self, name)!r}")
        ids = [("bos_token_id", self.bos_token_id)]
        if isinstance(self.eos_token_id, tuple):
            ids += [(f"eos_token_id[{i}]", t) for i, t in enumerate(self.eos_token_id)]
        else:
            ids.append(("eos_token_id", self.eos_token_id))
        for name, value in ids:
            if value is None and "[" not in name:
                continue
            if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                    or not 0 <= value < self.vocab_size):
                raise ModelConfigError(f"ModelConfig.{name} must be a token id in "
                                       f"[0, vocab_size={self.vocab_size}), got {value!r}")

    @property
    def eos_token_ids(self) -> Tuple[int, ...]:
        """Every end-of-sequence id (empty when there is none)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, tuple):
            return self.eos_token_id
        return (self.eos_token_id,)

    @property
    def embed_dim(self) -> int:
        """E: the token embedding width (d_embed, or d_model)."""
        return self.d_embed or self.d_model

    @property
    def n_rotary(self) -> int:
        return self.rotary_dim or self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def gpt2_preset(d_model: int, n_layers: int, n_heads: int, vocab_size: int = 50257,
                max_positions: int = 1024) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                       n_heads=n_heads, n_kv_heads=n_heads, head_dim=d_model // n_heads,
                       d_ff=4 * d_model, max_positions=max_positions,
                       bos_token_id=50256, eos_token_id=50256)


# Named shapes for benchmarks and planning: random weights, no download.
PRESETS = {
    "gpt2-124m": lambda: gpt2_preset(768, 12, 12),
    "gpt2-350m": lambda: gpt2_preset(1024, 24, 16),
    "gpt2-774m": lambda: gpt2_preset(1280, 36, 20),
    "gpt2-1.5b": lambda: gpt2_preset(1600, 48, 25),
    # GPT-3 175B (Brown et al. 2020, table 2.1): for `ftjax plan`.
    "gpt3-175b": lambda: gpt2_preset(12288, 96, 96, max_positions=2048),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()
