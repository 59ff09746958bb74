"""What accelerators a host has, told without starting JAX; and a CPU-only host with the `aot`
plugins installed runs the programs without the plugins' start-up tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from crma_jax.host import cpu_only, jax_plugins, nvidia_gpus, tpu_chips

OURS = ["libtpu", "xla_cuda12"]


def test_cpu_only_when_only_our_plugins_are_installed_and_no_chip_is_here(tmp_path):
    assert cpu_only(tmp_path, OURS) and cpu_only(tmp_path, ["xla_cuda12"])
    assert not cpu_only(tmp_path, [])  # nothing to quiet: JAX takes the CPU at once
    assert not cpu_only(tmp_path, ["xla_rocm"]) and not cpu_only(tmp_path, [*OURS, "xla_rocm"])  # not second-guessed
    (tmp_path / "nvidiactl").touch()  # the driver's control node alone is no GPU
    assert not nvidia_gpus(tmp_path) and cpu_only(tmp_path, OURS)
    (tmp_path / "nvidia0").touch()
    assert nvidia_gpus(tmp_path) and not cpu_only(tmp_path, OURS)
    (tmp_path / "nvidia0").unlink()
    (tmp_path / "accel0").touch()  # a TPU v2/v3 chip
    assert tpu_chips(tmp_path) and not cpu_only(tmp_path, OURS)


def test_a_program_on_a_cpu_only_host_prints_no_plugin_traceback(tmp_path):
    if not cpu_only():
        pytest.skip(f"this host has accelerator chips or other plugins ({jax_plugins()})")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64)))
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    argv = ["bench", "memory", "--arch", str(config), "--backend", "cpu", "--seq-len", "16", "--batch-size", "1"]
    out = subprocess.run([sys.executable, "-m", "crma_jax.train.cli", *argv], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| cpu |" in out.stdout
    assert "Traceback" not in out.stderr and "TPU_WORKER_HOSTNAMES" not in out.stderr, out.stderr[-2000:]
