"""`crma train`: fine-tune LoRA (+ CRMA) on a converted model, on one CPU, one GPU or a mesh.

RUN/ receives: config.yaml (the effective config), metrics.jsonl (one object per step),
tb/ (TensorBoard events), checkpoints/ (Orbax, the last K), plots (PNG) and summary.json.
`--resume` continues from the latest checkpoint that restores, exactly (same data order, RNG and
optimizer state); Ctrl-C, SIGTERM and SIGUSR1 save a checkpoint before exiting (`stops`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from crma_jax import CRMAConfig, LoraConfig, distributed, load_pretrained, param_labels, progress
from crma_jax.atomic import write_text
from crma_jax.adapters import TRAINABLE, init_adapters, store_as_bits
from crma_jax.cl import Memory, Method
from crma_jax.adapter_files import Adapters, BaseSpec, save_adapters
from crma_jax.convert.hub import resolve_model_path
from crma_jax.data import BatchIterator, DataSpec, PackedData, check_tokenizer, data_summary
from crma_jax.evaluate import evaluate
from crma_jax.memory_plan import REMAT_BY_SPEED, RematChoice, fastest_fitting, free_bytes
from crma_jax.optim import ZClipState, learning_rates, make_optimizer, zclip_metrics
from crma_jax.pretrained import load_tokenizer
from crma_jax.records import check_source
from crma_jax.sharding import make_mesh
from crma_jax.train.checkpointing import checkpoint_manager, restore_latest, save_state, saving
from crma_jax.train.config import TrainConfig
from crma_jax.train.metrics import MetricsWriter, require_nothing_lost
from crma_jax.train import stops
from crma_jax.train.run_dir import claim_run, settings_of, write_config
from crma_jax.train_step import BATCH_KEYS, batch_sharding, jit_train_step, make_train_step

# Called right after a checkpoint save of `step` has started (Orbax saves asynchronously; call
# `manager.wait_until_finished()` for the committed checkpoint). Tests inject faults here.
OnCheckpoint = Callable[[int, Any], None]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite gradients); names the step."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What one `fit` trains: the adapters it starts from, its packed rows and holdout, the spec
    they were built from (recorded with the adapters) and what they hold
    (`crma_jax.data.data_summary`), and ZClip statistics to start from instead of a fresh warmup
    (a `ZClipState`'s fields, arrays or lists; `crma cl` carries them from domain to domain)."""

    trainable: dict[str, Any]
    train_data: PackedData
    holdout: PackedData | None
    data_spec: DataSpec | None = None
    data_summary: dict[str, Any] | None = None
    zclip: Sequence[Any] | None = None


@dataclasses.dataclass(frozen=True)
class Trained:
    """What `fit` returns: the run's summary (also RUN/summary.json), its final adapters, and
    the clipper's final state (`crma_jax.optim.ZClipState`)."""

    summary: dict[str, Any]
    trainable: dict[str, Any]
    zclip: Any


