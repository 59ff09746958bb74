"""`crma train` on the real SmolLM2-135M with one local domain (the README's command)."""

from __future__ import annotations

import json

import pytest

from crma_jax.train.cli import main

pytestmark = pytest.mark.slow


def test_train_lowers_holdout_loss_and_writes_everything(tmp_path, smollm2_gguf_path):
    run = tmp_path / "run"
    argv = ["train", "--model", "smollm2", "--data", "legal", "--out", str(run), "--steps", "24",
            "--seq-len", "64", "--batch-size", "4", "--lora-rank", "8", "--crma-rank", "4",
            "--eval-every", "12", "--checkpoint-every", "12", "--lr-lora", "1e-3",
            "--warmup-steps", "2"]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["holdout_loss"] < summary["initial_holdout_loss"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    assert all({"step", "loss", "grad_norm", "tokens_per_s", "crma_spectral_dev"} <= set(r) for r in records)
    # ‖M‖₂ ≤ 1 holds by construction; once training moves log_mix, 20 Sinkhorn sweeps leave M a
    # little short of doubly stochastic (measured: |‖M‖₂ − 1| up to 3e-5 here), never above 1.
    assert max(r["crma_spectral_dev"] for r in records) <= 1e-3
    assert max(max(r["crma_gain"]) for r in records) <= 1 + 1e-5
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert {p.name for p in run.glob("*.png")} == {"loss.png", "grad_norm.png", "spectral_norm.png"}
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [12, 24]
    assert (run / "adapters" / "lora_default.safetensors").exists()
