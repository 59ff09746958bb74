"""The inference and export subcommands on a tiny trained run: eval, generate, export."""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file

from crma_jax.train.cli import main


@pytest.fixture(scope="module")
def trained(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "notes.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"note {i}: the quick brown fox jumps over the lazy dog"}) for i in range(30)))
    run = root / "run"
    assert main(["train", "--model", str(tiny_lm), "--data", str(data), "--out", str(run), "--steps", "4",
                 "--warmup-steps", "1", "--seq-len", "32", "--batch-size", "4", "--eval-every", "0",
                 "--no-plots", "--no-tensorboard", "--mesh", "1,1,1"]) == 0
    return run, data


def test_eval_base_and_run_with_and_without_crma(trained, tiny_lm, capsys):
    run, data = trained
    results = {}
    for name, argv in {"base": [str(tiny_lm)], "run": [str(run)], "run_no_crma": [str(run), "--no-crma"]}.items():
        assert main(["eval", *argv, "--data", str(data), "--seq-len", "32", "--max-rows", "4"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert all(r["tokens"] > 0 and r["perplexity"] > 1 for r in results.values())
    assert len({round(r["loss"], 6) for r in results.values()}) == 3  # LoRA and CRMA each change the loss


def test_generate_greedy_is_deterministic(trained, capsys):
    run, _ = trained
    outs = []
    for _ in range(2):
        assert main(["generate", str(run), "--prompt", "the quick", "--max-new-tokens", "6"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_export_writes_peft_and_crma_and_refuses_existing_out(trained, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / "export"
    assert main(["export", str(run), str(out), "--merged", "default"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert set(listing) == {"peft_default", "crma", "merged_default"}
    config = json.loads((out / "peft_default" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    tensors = load_file(out / "peft_default" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    assert (out / "merged_default" / "model.safetensors").exists()
    assert main(["export", str(run), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "x"), "--merged", "nope"]) == 2
    assert "no LoRA set" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_eval_errors_name_the_culprit(trained, tiny_lm, tmp_path, capsys):
    run, data = trained
    assert main(["eval", str(tiny_lm), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["eval", str(tiny_lm), "--lora", "x", "--data", str(data)]) == 2
    assert "run directory" in capsys.readouterr().err
