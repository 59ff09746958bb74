"""Adapters back to PyTorch: PEFT round trip, attach_crma, merged export, PEFT import."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest
import torch
from conftest import ARCHS
from peft import PeftModel
from transformers import AutoModelForCausalLM

import crma_jax
from crma_jax import CRMAConfig, LoraConfig
from crma_jax.adapter_files import Adapters, BaseSpec, load_adapters, save_adapters
from crma_jax.convert.peft_export import export_crma, export_merged, export_peft, import_peft
from crma_jax.convert.torch_crma import attach_crma
from crma_jax.errors import CheckpointError
from crma_jax.pretrained import hf_config_of

IDS = np.random.RandomState(0).randint(0, 128, (2, 12))


def trained_like(path, cfg=LoraConfig(rank=4, alpha=8.0), seed=0):
    """Adapters with nonzero LoRA B and a CRMA far from identity, as after training."""
    model, v = crma_jax.load_pretrained(path, lora_config=cfg, crma_config=CRMAConfig(init_mix_logit=1.0, init_gate=1.0), seed=seed)
    leaves, tree = jax.tree.flatten(v["lora"])
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    v["lora"] = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return model, v


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_and_attach_crma_reproduce_our_logits(arch, tiny_models, tmp_path, caplog):
    model, v = trained_like(tiny_models[arch])
    ours_lora = np.asarray(model.apply({"params": v["params"], "lora": v["lora"]}, IDS))
    ours_full = np.asarray(model.apply(v, IDS))
    base = np.asarray(model.apply({"params": v["params"]}, IDS))
    export_peft(v["lora"], model.lora_config, tmp_path / "peft", model=model.config)
    export_crma(v["crma"], model.crma_config, tmp_path / "crma_adapter.safetensors")

    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    with caplog.at_level(logging.WARNING):
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    assert not [r for r in caplog.records if "missing" in r.getMessage().lower()]
    t_lora = torch_logits(peft_model)
    assert np.abs(t_lora - ours_lora).max() <= 1e-4
    assert np.abs(ours_lora - base).max() > 1e-2  # the adapter really changes the model
    attach_crma(peft_model, tmp_path / "crma_adapter.safetensors")
    t_full = torch_logits(peft_model)
    assert np.abs(t_full - ours_full).max() <= 1e-4
    assert np.abs(ours_full - ours_lora).max() > 1e-2


@pytest.mark.parametrize("arch", ["llama_tied", "gemma2", "qwen2", "gemma3", "phi3"])
def test_merged_export_reloads_in_transformers(arch, tiny_models, tmp_path):
    model, v = trained_like(tiny_models[arch])
    out = export_merged(v["params"], v["lora"], model.lora_config, hf_config_of(tiny_models[arch]), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = np.asarray(model.apply({"params": v["params"], "lora": v["lora"]}, IDS))
    assert np.abs(torch_logits(merged) - ours).max() <= 1e-4


def test_import_of_a_peft_adapter_made_by_get_peft_model(tiny_models, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    hf = AutoModelForCausalLM.from_pretrained(tiny_models["mistral"], dtype=torch.float32).eval()
    torch.manual_seed(0)
    pm = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "theirs")
    ref = torch_logits(pm.eval())
    model, params = crma_jax.load_pretrained(tiny_models["mistral"])
    lora, cfg = import_peft(tmp_path / "theirs", model.config.num_layers)
    assert cfg.targets == ("down_proj", "q_proj", "v_proj") and cfg.scale == 4.0
    ours = model.clone(lora_config=cfg).apply({"params": params, "lora": lora}, IDS)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_adapter_files_round_trip_and_errors(tiny_models, tmp_path):
    model, v = trained_like(tiny_models["llama"])
    save_adapters(tmp_path, Adapters(BaseSpec(str(tiny_models["llama"])), model.lora_config, model.crma_config, {"legal": v["lora"]},
                                     v["crma"]))
    back = load_adapters(tmp_path)
    assert back.lora_config == model.lora_config and back.crma_config == model.crma_config and list(back.lora_sets) == ["legal"]
    np.testing.assert_array_equal(back.lora_sets["legal"]["layers"]["mlp"]["up_proj"]["b"], v["lora"]["layers"]["mlp"]["up_proj"]["b"])
    # Adapters saved before the settings' keys were renamed ("lora", "crma") still load.
    meta_file = tmp_path / "adapters" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["lora"], meta["crma"] = meta.pop("lora_config"), meta.pop("crma_config")
    meta_file.write_text(json.dumps(meta))
    old = load_adapters(tmp_path)
    assert old.lora_config == model.lora_config and old.crma_config == model.crma_config and old.crma_params is not None
    (tmp_path / "adapters" / "lora_legal.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="lora_legal.safetensors"):
        load_adapters(tmp_path)
    with pytest.raises(CheckpointError, match="meta.json"):
        load_adapters(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        import_peft(tmp_path / "elsewhere", 2)
