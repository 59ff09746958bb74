"""`TrainConfig`: every knob of `crma train`, from defaults < a YAML file < `--key=value` flags.

Each dataclass field becomes a flag (`lora_rank` -> `--lora-rank`) with the help text and
default given here; booleans are `--flag` / `--no-flag`. The effective config is written into
the run dir as `config.yaml`. A subclass may drop inherited fields from its command line
(`cli_exclude`): `crma cl` has no `--data`, it has `--domain`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Sequence

import yaml

from crma_jax.attention import IMPLEMENTATIONS
from crma_jax.crma import CRMAConfig
from crma_jax.distributed import Launch
from crma_jax.model import REMAT_POLICIES


TRACKERS = ("tensorboard", "wandb")


def setting(default: Any, help: str, flag: str = "", aliases: tuple[str, ...] = ()) -> Any:
    """A config field with its command-line help; its flag is `--` + `flag` (default: the field's
    name with dashes) and also answers to `aliases` (the spellings of renamed settings)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "aliases": aliases})


# Settings renamed since runs were first saved: old name -> new name. A saved config.yaml, a
# `--config` file and `crma cl-table --settings` may still use the old names.
RENAMED = {"crma": "use_crma", "lr_crma_mix": "lr_crma_read_mix"}


def current_names(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with every renamed key under its new name, in place (a new name given too wins)."""
    return {RENAMED.get(k, k): v for k, v in settings.items() if RENAMED.get(k, k) == k or RENAMED[k] not in settings}


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; ValueError naming `--seeds` on anything else (or a repeat)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs at least one seed and no repeats, got {text!r}")
    return seeds


@dataclasses.dataclass
class TrainConfig:
    cli_exclude: ClassVar[tuple[str, ...]] = ()

    model: str = setting("smollm2", "HF directory, .gguf file, `crma convert` output, 'smollm2' (the real "
                                    "SmolLM2-135M from PyPI), or a Hub repo id such as Qwen/Qwen3-0.6B found in the "
                                    "local HF cache ($HF_HUB_CACHE or $HF_HOME/hub)")
    allow_download: bool = setting(False, "download a --model repo id missing from the HF cache with "
                                          "huggingface_hub.snapshot_download (off: never touch the network)")
    data: str = setting("legal", "training data: a built-in domain (legal, code, docs, changelog, shell), a "
                                 ".jsonl/.txt/.parquet file, a directory of .txt files, a datasets save_to_disk directory, "
                                 "or a datasets name in the local HF cache (nothing is downloaded)")
    data_config: str = setting("", "the datasets config of a datasets name (--data and --eval-data); empty = its default")
    data_split: str = setting("train", "the split of a datasets name or saved DatasetDict given as --data")
    eval_data: str = setting("", "separate evaluation data (the same kinds as --data); empty = a --holdout-fraction "
                                 "split of --data")
    eval_split: str = setting("", "the split of --eval-data when it is a datasets name or DatasetDict; empty = --data-split")
    out: str = setting("runs/train", "run directory; must be new or empty unless --resume")
    steps: int = setting(100, "optimizer steps")
    seq_len: int = setting(256, "tokens per packed row")
    batch_size: int = setting(4, "rows per optimizer step (global, over all devices)")
    accum_steps: int = setting(1, "micro-batches per step (gradient accumulation); must divide --batch-size")
    dtype: str = setting("float32", "storage dtype of the frozen base: float32 or bfloat16")
    compute_dtype: str = setting("", "activation dtype (float32 or bfloat16); empty = --dtype")
    quant: str = setting("", "quantize the frozen projection kernels: nf4 (QLoRA) or int8; empty = none")
    lora_rank: int = setting(8, "LoRA rank r")
    lora_alpha: float = setting(16.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with --rslora)")
    lora_targets: str = setting("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                "comma-separated projections that get LoRA")
    lora_dropout: float = setting(0.0, "dropout on the LoRA input during training")
    lora_init: str = setting("default", "LoRA init: default (Kaiming A, zero B) or pissa (top-r singular "
                                        "directions; the base becomes the residual)")
    rslora: bool = setting(False, "rank-stabilised scale alpha / sqrt(r)")
    use_crma: bool = setting(True, "add the CRMA adapter after every decoder layer", flag="crma")
    crma_rank: int = setting(4, "CRMA streams n (rank of the mixed residual slice)")
    crma_iters: int = setting(20, "Sinkhorn iterations")
    # The substrate's start is `CRMAConfig`'s, one default for the API and the CLI; the LRs were
    # chosen by measurement (RESULTS.md, "Does the substrate learn?").
    crma_init_mix_logit: float = setting(CRMAConfig.init_mix_logit, "CRMA's log_mix starts at this times I (large: "
                                                                    "M ≈ I, the identity map)")
    crma_init_gate: float = setting(CRMAConfig.init_gate, "CRMA's gate logit at init (α = sigmoid(gate))")
    lr_lora: float = setting(2e-4, "peak learning rate of the LoRA factors")
    lr_crma_read_mix: float = setting(1e-2, "peak learning rate of CRMA's read and log_mix", aliases=("lr-crma-mix",))
    lr_crma_gate: float = setting(5e-2, "peak learning rate of CRMA's gate")
    warmup_steps: int = setting(10, "linear warmup steps before the cosine decay; unless set, at most a tenth of "
                                    "--steps (so a short run needs no --warmup-steps)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    zclip: bool = setting(True, "ZClip adaptive gradient clipping")
    zclip_warmup: int = setting(25, "steps ZClip collects norms before it clips")
    zclip_z: float = setting(2.5, "ZClip z-score threshold")
    max_grad_norm: float = setting(0.0, "hard cap on the gradient norm after ZClip; 0 = none")
    max_skipped_steps: int = setting(20, "stop after this many consecutive non-finite gradients")
    mesh: str = setting("1,1,1", "device mesh D,F,M over the (data, fsdp, model) axes")
    compile_only: bool = setting(False, "compile the step this command would run for --target, print its per-chip "
                                        "memory plan, write nothing; exit 2 if it does not fit")
    target: str = setting("", "with --compile-only: the accelerator to compile for (e.g. a10g, h100, v5e-8; see crma "
                              "bench memory -h), by its own compiler on this machine (needs crma-jax[aot])")
    remat: str = setting("auto", "what each layer keeps for the backward pass: none, minimal, save_dot_except_mlp, "
                         "save_qkv_proj, full (its input only), or auto (the fastest of these whose step fits in "
                         "free memory, by XLA's plan); memory and speed only")
    attention: str = setting("auto", "attention implementation: auto, xla (quadratic reference), blockwise "
                             "(linear memory), cudnn (GPU); memory and speed only")
    distributed: str = setting("auto", "multi-process launch: auto (join when the three settings below or their "
                               "JAX_* variables are given, or when JAX can detect SLURM, Open MPI or a Cloud TPU VM), "
                               "on (always call jax.distributed.initialize), off (one process)")
    coordinator_address: str = setting("", "host:port of process 0's coordinator service (or JAX_COORDINATOR_ADDRESS); "
                                       "every process passes the same")
    num_processes: int = setting(0, "processes in the run (or JAX_NUM_PROCESSES); 0 = from the environment")
    process_id: int = setting(-1, "this process's index in [0, --num-processes) (or JAX_PROCESS_ID); -1 = from the "
                              "environment")
    seed: int = setting(0, "seed of adapter init, data order, holdout split and dropout")
    resume: bool = setting(False, "continue the run in --out from its latest checkpoint (same settings)")
    checkpoint_every: int = setting(50, "save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = setting(3, "checkpoints kept")
    eval_every: int = setting(50, "holdout loss every N steps (and at the end); 0 = never")
    holdout_fraction: float = setting(0.1, "fraction of documents held out for evaluation")
    max_documents: int = setting(0, "use only the first N documents; 0 = all")
    text_field: str = setting("text", "record field holding plain text")
    messages_field: str = setting("messages", "record field holding a chat conversation: a list of {role, content} "
                                              "turns, rendered with the tokenizer's chat template, loss on assistant turns")
    instruction_field: str = setting("instruction", "Alpaca records: the instruction field")
    input_field: str = setting("input", "Alpaca records: the optional input field")
    output_field: str = setting("output", "Alpaca records: the response field (the only part in the loss)")
    prompt_field: str = setting("prompt", "TRL prompt/completion records: the prompt field (not in the loss)")
    completion_field: str = setting("completion", "TRL prompt/completion records: the completion field (the only part "
                                                  "in the loss)")
    skip_bad_rows: bool = setting(False, "drop rows that cannot be used (reported with their count and first line) "
                                         "instead of stopping")
    tokenizer: str = setting("", "tokenizer directory; empty = the model's own")
    plots: bool = setting(True, "write PNG plots into the run dir")
    samples: int = setting(3, "at the end, greedy continuations of the first N holdout documents' openings, with "
                              "CRMA on and off, into summary.json (and the report); 0 = none; single-process runs")
    report_to: str = setting("tensorboard", "where step metrics go beside RUN/metrics.jsonl, comma-separated: tensorboard "
                                            "(RUN/tb), wandb (the [wandb] extra; WANDB_MODE=offline works without a "
                                            "network), or none")
    wandb_project: str = setting("crma-jax", "the W&B project of --report-to wandb")

    @property
    def trackers(self) -> tuple[str, ...]:
        """The metric trackers of --report-to (none: only metrics.jsonl)."""
        return tuple(t.strip() for t in self.report_to.split(",") if t.strip() and t.strip() != "none")

    @property
    def launch(self) -> Launch:
        """How this process joins a multi-process run (`crma_jax.distributed`)."""
        return Launch(self.distributed, self.coordinator_address, self.num_processes or None,
                      None if self.process_id < 0 else self.process_id)

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        try:
            shape = tuple(int(x) for x in self.mesh.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3:
            raise ValueError(f"--mesh must be D,F,M (data, fsdp, model), got {self.mesh!r}")
        return shape

    def validate(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "accum_steps", "lora_rank", "crma_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} must be < --steps {self.steps}")
        if self.samples < 0:
            raise ValueError(f"--samples must be >= 0, got {self.samples}")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"--batch-size {self.batch_size} is not divisible by --accum-steps {self.accum_steps}")
        if self.remat != "auto" and self.remat not in REMAT_POLICIES:
            raise ValueError(f"--remat must be auto or one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"--attention must be one of {', '.join(IMPLEMENTATIONS)}, got {self.attention!r}")
        unknown = set(self.trackers) - set(TRACKERS)
        if unknown or (self.trackers and "none" in (t.strip() for t in self.report_to.split(","))):
            raise ValueError(f"--report-to takes {', '.join(TRACKERS)} (comma-separated) or none, got {self.report_to!r}")
        if self.quant not in ("", "nf4", "int8"):
            raise ValueError(f"--quant must be nf4 or int8, got {self.quant!r}")
        self.launch.validate()
        d, f, _ = self.mesh_shape
        if (self.batch_size // self.accum_steps) % (d * f):
            raise ValueError(f"micro-batch {self.batch_size // self.accum_steps} must divide over data*fsdp={d * f}")

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that its command line offers."""
    return [f for f in dataclasses.fields(cls) if f.name not in cls.cli_exclude]


# The settings that say how records are read (besides the source): `crma eval --data` takes them too.
DATA_SETTINGS = ("data_config", "data_split", "holdout_fraction", "max_documents", "text_field", "messages_field",
                 "instruction_field", "input_field", "output_field", "prompt_field", "completion_field",
                 "skip_bad_rows")


def add_config_flags(parser: argparse.ArgumentParser, cls: type = TrainConfig,
                     only: Sequence[str] | None = None) -> None:
    """One flag per offered dataclass field (or per field in `only`, without `--config`),
    defaulting to None so that only given flags override; the help line shows the field's default."""
    if only is None:
        parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (flags override it)")
    for f in cli_fields(cls):
        if only is not None and f.name not in only:
            continue
        flags = ["--" + (f.metadata.get("flag") or f.name.replace("_", "-"))]
        flags += ["--" + a for a in f.metadata.get("aliases", ())]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if f.type in ("bool", bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(*flags, dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=help_text)


# What a YAML value of each field type may be: an int where a float is asked (1 means 1.0), never
# a bool where a number is asked (YAML's `yes`), never a string where a number is (YAML 1.1 reads
# `1e-3` as the string '1e-3').
YAML_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_types(loaded: dict[str, Any], cls: type, path: Path) -> dict[str, Any]:
    """`loaded` with each value checked against its field's type (an int given for a float
    becomes a float); ValueError naming the file, the key, the value and the type wanted, raised
    before anything (RUN) is claimed."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = {}
    for key, value in loaded.items():
        allowed = YAML_TYPES[kinds[key]]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            hint = " (YAML reads 1e-3 as a string: write 1.0e-3)" if kinds[key] == "float" and isinstance(value, str) else ""
            raise ValueError(f"{path}: {key}: {value!r} is a {type(value).__name__}, not a {kinds[key]}{hint}")
        out[key] = float(value) if kinds[key] == "float" else value
    return out


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig, flags: dict[str, Any] | None = None) -> Any:
    """defaults < YAML file (`--config`) < explicit flags (and `flags`, values from flags that do
    not map one to one onto a field, such as `crma cl --domain`)."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: unreadable config ({e})") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a mapping of settings")
        loaded = current_names(loaded)
        unknown = set(loaded) - {f.name for f in cli_fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        values.update(check_types(loaded, cls, path))
    for f in cli_fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    values.update(flags or {})
    return cls(**{**values, **short_run_warmup(cls, values)})


def short_run_warmup(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """{"warmup_steps": n} when the user set no warmup: the default, but at most a tenth of the
    steps, so that a 5-step trial run is valid as typed; {} when the warmup was set."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "warmup_steps" not in fields or "warmup_steps" in values:
        return {}
    steps = values.get("steps", fields["steps"].default)
    return {"warmup_steps": min(fields["warmup_steps"].default, steps // 10)}


def parse_config(argv: Sequence[str], cls: type = TrainConfig) -> Any:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, cls)
    return config_from_args(parser.parse_args(argv), cls)
