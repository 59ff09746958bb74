"""What accelerators this host has, read from its device nodes and installed packages without
starting JAX (whose platform choice, `JAX_PLATFORMS`, is read when jax is imported)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pkgutil
from pathlib import Path

# The plugins of our `aot`/`tpu`/`cuda` extras, by the names `jax_plugins()` gives them.
KNOWN_PLUGINS = frozenset({"libtpu", "xla_cuda12"})


def tpu_chips(dev: Path = Path("/dev")) -> bool:
    """TPU chips as device nodes: accel* on v2/v3, vfio on v4 and later."""
    return any(dev.glob("accel[0-9]*")) or any((dev / "vfio").glob("[0-9]*"))


def nvidia_gpus(dev: Path = Path("/dev")) -> bool:
    """NVIDIA GPUs as device nodes (/dev/nvidia0, ...), as the driver makes them, in containers too."""
    return any(dev.glob("nvidia[0-9]*"))


def jax_plugins() -> list[str]:
    """The accelerator plugins JAX would try to start: the `jax_plugins` namespace's modules, the
    'jax_plugins' entry points, and libtpu."""
    names = {entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names |= {module.name for module in pkgutil.iter_modules(spec.submodule_search_locations)}
    if importlib.util.find_spec("libtpu") is not None:
        names.add("libtpu")
    return sorted(names)


def cpu_only(dev: Path = Path("/dev"), plugins: list[str] | None = None) -> bool:
    """True when JAX can only run on the CPU here, yet would first try accelerator plugins: some
    are installed (an `aot` install, to plan for accelerators), all of them ours, and the host has
    no TPU chip or NVIDIA GPU. JAX would try each, log its failure with a traceback, and take the
    CPU; with `JAX_PLATFORMS=cpu` it takes the CPU at once. Another plugin (ROCm, Metal) is never
    second-guessed."""
    plugins = jax_plugins() if plugins is None else plugins
    return bool(plugins) and set(plugins) <= KNOWN_PLUGINS and not tpu_chips(dev) and not nvidia_gpus(dev)