@dataclasses.dataclass(frozen=True)
class Session:
    """Everything loaded once from a config and shared by the runs that use it (train, ablate's
    arms, cl's domains): the model, its frozen base, the tokenizer and mesh, and what
    `open_session` loaded as the first `Task` (adapters as initialised, the data of --data)."""

    cfg: TrainConfig
    model: Any
    frozen: Any
    trainable: dict[str, Any]
    tokenizer: Any
    train_data: PackedData | None
    holdout: PackedData | None
    mesh: Any
    data_spec: DataSpec | None = None
    data_summary: dict[str, Any] | None = None
    # PiSSA's initial factors (A0, B0), the LoRA every fresh PiSSA set starts from; None otherwise.
    lora_init: Any = None
    # Compiled steps keyed by the settings they depend on: a continual run trains many domains
    # with one program instead of recompiling per domain. A cache, filled by `fit`.
    compiled: dict[str, Any] = dataclasses.field(default_factory=dict)

    def task(self, **changes: Any) -> Task:
        """The task of what this session loaded, with `changes` (e.g. other starting adapters)."""
        return dataclasses.replace(Task(self.trainable, self.train_data, self.holdout, self.data_spec,
                                        self.data_summary), **changes)

    def place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A whole host batch (B = --batch-size rows) as global arrays on the batch sharding,
        each process contributing only the rows its devices hold."""
        sharding = batch_sharding(self.mesh)
        rows = distributed.local_rows(sharding, self.cfg.batch_size)
        return distributed.global_batch({k: v[rows] for k, v in batch.items()}, sharding, self.cfg.batch_size)


def lora_config_of(cfg: TrainConfig) -> LoraConfig:
    return LoraConfig(
        rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=tuple(t for t in cfg.lora_targets.split(",") if t),
        rslora=cfg.rslora, dropout=cfg.lora_dropout, init=cfg.lora_init,
    )


def crma_config_of(cfg: TrainConfig) -> CRMAConfig | None:
    if not cfg.use_crma:
        return None
    return CRMAConfig(rank=cfg.crma_rank, sinkhorn_iters=cfg.crma_iters, init_mix_logit=cfg.crma_init_mix_logit,
                      init_gate=cfg.crma_init_gate)


def base_spec(cfg: TrainConfig) -> BaseSpec:
    return BaseSpec(model=cfg.model, dtype=cfg.dtype, compute_dtype=cfg.compute_dtype, quant=cfg.quant)


def data_spec(cfg: TrainConfig, source: str | None = None, split_seed: int | None = None) -> DataSpec:
    """The run's data spec (`source` and `split_seed` default to `--data` and `--seed`)."""
    return DataSpec(source=source or cfg.data, seq_len=cfg.seq_len, holdout_fraction=cfg.holdout_fraction,
                    split_seed=cfg.seed if split_seed is None else split_seed, text_field=cfg.text_field,
                    max_documents=cfg.max_documents or None, messages_field=cfg.messages_field,
                    instruction_field=cfg.instruction_field, input_field=cfg.input_field, output_field=cfg.output_field,
                    config=cfg.data_config or None, split=cfg.data_split, eval_source=cfg.eval_data or None,
                    eval_split=cfg.eval_split or None, skip_bad_rows=cfg.skip_bad_rows, prompt_field=cfg.prompt_field,
                    completion_field=cfg.completion_field)


def open_session(cfg: TrainConfig, load_data: bool = True) -> Session:
    """Load model + adapters onto the mesh, the tokenizer, and (optionally) the train/holdout data."""
    cfg.validate()
    if load_data:  # a typo in a data path fails now, not after the model has loaded
        for source in (cfg.data, cfg.eval_data):
            if source:
                check_source(source)
    distributed.initialize(cfg.launch)
    mesh = make_mesh(cfg.mesh_shape)
    path = resolve_model_path(cfg.model, cfg.allow_download)
    model, variables = load_pretrained(
        path, dtype=cfg.dtype, compute_dtype=cfg.compute_dtype or None, mesh=mesh,
        lora_config=lora_config_of(cfg), crma_config=crma_config_of(cfg), quant=cfg.quant or None, seed=cfg.seed,
    )
    model = model.clone(attention=cfg.attention)  # remat: chosen when the step compiles (`compile_step`)
    if jax.default_backend() == "cpu":  # see `crma_jax.quant.Float16Bits`
        variables["params"] = store_as_bits(variables["params"])
    tokenizer = load_tokenizer(cfg.tokenizer or path)
    check_tokenizer(tokenizer, model.config.vocab_size)
    train_data = holdout = spec = summary = None
    if load_data:
        spec = data_spec(cfg)
        records = spec.split_records()
        train_data, holdout = spec.pack(*records, tokenizer)
        summary = data_summary(*records, train_data, holdout, cfg.batch_size, separate=bool(spec.eval_source))
    trainable = {c: variables[c] for c in TRAINABLE if c in variables}
    lora_init = variables["lora"] if cfg.lora_init == "pissa" else None
    return Session(cfg, model, variables["params"], trainable, tokenizer, train_data, holdout, mesh,
                   data_spec=spec, data_summary=summary, lora_init=lora_init)


