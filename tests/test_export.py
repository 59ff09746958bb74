"""`crma export` and run reloading for every LoRA init: PEFT, merged HF and `crma eval` all
reproduce the model a run trained, PiSSA and QLoRA included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_hf, save_char_tokenizer, word_jsonl
from peft import PeftModel
from transformers import AutoModelForCausalLM

from crma_jax.adapter_files import load_adapters
from crma_jax.convert.export import export_run
from crma_jax.convert.torch_crma import attach_crma
from crma_jax.train.cli import main
from crma_jax.train.inference import load_for_inference

IDS = np.random.RandomState(3).randint(3, 100, (2, 16))
ZERO_LR = ("--lr-lora", "0", "--lr-crma-read-mix", "0", "--lr-crma-gate", "0")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return word_jsonl(tmp_path_factory.mktemp("export_data") / "notes.jsonl",
                      "a lease may be assigned only with the written consent of the landlord")


def _train(tiny_lm, data, out, *extra):
    argv = ["train", "--model", str(tiny_lm), "--data", str(data), "--out", str(out), "--seq-len", "32",
            "--batch-size", "4", "--warmup-steps", "1", "--lora-rank", "4", "--no-plots", "--report-to", "none",
            "--mesh", "1,1,1", *extra]
    assert main(argv) == 0
    return out


def _hf(tiny_lm):
    return AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()


def _torch(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _ours(run) -> np.ndarray:
    model, variables, _ = load_for_inference(str(run))
    return np.asarray(model.apply(variables, IDS))


def test_pissa_run_with_zero_learning_rates_exports_exactly_the_base(tiny_lm, data, tmp_path):
    run = _train(tiny_lm, data, tmp_path / "run", "--lora-init", "pissa", "--no-crma", "--steps", "2",
                 "--eval-every", "0", *ZERO_LR)
    assert load_adapters(run).lora_init is not None
    base = _torch(_hf(tiny_lm))
    np.testing.assert_allclose(_ours(run), base, atol=1e-4, rtol=0)  # ours: W_res + A0 B0 = W
    export_run(run, tmp_path / "export", merged=["default"])
    config = json.loads((tmp_path / "export" / "peft_default" / "adapter_config.json").read_text())
    assert config["r"] == 8  # PiSSA's rank 4 as the rank-8 LoRA [A | A0], [B ; -B0] on the original W
    peft = PeftModel.from_pretrained(_hf(tiny_lm), tmp_path / "export" / "peft_default").eval()
    assert np.abs(_torch(peft) - base).max() <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged_default", dtype=torch.float32).eval()
    assert np.abs(_torch(merged) - base).max() <= 1e-4


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_trained_run_round_trips_through_peft_and_merged_export(init, tiny_lm, data, tmp_path):
    run = _train(tiny_lm, data, tmp_path / "run", "--lora-init", init, "--rslora", "--steps", "6",
                 "--lr-lora", "2e-2", "--lr-crma-read-mix", "5e-2", "--eval-every", "0")
    ours = _ours(run)
    assert np.abs(ours - _torch(_hf(tiny_lm))).max() > 1e-2  # training really changed the model
    export_run(run, tmp_path / "export", merged=["default"])
    peft = PeftModel.from_pretrained(_hf(tiny_lm), tmp_path / "export" / "peft_default").eval()
    attach_crma(peft, tmp_path / "export" / "crma_adapter.safetensors")
    assert np.abs(_torch(peft) - ours).max() <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged_default", dtype=torch.float32).eval()
    attach_crma(merged, tmp_path / "export" / "crma_adapter.safetensors")
    assert np.abs(_torch(merged) - ours).max() <= 1e-4


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "phi3"])
def test_new_family_trains_and_round_trips_through_peft_and_merged_export(arch, data, tmp_path):
    """`crma train` (LoRA on all 7 projections + CRMA) -> `crma export` -> PeftModel / merged HF
    model + attach_crma reproduce our logits: Qwen3's q/k norm, Gemma-3's local/global layers,
    Phi-3's fused projections (exported as one block-diagonal LoRA per fused module)."""
    base = make_tiny_hf(arch, tmp_path / arch, seed=2)
    save_char_tokenizer(base)
    run = _train(base, data, tmp_path / "run", "--steps", "4", "--lr-lora", "2e-2", "--lr-crma-read-mix", "5e-2",
                 "--eval-every", "0")
    ours = _ours(run)
    assert np.abs(ours - _torch(_hf(base))).max() > 1e-2
    export_run(run, tmp_path / "export", merged=["default"])
    config = json.loads((tmp_path / "export" / "peft_default" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    peft = PeftModel.from_pretrained(_hf(base), tmp_path / "export" / "peft_default").eval()
    attach_crma(peft, tmp_path / "export" / "crma_adapter.safetensors")
    assert np.abs(_torch(peft) - ours).max() <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged_default", dtype=torch.float32).eval()
    attach_crma(merged, tmp_path / "export" / "crma_adapter.safetensors")
    assert np.abs(_torch(merged) - ours).max() <= 1e-4


def test_eval_of_a_pissa_qlora_run_reproduces_its_holdout_loss(tiny_lm, data, tmp_path, capsys):
    """The run's base (NF4 of W − s·A0·B0) is rebuilt from the saved factors, not from W."""
    run = _train(tiny_lm, data, tmp_path / "run", "--lora-init", "pissa", "--quant", "nf4", "--steps", "4",
                 "--eval-every", "4", "--lr-lora", "2e-2")
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert result["loss"] == pytest.approx(summary["holdout_loss"], rel=1e-6)
