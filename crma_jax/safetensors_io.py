"""Memory-mapped reading of HF model directories (`config.json` + `*.safetensors`).

We parse the safetensors header ourselves (8-byte length, JSON, raw bytes) and hand out
`np.memmap` views: a view costs no copy until the tensor is placed on a device, where
`safetensors.safe_open(framework="numpy")` reads each tensor into memory (it does return
bfloat16 as `ml_dtypes.bfloat16` since safetensors 0.8; older versions could not).
Pickled `.bin`/`.pt` weights are refused unless the caller opts into torch's
`weights_only=True` loader, which cannot run arbitrary code. Every `.safetensors` file the
project writes goes through `save_tensors`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from crma_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def save_tensors(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.numpy.save_file`, then the mode every other file gets (0666 less the umask):
    safetensors writes owner-only files, which other users of a shared filesystem cannot read."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header of `path`, checked against the file's real size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header: {e}") from e
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}"
        )
    for key, v in header.items():
        v["start"] = 8 + n + int(v["data_offsets"][0])
        if v["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {v['dtype']}")
    return header


class SafetensorsSource:
    """An HF model directory read tensor by tensor.

    `get(name)` returns a read-only memory-mapped array in HF layout ((out, in) for linear
    weights) and in the stored dtype.
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: expected an HF model directory (config.json + *.safetensors)")
        self._config = _read_json(self.path / "config.json")
        files = sorted(self.path.glob("*.safetensors"))
        self._pickled: dict[str, Path] = {}
        if not files:
            pickles = sorted(p for p in self.path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if not pickles:
                raise CheckpointError(f"{self.path}: no *.safetensors weights found")
            if not allow_pickle:
                raise CheckpointError(
                    f"{pickles[0]}: refusing to unpickle PyTorch weights (a pickle can run arbitrary code). "
                    "Convert to safetensors, or pass allow_pickle=True to load with torch.load(weights_only=True)."
                )
            self._tensors = self._load_pickles(pickles)
            return
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map", {})
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{index}: names shard {f.name}, which is missing")
        self._tensors = {}
        self._where: dict[str, tuple[Path, dict[str, Any]]] = {}
        for f in files:
            for key, meta in read_header(f).items():
                self._where[key] = (f, meta)

    def _load_pickles(self, pickles: list[Path]) -> dict[str, np.ndarray]:
        import torch  # only on the explicit opt-in path

        out: dict[str, np.ndarray] = {}
        for p in pickles:
            try:
                state = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many types here
                raise CheckpointError(f"{p}: torch.load(weights_only=True) failed: {e}") from e
            for k, v in state.items():
                out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        return out

    def hf_config(self) -> dict[str, Any]:
        return dict(self._config)

    def keys(self) -> list[str]:
        return sorted(self._tensors) if self._tensors else sorted(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name][0] if name in self._where else self.path

    def get(self, name: str) -> np.ndarray:
        if self._tensors:
            if name not in self._tensors:
                raise CheckpointError(f"{self.path}: missing tensor {name!r}")
            return self._tensors[name]
        if name not in self._where:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        f, meta = self._where[name]
        shape = tuple(meta["shape"])
        dtype = np.dtype(_DTYPES[meta["dtype"]])
        if int(np.prod(shape)) * dtype.itemsize != meta["data_offsets"][1] - meta["data_offsets"][0]:
            raise CheckpointError(f"{f}: tensor {name!r} byte size does not match shape {shape}")
        return np.memmap(f, dtype=dtype, mode="r", offset=meta["start"], shape=shape)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