def describe_data(summary: dict[str, Any], run: Path, steps: int) -> str:
    """The block `crma train` prints at its start: what `summary` (`data_summary`) holds, the
    epochs `steps` make, where the run writes, and the summary's warnings."""
    d, t, r = summary["documents"], summary["tokens"], summary["rows"]
    dropped = [f"{n} {what}" for n, what in ((d["duplicates_dropped"], "duplicates"),
                                             (d["unusable_skipped"], "unusable rows")) if n]
    held = f"from {summary['eval_source']}" if summary["eval_source"] else "held out of it"
    lines = [
        f"data:     {summary['source']} ({summary['style']} records)"
        + (f", dropped {' and '.join(dropped)}" if dropped else ""),
        f"  train:   {d['train']} documents, {t['train']} tokens ({t['train_in_loss']} in the loss), "
        f"{r['train']} rows of {r['seq_len']}",
        f"  holdout: {d['holdout']} documents {held}, {t['holdout']} tokens ({t['holdout_in_loss']} in the loss), "
        f"{r['holdout']} rows",
        f"  {steps} steps = {steps / max(summary['steps_per_epoch'], 1):.2f} epochs of "
        f"{summary['steps_per_epoch']} steps",
        f"writing:  {run}/ (metrics.jsonl, summary.json, adapters/, checkpoints/)",
    ]
    return "\n".join(lines + [f"warning: {w}" for w in summary["warnings"]])


def fresh_adapters(session: Session, rng: jax.Array) -> dict[str, Any]:
    """New trainable collections for `session`'s model drawn from `rng`: `lora` (PiSSA's
    initial factors in a PiSSA session) and, when the model has CRMA, `crma`. The LoRA draw
    does not depend on whether CRMA is on, so runs that differ only in CRMA start alike."""
    lora = session.lora_init
    if lora is None:
        lora = init_adapters(session.model.clone(crma_config=None), session.frozen, rng)["lora"]
    out = {"lora": lora}
    if session.model.crma_config is not None:
        out["crma"] = init_adapters(session.model.clone(lora_config=None), session.frozen, rng)["crma"]
    return out


def build_optimizer(cfg: TrainConfig, trainable: dict[str, Any]) -> Any:
    lr = {"lora_a": cfg.lr_lora, "lora_b": cfg.lr_lora, "crma_read_mix": cfg.lr_crma_read_mix, "crma_gate": cfg.lr_crma_gate}
    zclip_kwargs = {"warmup_steps": cfg.zclip_warmup, "z_thresh": cfg.zclip_z, "max_grad_norm": cfg.max_grad_norm or None}
    return make_optimizer(
        param_labels(trainable), lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, zclip_kwargs=zclip_kwargs, use_zclip=cfg.zclip,
    )


def compile_step(cfg: TrainConfig, session: Session, optimizer: Any, trainable: dict[str, Any],
                 method: Method | None = None,
                 memory: Memory | None = None) -> tuple[Any, dict[str, Any], RematChoice]:
    """Compile the training step ahead of time, under `cfg.remat` or, for "auto", under the
    fastest remat policy whose step fits in the devices' free memory (`fastest_fitting`).
    Returns (compiled step, its shardings, the choice with what each tried policy needs)."""
    # Shapes only: the step's in_shardings decide placement (`fit` moves the real trees there),
    # whatever shardings the loaded adapters happen to carry.
    trainable, frozen, memory = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
                                 for tree in (trainable, session.frozen, memory or {}))
    opt_state = jax.eval_shape(optimizer.init, trainable)
    batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), np.int32) for k in BATCH_KEYS}
    rng = jax.eval_shape(jax.random.PRNGKey, 0)
    shardings: dict[str, Any] = {}

    def compile_for(policy: str) -> Any:
        step = make_train_step(session.model.clone(remat=policy), optimizer, cfg.accum_steps, method)
        fn, shardings_ = jit_train_step(step, session.mesh, trainable, opt_state, frozen, memory)
        shardings.update(shardings_)
        return fn.lower(trainable, opt_state, frozen, batch, rng, memory).compile()

    policies = REMAT_BY_SPEED if cfg.remat == "auto" else (cfg.remat,)
    mine = [d for d in session.mesh.devices.flat if d.process_index == jax.process_index()]  # only its own
    choice = agreed_choice(compile_for, policies, free_bytes(mine), distributed.gather)
    return choice.compiled, shardings, choice


