"""`crma demo --small` end to end on the real SmolLM2: table, plots, export, PyTorch check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crma_jax.train.cli import main

pytestmark = pytest.mark.slow


def test_demo_small_runs_end_to_end(tmp_path, smollm2_gguf_path, capsys, recwarn):
    out = tmp_path / "demo"
    assert main(["demo", "--small", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # A newcomer's first output carries no library's deprecation notices.
    assert not [str(w.message) for w in recwarn if issubclass(w.category, FutureWarning)]
    plots = json.loads((out / "demo.json").read_text())["plots"]
    assert sorted(Path(p).name for p in plots) == ["drift.png", "heatmap.png", "substrate.png", "transfer.png"]
    for cond in ("NAIVE", "FROZEN", "MODULAR"):
        assert f"| {cond} |" in printed
    report = json.loads((out / "demo.json").read_text())
    assert report["max_abs_logit_diff"] <= 1e-3  # PyTorch (PEFT + attach_crma) reproduces JAX
    for name in ("results.md", "results.json", "heatmap.png", "drift.png"):
        assert (out / "cl" / name).stat().st_size > 0
    assert (out / "export" / "peft_docs" / "adapter_model.safetensors").exists()
    assert (out / "export" / "crma_adapter.safetensors").exists()
    results = json.loads((out / "cl" / "results.json").read_text())
    assert results["results"]["frozen"]["0"]["drift"] == [0.0, 0.0]
    # A second demo into the same directory never reports the first one's numbers.
    before = (out / "cl" / "results.json").read_text()
    assert main(["demo", "--out", str(out)]) == 2
    assert f"{out}: already holds a run; pass --resume" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--resume"]) == 2
    assert "small: True -> False" in capsys.readouterr().err
    assert (out / "cl" / "results.json").read_text() == before
