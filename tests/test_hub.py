"""Models by name: `--model org/name` from the local HF cache (laid out by huggingface_hub
itself, downloading from a local stand-in for the Hub), `--allow-download`, the not-found error,
and PEFT configs that name the base so transformers can resolve it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_logits, make_tiny_hf, save_char_tokenizer, word_jsonl
from fake_hub import serve_repo

import crma_jax
from crma_jax.convert.hub import base_model_name, resolve_model_path
from crma_jax.errors import CheckpointError

REPO = "TinyOrg/Tiny-Qwen3"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """(HF home whose hub/ cache holds REPO, the original model folder): downloaded with
    `resolve_model_path(..., allow_download=True)` in a fresh process pointed at a local Hub."""
    root = tmp_path_factory.mktemp("hub")
    folder = make_tiny_hf("qwen3", root / "upload", seed=4)
    save_char_tokenizer(folder)
    server, url = serve_repo(REPO, folder)
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(root / "home")}
    env.pop("HF_HUB_CACHE", None)
    code = f"from crma_jax.convert.hub import resolve_model_path; print(resolve_model_path({REPO!r}, allow_download=True))"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()  # everything after this is offline
    assert out.returncode == 0, out.stderr[-2000:]
    snapshot = Path(out.stdout.strip().splitlines()[-1])
    assert snapshot.parent.parent == root / "home" / "hub" / f"models--{REPO.replace('/', '--')}"
    return root / "home", folder


def test_repo_id_resolves_offline_from_hf_home_and_hf_hub_cache(hub_cache, monkeypatch, batch):
    home, folder = hub_cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    path = resolve_model_path(REPO)
    assert Path(path).is_relative_to(home / "hub")
    monkeypatch.setenv("HF_HOME", "/nonexistent")
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))  # HF_HUB_CACHE wins over HF_HOME
    assert resolve_model_path(REPO) == path
    ids, mask = batch
    model, params = crma_jax.load_pretrained(path)
    ours = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
    assert np.abs(ours - hf_logits(folder, ids, mask))[mask.astype(bool)].max() < 1e-4


def test_not_found_lists_where_it_looked_and_the_local_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError) as e:
        resolve_model_path("SomeOrg/Missing-1B")
    msg = str(e.value)
    for part in ("SomeOrg/Missing-1B", str(tmp_path / "empty"), "smollm2", "--allow-download", str(Path.cwd())):
        assert part in msg
    with pytest.raises(CheckpointError, match="not an org/name repo id"):
        resolve_model_path("no-such-dir")


def test_base_model_name_for_peft_configs(tmp_path, monkeypatch):
    assert base_model_name(REPO) == REPO
    assert base_model_name("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    assert base_model_name("local") == str(tmp_path / "local")


def test_train_by_name_then_export_names_the_repo(hub_cache, monkeypatch, tmp_path):
    """`crma train --model org/name` offline, then the PEFT export names the repo, which
    transformers resolves through the same cache, and PeftModel loads onto it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from crma_jax.convert.export import export_run
    from crma_jax.train.cli import main

    home, _ = hub_cache
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    data = word_jsonl(tmp_path / "d.jsonl", "the tenant shall pay the rent on the first day of each month")
    argv = ["train", "--model", REPO, "--data", str(data), "--out", str(tmp_path / "run"), "--seq-len", "32",
            "--batch-size", "4", "--steps", "2", "--warmup-steps", "1", "--lora-rank", "4", "--no-crma", "--no-plots", "--report-to", "none",
            "--mesh", "1,1,1", "--eval-every", "0", "--lr-lora", "2e-2"]
    assert main(argv) == 0
    export_run(tmp_path / "run", tmp_path / "export")
    config = json.loads((tmp_path / "export" / "peft_default" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO
    base = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=str(home / "hub"), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "export" / "peft_default")
    assert any("lora_A" in n for n, _ in peft.named_parameters())