def agreed_choice(compile_for: Callable[[str], Any], policies: Sequence[str], free_here: int,
                  gather: Callable[[int], list[int]]) -> RematChoice:
    """The remat policy that every process runs (`fastest_fitting` of `policies`): each plans for
    the least free memory of any process (in MiB, through the collective `gather`), and all take
    process 0's pick, so that every process compiles the same SPMD program."""
    budget = min(gather(free_here >> 20)) << 20
    choice = fastest_fitting(compile_for, budget, policies)
    agreed = policies[gather(policies.index(choice.policy))[0]]
    if agreed != choice.policy:
        choice = fastest_fitting(compile_for, budget, (agreed,))
    return choice


def evaluate_holdout(session: Session, variables: dict[str, Any], holdout: PackedData) -> float:
    """Mean next-token loss over every token of `holdout` (`crma_jax.evaluate.evaluate`)."""
    return evaluate(session.model, variables, holdout, session.cfg.batch_size, place=session.place).loss


def save_run_adapters(run: Path, session: Session, sets: dict[str, Any], crma: Any,
                      data: dict[str, DataSpec]) -> Path:
    """RUN/adapters: the LoRA sets, the substrate, and everything needed to rebuild the base."""
    cfg = session.cfg
    return save_adapters(run, Adapters(base_spec(cfg), session.model.lora_config, session.model.crma_config, sets, crma,
                                       lora_init=session.lora_init,
                                       data={name: spec.as_dict() for name, spec in data.items()}))


# Sample generations at the end of a run (`--samples`): prompts of this many tokens, continued by
# as many greedy tokens.
SAMPLE_PROMPT_TOKENS = 24
SAMPLE_NEW_TOKENS = 32


def holdout_samples(session: Session, variables: dict[str, Any], held: PackedData, n: int) -> list[dict[str, str]]:
    """Greedy continuations of the openings of the first `n` holdout documents long enough to
    have one (documents end at EOS in the packed rows), with CRMA on and, for a CRMA model, off
    on the same weights: [{"prompt", "crma_on", "crma_off"?}], decoded text."""
    from crma_jax.generate import generate

    eos = session.tokenizer.eos_token_id
    stream = held.input_ids[held.segment_ids > 0]
    ends = np.flatnonzero(stream == eos)
    docs = np.split(stream, ends + 1)
    prompts = [d[:SAMPLE_PROMPT_TOKENS] for d in docs if len(d) > SAMPLE_PROMPT_TOKENS][:n]
    if not prompts:
        return []
    batch = jnp.asarray(np.stack(prompts), jnp.int32)
    toggles = {"crma_on": True, **({"crma_off": False} if session.model.crma_config is not None else {})}
    text = {name: generate(session.model, variables, batch, SAMPLE_NEW_TOKENS, crma_enabled=on)[:, batch.shape[1]:]
            for name, on in toggles.items()}
    decode = session.tokenizer.decode
    return [{"prompt": decode(p), **{name: decode(np.asarray(t[i])) for name, t in text.items()}}
            for i, p in enumerate(prompts)]


