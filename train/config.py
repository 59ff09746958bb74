"""`TrainConfig`: every knob of `crma train`, from defaults < a YAML file < `--key=value` flags.

Each dataclass field becomes a flag (`lora_rank` -> `--lora-rank`); booleans are
`--flag` / `--no-flag`. The effective config is written into the run dir as `config.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import yaml


@dataclasses.dataclass
class TrainConfig:
    model: str = "smollm2"
    data: str = "legal"
    out: str = "runs/train"
    steps: int = 100
    seq_len: int = 256
    batch_size: int = 4
    accum_steps: int = 1
    dtype: str = "float32"
    compute_dtype: str = ""
    quant: str = ""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lora_dropout: float = 0.0
    lora_init: str = "default"
    rslora: bool = False
    crma: bool = True
    crma_rank: int = 4
    crma_iters: int = 20
    lr_lora: float = 2e-4
    lr_crma_mix: float = 1e-3
    lr_crma_gate: float = 1e-2
    warmup_steps: int = 10
    weight_decay: float = 0.0
    zclip: bool = True
    zclip_warmup: int = 25
    zclip_z: float = 2.5
    max_grad_norm: float = 0.0
    max_skipped_steps: int = 20
    mesh: str = "1,1,1"
    seed: int = 0
    resume: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    eval_every: int = 50
    eval_batches: int = 8
    holdout_fraction: float = 0.1
    max_documents: int = 0
    text_field: str = "text"
    tokenizer: str = ""
    plots: bool = True
    tensorboard: bool = True

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        shape = tuple(int(x) for x in self.mesh.split(","))
        if len(shape) != 3:
            raise ValueError(f"--mesh must be D,F,M (data, fsdp, model), got {self.mesh!r}")
        return shape

    def validate(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "accum_steps", "lora_rank", "crma_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} must be < --steps {self.steps}")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"--batch-size {self.batch_size} is not divisible by --accum-steps {self.accum_steps}")
        if self.quant not in ("", "nf4", "int8"):
            raise ValueError(f"--quant must be nf4 or int8, got {self.quant!r}")
        d, f, _ = self.mesh_shape
        if (self.batch_size // self.accum_steps) % (d * f):
            raise ValueError(f"micro-batch {self.batch_size // self.accum_steps} must divide over data*fsdp={d * f}")

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


def add_config_flags(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """One flag per dataclass field, defaulting to None so that only given flags override."""
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper())


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig, base: dict[str, Any] | None = None) -> Any:
    """defaults < `base` < YAML file (`--config`) < explicit flags."""
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(loaded) - known
        if unknown:
            raise ValueError(f"{args.config}: unknown settings {sorted(unknown)}")
        values.update(loaded)
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return cls(**values)


def parse_config(argv: Sequence[str], cls: type = TrainConfig) -> Any:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, cls)
    return config_from_args(parser.parse_args(argv), cls)
