"""Reading HF directories: sharded checkpoints, bf16, and every kind of bad input."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import make_tiny_hf
from safetensors.numpy import load_file, save_file

import crma_jax
from crma_jax.errors import CheckpointError
from crma_jax.safetensors_io import SafetensorsSource


def _weights(path):
    return next(path.glob("*.safetensors"))


def test_memmapped_tensors_equal_safetensors_own_reader(tiny_models):
    path = tiny_models["llama"]
    ref = load_file(_weights(path))
    src = SafetensorsSource(path)
    assert src.keys() == sorted(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(src.get(k), v)


def test_sharded_checkpoint_with_index_loads_identically(tmp_path, tiny_models, batch):
    sharded = make_tiny_hf("llama", tmp_path / "sharded", max_shard_size="40KB")
    sharded_files = list(sharded.glob("*.safetensors"))
    assert len(sharded_files) > 1 and (sharded / "model.safetensors.index.json").exists()
    ids, _ = batch
    m1, p1 = crma_jax.load_pretrained(tiny_models["llama"])
    m2, p2 = crma_jax.load_pretrained(sharded)
    np.testing.assert_array_equal(m1.apply({"params": p1}, ids), m2.apply({"params": p2}, ids))


def test_missing_shard_named_in_error(tmp_path):
    sharded = make_tiny_hf("llama", tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted(sharded.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        SafetensorsSource(sharded)


def test_bf16_checkpoint_is_read_without_torch(tmp_path, tiny_models):
    src = tmp_path / "bf16"
    shutil.copytree(tiny_models["llama"], src)
    f = _weights(src)
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(f).items()}
    save_file(tensors, f)
    model, params = crma_jax.load_pretrained(src, dtype="bfloat16")
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(q[0]).astype(np.float32),
        tensors["model.layers.0.self_attn.q_proj.weight"].T.astype(np.float32),
    )


def test_truncated_file_names_the_file(tmp_path, tiny_models):
    src = tmp_path / "trunc"
    shutil.copytree(tiny_models["llama"], src)
    f = _weights(src)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{f}.*truncated"):
        crma_jax.load_pretrained(src)


def test_missing_tensor_names_the_key(tmp_path, tiny_models):
    src = tmp_path / "missing"
    shutil.copytree(tiny_models["llama"], src)
    f = _weights(src)
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        crma_jax.load_pretrained(src)


def test_mismatched_shape_names_the_key(tmp_path, tiny_models):
    src = tmp_path / "shape"
    shutil.copytree(tiny_models["llama"], src)
    f = _weights(src)
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 64), np.float32)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape"):
        crma_jax.load_pretrained(src)


def test_unknown_model_type_names_config_file(tmp_path, tiny_models):
    src = tmp_path / "bert"
    shutil.copytree(tiny_models["llama"], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*unsupported model_type 'bert'"):
        crma_jax.load_pretrained(src)


def test_nonexistent_path():
    with pytest.raises(CheckpointError, match="no such file"):
        crma_jax.load_pretrained("/nonexistent/model")


def test_pickle_refused_unless_weights_only_requested(tmp_path, tiny_models, batch):
    import torch

    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", src)
    state = {k: torch.from_numpy(v.copy()) for k, v in load_file(_weights(tiny_models["llama"])).items()}
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*refusing to unpickle"):
        crma_jax.load_pretrained(src)
    ids, _ = batch
    m1, p1 = crma_jax.load_pretrained(src, allow_pickle=True)
    m2, p2 = crma_jax.load_pretrained(tiny_models["llama"])
    np.testing.assert_array_equal(m1.apply({"params": p1}, ids), m2.apply({"params": p2}, ids))


def test_saved_tensors_get_the_mode_of_every_other_file(tmp_path):
    import os

    import numpy as np

    from crma_jax.safetensors_io import save_tensors

    old = os.umask(0o022)
    try:
        save_tensors({"w": np.zeros((2, 3), np.float32)}, tmp_path / "a.safetensors", metadata={"format": "pt"})
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.safetensors").stat().st_mode & 0o777) == oct((tmp_path / "b.json").stat().st_mode & 0o777) \
        == "0o644"