def versions() -> dict[str, str]:
    """The packages and devices a run used, for its summary."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("crma-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    out["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
    return out


def step_metrics(metrics: dict[str, Any], opt_state: Any, dt: float) -> dict[str, Any]:
    """Host-side metrics of one step: scalars as floats, per-layer arrays as lists."""
    out: dict[str, Any] = {}
    for k, v in {**metrics, **{f"zclip/{k}": v for k, v in zclip_metrics(opt_state).items()}}.items():
        arr = np.asarray(v)
        out[k] = arr.tolist() if arr.ndim else float(arr)
    out.update({f"lr/{k}": float(v) for k, v in learning_rates(opt_state).items()})
    out["tokens_per_s"] = out["tokens"] / dt if dt > 0 else 0.0
    return out


def train(cfg: TrainConfig, session: Session | None = None, log_prefix: str = "train",
          on_checkpoint: OnCheckpoint | None = None) -> dict[str, Any]:
    """`crma train`: run (or resume) one fine-tuning job on what `session` loaded (or, without
    one, on what `cfg` names); returns the summary (also written to summary.json)."""
    return fit(cfg, session, log_prefix=log_prefix, on_checkpoint=on_checkpoint).summary


def fit(cfg: TrainConfig, session: Session | None = None, task: Task | None = None, *, log_prefix: str = "train",
        on_checkpoint: OnCheckpoint | None = None, data_name: str = "default", method: Method | None = None,
        memory: Memory | None = None) -> Trained:
    """Run (or resume) one fine-tuning job on `task` (default: what `session` loaded; without a
    session, one is opened from `cfg` inside RUN's lock), into `cfg.out`.

    `data_name` names the LoRA set in RUN/adapters. `method` and `memory` are a continual-learning
    method and what it keeps of earlier tasks (`crma_jax.cl`; `crma cl` passes them).

    A stop signal (`crma_jax.train.stops`) ends the run at a step boundary with a checkpoint and
    raises `stops.Stopped`; RUN is locked against a second writer for the whole call.
    """
    cfg.validate()
    with stops.deferred(), claim_run(cfg.out, cfg, cfg.resume, cfg.launch):
        return _fit(cfg, session, task, log_prefix, on_checkpoint, data_name, method, memory)


def _fit(cfg: TrainConfig, session: Session | None, task: Task | None, log_prefix: str,
         on_checkpoint: OnCheckpoint | None, data_name: str, method: Method | None,
         memory: Memory | None) -> Trained:
    """`fit`'s body, run under RUN's lock with stop signals deferred, in its phases: load, say
    what runs, compile, start (or restore), loop, summarise."""
    started = time.perf_counter()
    run = Path(cfg.out)
    session = session or open_session(cfg)  # bad model/data fail here, before RUN holds anything
    task = task or session.task()
    stops.check("while loading, before anything was written")
    write_config(run, cfg)
    _announce(cfg, session, task, run, log_prefix)
    memory = memory or {}
    cfg, compiled = _compiled_step(cfg, session, task.trainable, method, memory, run, log_prefix)
    memory = jax.device_put(memory, compiled.shardings["memory"])
    state = _start(cfg, session, task, compiled, run)
    metrics_out = MetricsWriter(run, trackers=cfg.trackers, append=state.step > 0, files=distributed.is_writer(),
                                config=settings_of(cfg), wandb_project=cfg.wandb_project)
    try:
        _loop(cfg, session, task, compiled, state, memory, metrics_out, run, log_prefix, on_checkpoint)
    finally:
        metrics_out.close()
    summary = _summarize(cfg, session, task, state, compiled.choice, metrics_out, run, started)
    if distributed.is_writer():
        write_text(run / "summary.json", json.dumps(summary, indent=2))
        save_run_adapters(run, session, {data_name: state.trainable["lora"]}, state.trainable.get("crma"),
                          {data_name: task.data_spec} if task.data_spec else {})
        if cfg.plots:
            from crma_jax.train.plots import plot_run

            plot_run(run)
    distributed.sync(f"finished {run}")  # the run's files are complete when any process returns
    return Trained(summary, state.trainable, state.opt_state.zclip)


def _announce(cfg: TrainConfig, session: Session, task: Task, run: Path, log_prefix: str) -> None:
    """Say what the run trains on and, in a multi-process run, where this process stands."""
    if distributed.is_writer() and task.data_summary is not None:
        tqdm.write(describe_data(task.data_summary, run, cfg.steps), file=sys.stderr)
    if jax.process_count() > 1:
        tqdm.write(f"{log_prefix}: {distributed.describe()}, {jax.local_device_count()} of {jax.device_count()} "
                   f"devices here, mesh {dict(session.mesh.shape)}", file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A compiled step with its optimizer, shardings and the remat choice that made it."""

    optimizer: Any
    step: Any
    shardings: dict[str, Any]
    choice: RematChoice


def _compiled_step(cfg: TrainConfig, session: Session, trainable: dict[str, Any], method: Method | None,
                   memory: Memory, run: Path, log_prefix: str) -> tuple[TrainConfig, Compiled]:
    """The step for `cfg` from the session's cache, compiled on a miss. A resumed `--remat auto`
    run keeps the policy it chose (RUN/remat.json); returns `cfg` with that policy."""
    remat_file = run / "remat.json"
    if cfg.remat == "auto" and cfg.resume and remat_file.exists():
        cfg = dataclasses.replace(cfg, remat=json.loads(remat_file.read_text())["policy"])
    key = repr((dataclasses.replace(cfg, out="", data="", resume=False, seed=0), method, jax.tree.structure(trainable),
                jax.tree.map(jnp.shape, memory)))
    if key not in session.compiled:
        optimizer = build_optimizer(cfg, trainable)
        session.compiled[key] = Compiled(optimizer, *compile_step(cfg, session, optimizer, trainable, method, memory))
        choice = session.compiled[key].choice
        if cfg.remat == "auto" or not choice.fits:
            tqdm.write(f"{log_prefix}: {choice.describe()}", file=sys.stderr)
        stops.check("while compiling, before the first step")
    compiled = session.compiled[key]
    if distributed.is_writer():
        write_text(remat_file, json.dumps({"policy": compiled.choice.policy}))
    return cfg, compiled


@dataclasses.dataclass
class _State:
    """The loop's state: it changes every step, and checkpoints save it."""

    trainable: dict[str, Any]
    opt_state: Any
    rng: jax.Array
    data: BatchIterator
    mngr: Any
    step: int
    start: int
    initial_loss: float | None = None

    def checkpoint(self) -> None:
        with saving(self.mngr, self.step):
            save_state(self.mngr, self.step, self.tree(), {"step": self.step, "data": self.data.state()})

    def tree(self) -> dict[str, Any]:
        """What a checkpoint holds besides its metadata."""
        return {"trainable": self.trainable, "opt_state": self.opt_state, "rng": self.rng}

    def committed(self) -> None:
        """Wait for the asynchronous saves; a failed one raises here (`saving`)."""
        with saving(self.mngr, self.step):
            self.mngr.wait_until_finished()


def _start(cfg: TrainConfig, session: Session, task: Task, compiled: Compiled, run: Path) -> _State:
    """The loop's first state: fresh (ZClip carried from `task.zclip`), or the newest checkpoint
    that restores with --resume; and the holdout loss before any update, measured once."""
    shardings = compiled.shardings
    place = jax.jit(lambda tree: tree, out_shardings=(shardings["trainable"], shardings["opt_state"], shardings["rng"]))
    # Fresh buffers on the step's own shardings (an identity jit types them exactly like the
    # step's outputs, and drops weak types): otherwise the second step compiles again. Fresh
    # also because the step donates both trees and optax's init may share constants.
    opt_state = compiled.optimizer.init(task.trainable)
    if task.zclip is not None:
        carried = ZClipState(*(jnp.asarray(x, fresh.dtype) for x, fresh in zip(task.zclip, opt_state.zclip)))
        opt_state = opt_state._replace(zclip=carried)
    trainable, opt_state, rng = place((task.trainable, opt_state, jax.random.PRNGKey(cfg.seed)))
    rows = distributed.local_rows(shardings["batch"], cfg.batch_size)  # this process's share of each batch
    data = BatchIterator(task.train_data, cfg.batch_size, seed=cfg.seed, rows=rows)
    mngr = checkpoint_manager(run, cfg.keep_checkpoints)
    start = 0
    restored = restore_latest(mngr, {"trainable": trainable, "opt_state": opt_state, "rng": rng}) if cfg.resume else None
    if restored is not None:
        start, saved, meta = restored
        trainable, opt_state, rng = place((saved["trainable"], saved["opt_state"], saved["rng"]))
        data.restore(meta["data"])
    elif cfg.resume:
        require_nothing_lost(run)
    state = _State(trainable, opt_state, rng, data, mngr, start, start)
    initial_file = run / "initial_eval.json"
    if cfg.eval_every and initial_file.exists():
        state.initial_loss = json.loads(initial_file.read_text())["holdout_loss"]
    elif cfg.eval_every:
        # The holdout loss before any update, so a run can show that training helped.
        state.initial_loss = evaluate_holdout(session, {"params": session.frozen, **trainable}, task.holdout)
        if distributed.is_writer():
            write_text(initial_file, json.dumps({"holdout_loss": state.initial_loss}))
    return state


def _loop(cfg: TrainConfig, session: Session, task: Task, compiled: Compiled, state: _State, memory: Any,
          metrics_out: MetricsWriter, run: Path, log_prefix: str, on_checkpoint: OnCheckpoint | None) -> None:
    """Step `state` to `cfg.steps`: log, evaluate and checkpoint on schedule; stop with a saved
    checkpoint when a stop signal is agreed; end with every save committed."""
    skipped_run = 0
    bar = progress.bar(total=cfg.steps, initial=state.start, desc=log_prefix, unit="step",
                       disable=not distributed.is_writer())
    try:
        while state.step < cfg.steps:
            signum = stops.agreed()  # every process stops at the same step
            if signum:
                if state.step > state.start and state.mngr.latest_step() != state.step:
                    state.checkpoint()
                state.committed()
                saved = state.mngr.latest_step()
                raise stops.Stopped(signum, f"at step {state.step} of {run}" + (
                    f"; checkpoint {saved} is saved, and --resume continues from it" if saved is not None else
                    "; no step was saved, and --resume starts again"))
            batch = distributed.global_batch(next(state.data), compiled.shardings["batch"], cfg.batch_size)
            state.rng, sub = jax.random.split(state.rng)
            t0 = time.perf_counter()
            state.trainable, state.opt_state, metrics = compiled.step(state.trainable, state.opt_state, session.frozen,
                                                                      batch, sub, memory)
            metrics = jax.device_get(metrics)
            state.step += 1
            step = state.step
            record = {"step": step, **step_metrics(metrics, state.opt_state, time.perf_counter() - t0)}
            skipped_run = skipped_run + 1 if record.get("zclip/skipped") else 0
            if skipped_run:
                tqdm.write(f"step {step}: non-finite gradient (norm {record['grad_norm']}); update skipped")
                if skipped_run >= cfg.max_skipped_steps:
                    raise TrainingError(f"step {step}: {skipped_run} consecutive non-finite gradients; stopping")
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                record["eval_loss"] = evaluate_holdout(session, {"params": session.frozen, **state.trainable},
                                                       task.holdout)
            metrics_out.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                state.checkpoint()  # async: training goes on while Orbax writes
                if on_checkpoint is not None:
                    on_checkpoint(step, state.mngr)
    finally:
        bar.close()
    state.committed()


def _summarize(cfg: TrainConfig, session: Session, task: Task, state: _State, choice: RematChoice,
               metrics_out: MetricsWriter, run: Path, started: float) -> dict[str, Any]:
    """summary.json: the run's results, speed, data, samples and versions."""
    summary = {"steps": state.step, "final_loss": metrics_out.last("loss"), "remat": choice.policy,
               **metrics_out.summary()}
    if task.data_summary is not None:
        summary["data"] = task.data_summary
    if cfg.samples and task.holdout is not None and jax.process_count() == 1:
        try:
            summary["samples"] = holdout_samples(session, {"params": session.frozen, **state.trainable},
                                                 task.holdout, cfg.samples)
        except Exception as e:  # noqa: BLE001 - samples illustrate a finished run; they must not lose it
            summary["samples_error"] = f"{type(e).__name__}: {e}"
            tqdm.write(f"warning: no sample generations ({summary['samples_error']}); the run itself is complete",
                       file=sys.stderr)
    summary["wall_s"] = round(time.perf_counter() - started, 1)  # this invocation: load, compile, train, evaluate
    summary["versions"] = versions()
    if cfg.eval_every:
        summary["initial_holdout_loss"] = state.initial_loss
        summary["holdout_loss"] = metrics_out.last("eval_loss")
    return summary
