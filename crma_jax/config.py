"""`ModelConfig`: one typed description of every supported decoder, parsed from an HF config.

The decoder in `model.py` reads only this dataclass, never a raw HF dict, so every architecture
difference (Gemma's norm, Gemma-2's soft-capping, Qwen3's q/k norm, Gemma-3's local RoPE) is
one named field here. Which HF model types exist and what each turns on is the declarative
`FAMILIES` table (`crma_jax.families`); nothing else branches on `model_type`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from crma_jax.families import FAMILIES, Family

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu": "gelu",
}
ROPE_KINDS = ("default", "linear", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `theta`, plus optional "linear", "llama3" or "longrope" (Phi-3's `su`)
    frequency scaling. LongRoPE divides each frequency by `short_factor` (positions within
    `original_max_position_embeddings`) or `long_factor` (beyond), and multiplies cos/sin by
    `attention_factor`."""

    theta: float = 10000.0
    kind: str = "default"  # one of ROPE_KINDS
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer of one of the `FAMILIES` (Llama, Mistral, Gemma 1-3, Qwen2/3, Phi-3)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    # Gemma family: RMSNorm scales by (1 + w) and the embedding is multiplied by sqrt(d).
    gemma_norm: bool = False
    scale_embedding: bool = False
    # Gemma-2/3: extra norms around attention and MLP outputs; Gemma-2: tanh soft-capping.
    sandwich_norms: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    # Per-layer attention window (None = full causal attention).
    layer_windows: tuple[int | None, ...] = ()
    # Projections (q_proj, ..., down_proj) that carry a bias (Qwen2: q, k, v).
    biases: tuple[str, ...] = ()
    # Qwen3 / Gemma-3: RMSNorm over each head's q and k before RoPE.
    qk_norm: bool = False
    # Gemma-3: the RoPE of sliding-window layers (the others use `rope`).
    local_rope: RopeConfig | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "head_dim": self.head_dim,
                 "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                 "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads}
        for key, value in sizes.items():
            if value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value}")
        matrices = {"vocab_size x hidden_size": self.vocab_size * self.hidden_size,
                    "hidden_size x intermediate_size": self.hidden_size * self.intermediate_size,
                    "hidden_size x num_attention_heads x head_dim": self.hidden_size * self.num_heads * self.head_dim}
        for name, elements in matrices.items():
            if elements > MAX_MATRIX_ELEMENTS:
                raise ValueError(f"{name} = {elements:.3g} elements in one weight matrix, more than any real model "
                                 f"has ({MAX_MATRIX_ELEMENTS:.3g}); is the config right?")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")
        if self.activation not in ("silu", "gelu_tanh", "gelu"):
            raise ValueError(f"unknown activation {self.activation!r}")

    @property
    def windows(self) -> tuple[int | None, ...]:
        return self.layer_windows or (None,) * self.num_layers

    @property
    def layer_ropes(self) -> tuple[int, ...]:
        """Per layer, which RoPE table it uses: 0 for `rope`, 1 for `local_rope` (windowed layers)."""
        if self.local_rope is None:
            return (0,) * self.num_layers
        return tuple(int(w is not None) for w in self.windows)

    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return 1.0 / math.sqrt(base)

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Parse an HF `config.json` dict; raises ValueError for an unsupported `model_type`."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        fam = FAMILIES[model_type]
        heads = _size(hf, "num_attention_heads")
        hidden = _size(hf, "hidden_size")
        layers = _size(hf, "num_hidden_layers")
        head_dim = _size(hf, "head_dim") if hf.get("head_dim") else hidden // heads
        act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if model_type == "gemma" and act_name == "gelu":  # legacy Gemma value: transformers reads it as tanh GELU
            act_name = "gelu_pytorch_tanh"
        if act_name not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {act_name!r}")
        global_rope, local_rope = _ropes_from_hf(hf, fam, head_dim)
        return cls(
            model_type=model_type,
            vocab_size=_size(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_size(hf, "intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=_size(hf, "num_key_value_heads") if hf.get("num_key_value_heads") else heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=global_rope,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", fam.gemma)),
            activation=_ACTIVATIONS[act_name],
            gemma_norm=fam.gemma,
            scale_embedding=fam.gemma,
            sandwich_norms=fam.sandwich_norms,
            attn_logit_softcap=hf.get("attn_logit_softcapping") if fam.softcaps else None,
            final_logit_softcap=hf.get("final_logit_softcapping") if fam.softcaps else None,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if fam.query_pre_attn_scalar else None,
            layer_windows=_windows_from_hf(hf, fam, layers),
            biases=fam.biases_from_hf(hf),
            qk_norm=fam.qk_norm,
            local_rope=local_rope,
            bos_token_id=_first(hf.get("bos_token_id")),
            eos_token_id=_first(hf.get("eos_token_id")),
            pad_token_id=_first(hf.get("pad_token_id")),
        )


