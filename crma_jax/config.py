"""`ModelConfig`: one typed description of every supported decoder, parsed from an HF config.

The decoder in `model.py` reads only this dataclass, never a raw HF dict, so every architecture
difference (Gemma's norm, Gemma-2's soft-capping, Mistral's window) is one named field here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "gemma", "gemma2")

_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu": "gelu",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `theta`, plus optional "linear" or "llama3" frequency scaling."""

    theta: float = 10000.0
    kind: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer in the Llama/Mistral/Gemma/Gemma-2 family."""

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
    # Gemma-2: extra norms around attention and MLP outputs, and tanh soft-capping.
    sandwich_norms: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    # Per-layer attention window (None = full causal attention).
    layer_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
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
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return 1.0 / math.sqrt(base)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Parse an HF `config.json` dict; raises ValueError for an unsupported `model_type`."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ValueError(f"{key}=True is not supported (model_type {model_type!r})")
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        layers = int(hf["num_hidden_layers"])
        gemma = model_type in ("gemma", "gemma2")
        act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if model_type == "gemma" and act_name == "gelu":  # legacy Gemma value: transformers reads it as tanh GELU
            act_name = "gelu_pytorch_tanh"
        if act_name not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {act_name!r}")
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            activation=_ACTIVATIONS[act_name],
            gemma_norm=gemma,
            scale_embedding=gemma,
            sandwich_norms=model_type == "gemma2",
            attn_logit_softcap=hf.get("attn_logit_softcapping") if model_type == "gemma2" else None,
            final_logit_softcap=hf.get("final_logit_softcapping") if model_type == "gemma2" else None,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if model_type == "gemma2" else None,
            layer_windows=_windows_from_hf(hf, model_type, layers),
            bos_token_id=_first(hf.get("bos_token_id")),
            eos_token_id=_first(hf.get("eos_token_id")),
            pad_token_id=_first(hf.get("pad_token_id")),
        )


def _first(x: Any) -> int | None:
    if isinstance(x, (list, tuple)):
        return int(x[0]) if x else None
    return None if x is None else int(x)


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    # transformers >= 5 nests everything in `rope_parameters`; older configs use
    # `rope_theta` plus an optional `rope_scaling` dict.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope type {kind!r} (supported: default, linear, llama3)")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )


def _windows_from_hf(hf: Mapping[str, Any], model_type: str, layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if model_type not in ("mistral", "gemma2") or not window:
        return ()
    layer_types = hf.get("layer_types")
    if layer_types is None and model_type == "gemma2":
        # Gemma-2 before `layer_types` existed: even layers slide, odd layers see everything.
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if layer_types is None:
        return (int(window),) * layers
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
