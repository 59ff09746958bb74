"""The model families crma-jax reads, as one declarative table keyed by HF `model_type`.

A `Family` says which architectural features an HF `model_type` turns on (parsed into
`ModelConfig` by `ModelConfig.from_hf`), how its checkpoints name and lay out tensors (fused
projections, GGUF architecture and permutation), and which HF class a merged export names.
Adding a family is adding a row here; no other module branches on `model_type`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LayerTypes = Callable[[Mapping[str, Any], int], "list[str] | None"]


def _gemma2_layer_types(hf: Mapping[str, Any], layers: int) -> list[str]:
    # Gemma-2 before `layer_types` existed: even layers slide, odd layers see everything.
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


def _gemma3_layer_types(hf: Mapping[str, Any], layers: int) -> list[str]:
    # Gemma-3 hub configs before `layer_types`: every `sliding_window_pattern`-th layer is global.
    pattern = int(hf.get("sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def _qwen_layer_types(hf: Mapping[str, Any], layers: int) -> list[str]:
    # Qwen2/3: with use_sliding_window, layers from `max_window_layers` on slide.
    first = int(hf.get("max_window_layers", layers))
    return ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF `model_type`: what its decoder has and how its checkpoints are laid out.

    `fused` lists HF modules that hold several of our projections stacked along the output
    rows (Phi-3's `self_attn.qkv_proj` = q, k, v); the loader splits them and exports fuse them
    back. `gguf_arch` is llama.cpp's `general.architecture`; `gguf_permute_qk` says whether its
    converter reordered q/k rows for interleaved RoPE (llama-style archs only; Qwen, Gemma and
    Phi-3 use rotate-half "NeoX" RoPE and are stored as in HF).
    """

    architecture: str
    gemma: bool = False  # (1 + w) RMSNorm, sqrt(d)-scaled embedding, tied head by default
    sandwich_norms: bool = False
    softcaps: bool = False
    query_pre_attn_scalar: bool = False
    qk_norm: bool = False
    local_rope: bool = False
    rope_theta: float = 10000.0
    sliding_window: bool = False
    window_flag: str | None = None  # HF key that must be true for `sliding_window` to apply
    default_layer_types: LayerTypes | None = None
    fixed_biases: tuple[str, ...] = ()
    bias_flags: bool = True  # honour `attention_bias` / `mlp_bias`
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    gguf_arch: str | None = None
    gguf_permute_qk: bool = False
    gguf_norm_offset: float = 0.0  # llama.cpp stores Gemma's RMSNorm weights as w + 1

    def biases_from_hf(self, hf: Mapping[str, Any]) -> tuple[str, ...]:
        """The projections with a bias, from the family's fixed ones and the HF flags."""
        out = list(self.fixed_biases)
        if self.bias_flags and hf.get("attention_bias"):
            out += ATTENTION_PROJECTIONS
        if self.bias_flags and hf.get("mlp_bias"):
            out += MLP_PROJECTIONS
        return tuple(p for p in ATTENTION_PROJECTIONS + MLP_PROJECTIONS if p in out)


_GEMMA = dict(gemma=True, bias_flags=False)
_PHI3_FUSED = (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp.gate_up_proj", ("gate_proj", "up_proj")))

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", gguf_arch="llama", gguf_permute_qk=True),
    "mistral": Family("MistralForCausalLM", sliding_window=True, bias_flags=False),
    "gemma": Family("GemmaForCausalLM", **_GEMMA),
    "gemma2": Family("Gemma2ForCausalLM", sandwich_norms=True, softcaps=True, query_pre_attn_scalar=True,
                     sliding_window=True, default_layer_types=_gemma2_layer_types, **_GEMMA),
    "gemma3_text": Family("Gemma3ForCausalLM", sandwich_norms=True, softcaps=True, query_pre_attn_scalar=True,
                          qk_norm=True, local_rope=True, rope_theta=1e6, sliding_window=True,
                          default_layer_types=_gemma3_layer_types, gguf_arch="gemma3", gguf_norm_offset=1.0,
                          **_GEMMA),
    "qwen2": Family("Qwen2ForCausalLM", fixed_biases=("q_proj", "k_proj", "v_proj"), bias_flags=False,
                    sliding_window=True, window_flag="use_sliding_window", default_layer_types=_qwen_layer_types,
                    gguf_arch="qwen2"),
    "qwen3": Family("Qwen3ForCausalLM", qk_norm=True, sliding_window=True, window_flag="use_sliding_window",
                    default_layer_types=_qwen_layer_types, gguf_arch="qwen3"),
    "phi3": Family("Phi3ForCausalLM", sliding_window=True, bias_flags=False, fused=_PHI3_FUSED, gguf_arch="phi3"),
}