# More elements than this in one weight matrix is no model anyone trains (Llama-3 405B's largest
# has 2.1e9): a config that asks for it is a typo, refused before anything is allocated.
MAX_MATRIX_ELEMENTS = 1 << 36


def _size(hf: Mapping[str, Any], key: str) -> int:
    """`hf[key]` as a positive integer; ValueError naming the key otherwise."""
    value = hf[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or value < 1):
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


def _first(x: Any) -> int | None:
    if isinstance(x, (list, tuple)):
        return int(x[0]) if x else None
    return None if x is None else int(x)


def _ropes_from_hf(hf: Mapping[str, Any], fam: Family, head_dim: int) -> tuple[RopeConfig, RopeConfig | None]:
    """(global RoPE, local RoPE or None). transformers >= 5 nests everything in
    `rope_parameters` (per layer type for Gemma-3); older configs use `rope_theta`, an optional
    `rope_scaling` dict and, for Gemma-3, `rope_local_base_freq`."""
    params = dict(hf.get("rope_parameters") or {})
    if not fam.local_rope:
        return _rope(hf, {**dict(hf.get("rope_scaling") or {}), **params}, fam.rope_theta, head_dim), None
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    full = {**dict(hf.get("rope_scaling") or {}), **full}
    full.setdefault("rope_theta", hf.get("rope_theta", fam.rope_theta))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    return _rope(hf, full, fam.rope_theta, head_dim), _rope(hf, local, 10000.0, head_dim)


def _rope(hf: Mapping[str, Any], merged: Mapping[str, Any], default_theta: float, head_dim: int) -> RopeConfig:
    theta = float(merged.get("rope_theta", hf.get("rope_theta", default_theta)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    kind = "longrope" if kind == "su" else kind
    if kind not in ROPE_KINDS:
        raise ValueError(f"unsupported rope type {kind!r} (supported: {', '.join(ROPE_KINDS)})")
    if float(merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    original = int(merged.get("original_max_position_embeddings", hf.get("original_max_position_embeddings", 8192)))
    extra: dict[str, Any] = {}
    if kind == "longrope":
        extra = _longrope(hf, merged, original, head_dim)
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(merged.get("factor") or 1.0),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        **extra,
    )


def _longrope(hf: Mapping[str, Any], merged: Mapping[str, Any], original: int, head_dim: int) -> dict[str, Any]:
    """LongRoPE's factors; the default attention factor as transformers derives it (from the
    context extension max_position_embeddings / original when `factor` is absent)."""
    short, long = tuple(map(float, merged["short_factor"])), tuple(map(float, merged["long_factor"]))
    if len(short) != head_dim // 2 or len(long) != head_dim // 2:
        raise ValueError(f"longrope short/long factors need head_dim/2 = {head_dim // 2} entries")
    factor = merged.get("factor") or int(hf.get("max_position_embeddings", original)) / original
    attention = merged.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return dict(short_factor=short, long_factor=long, attention_factor=float(attention))


def _windows_from_hf(hf: Mapping[str, Any], fam: Family, layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if not fam.sliding_window or not window:
        return ()
    if fam.window_flag and not hf.get(fam.window_flag):
        return ()
    layer_types = hf.get("layer_types")
    if layer_types is None and fam.default_layer_types is not None:
        layer_types = fam.default_layer_types(hf, layers)
    if layer_types is None:
        return (int(window),) * layers
    if len(layer_types) != layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {layers} layers")
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
