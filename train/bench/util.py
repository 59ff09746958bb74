"""What every `crma bench` program shares: the command line it prints, the machine it names,
the environment of its child processes, and the kernel's own memory accounting."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any


def command_line() -> str:
    """The command as the user typed it (`crma bench ...`), for the top of every report."""
    argv = sys.argv[:]
    prog = Path(argv[0]).name if argv else "crma"
    if prog in ("cli.py", "__main__.py", "-m"):
        prog = "crma"
    return " ".join([prog, *map(shlex.quote, argv[1:])])


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from /proc/cpuinfo with its family and model numbers, which tell apart
    CPUs whose names do not (e.g. "Intel(R) Xeon(R) Processor (family 6 model 207)"); the machine
    architecture where there is no /proc/cpuinfo."""
    try:
        lines = cpuinfo.read_text().split("\n\n")[0].splitlines()  # the first processor's block
    except OSError:
        return platform.machine()
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']} model {fields['model']})"
    return name


def machine_note() -> str:
    """CPU model, core count and load average: the context every timing is read in."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu_model()}, {os.cpu_count()} CPUs, load average {load}"


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment for a benchmark's child process: the parent's, pinned to JAX's CPU backend
    (children measure host memory and CPU time), plus `extra`."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", **extra}


def proc_status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) / 1024
    return out


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is this phase's own."""
    Path("/proc/self/clear_refs").write_text("5")


def run_child(bench: str, *flags: str, env: dict[str, str] | None = None) -> Any:
    """Run `crma bench BENCH FLAGS...` in a fresh process (a benchmark's own child mode) and
    return the JSON its last stdout line holds; a failed child stops the benchmark, naming it."""
    cmd = [sys.executable, "-m", "crma_jax.train.cli", "bench", bench, *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env or cpu_env())
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{' '.join(cmd[3:])}: child exited with {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])
