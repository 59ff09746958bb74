"""The README's "A first run, step by step", run as written: own chat JSONL -> crma train on the
real SmolLM2 -> crma report -> crma export -> crma generate --chat. Its first line, the demo, is
the command tests/test_demo.py runs."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARK = "<!-- first-run -->"

pytestmark = pytest.mark.slow


def first_run_block() -> list[str]:
    """The lines of the bash block that follows the README's first-run marker."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(MARK) + len(MARK):].lstrip()
    assert after.startswith("```bash\n"), "the first-run marker must precede a bash block"
    return after[len("```bash\n"):after.index("\n```")].splitlines()


def test_the_walk_from_the_demo_to_a_chat_model_runs_as_written(tmp_path, smollm2_gguf_path):
    lines = first_run_block()
    assert shlex.split(lines[0]) == ["crma", "demo", "--small", "--out", "runs/demo"]  # tests/test_demo.py
    script = "set -euo pipefail\n" + "\n".join(lines[1:]) + "\n"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("XLA_FLAGS", None)  # a user's shell: one CPU device
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]

    run = tmp_path / "runs" / "my_chat"
    rows = [json.loads(line) for line in (tmp_path / "my_chat.jsonl").read_text().splitlines()]
    assert len(rows) >= 8 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["holdout_loss"] < summary["initial_holdout_loss"]
    # Everything a run writes: per-step metrics, TensorBoard, plots, the final checkpoint, adapters.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all({"step", "loss", "grad_norm", "tokens_per_s", "crma_spectral_dev"} <= set(r) for r in records)
    # ‖M‖₂ ≤ 1 holds by construction; once training moves log_mix, 20 Sinkhorn sweeps leave M a
    # little short of doubly stochastic (measured: |‖M‖₂ − 1| up to 3e-5), never above 1.
    assert max(r["crma_spectral_dev"] for r in records) <= 1e-3
    assert max(max(r["crma_gain"]) for r in records) <= 1 + 1e-5
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert {p.name for p in run.glob("*.png")} == {"loss.png", "grad_norm.png", "spectral_norm.png"}
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [12]
    assert (run / "adapters" / "lora_default.safetensors").exists()
    assert (run / "report.html").stat().st_size > 10_000
    export = tmp_path / "runs" / "my_chat_export"
    assert (export / "peft_default" / "adapter_model.safetensors").is_file()
    assert (export / "crma_adapter.safetensors").is_file()
    reply = done.stdout.strip().splitlines()[-1]
    assert reply and "<|im_end|>" not in reply and "<|im_start|>" not in reply
