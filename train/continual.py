"""`crma cl`: the continual-learning protocol over an ordered list of domains.

Every condition is a method object from `crma_jax.cl` (identical data order, seeds, budget and
hyper-parameters for all):

- NAIVE:   one shared LoRA trained on every domain in turn;
- FROZEN:  a fresh LoRA per domain, no shared state (forgets nothing by construction);
- MODULAR: a fresh LoRA per domain on a shared CRMA substrate that keeps training;
- FROZEN_SUBSTRATE: the paper's matched baseline: the substrate trains with the first domain's
           LoRA, then stays frozen under a fresh LoRA per later domain;
- ISOLATED: a fresh substrate and a fresh LoRA per domain, routed (nothing shared);
- REPLAY:  NAIVE with a fraction of earlier domains' training rows mixed into each later domain;
- EWC:     NAIVE with the diagonal-Fisher penalty λ/2·Σ F(θ − θ*)² of every earlier domain;
- OLORA:   a fresh LoRA per domain beside the earlier ones (frozen, in the forward pass), with
           the orthogonality penalty λ₁·Σ|A_oldᵀ·A_new|; one model, no task id;
- INFLORA: a LoRA per domain beside the earlier ones, its A fixed before training to the top
           directions of the domain's inputs outside the earlier domains' input subspace, only B
           trained; one model, no task id.

After training domain i, the holdout loss L[i][j] of every domain j is measured over every
token of its holdout (`crma_jax.evaluate`), with the task id (oracle): the method's
`eval_lora` (domain j's own LoRA for the routed methods, a fresh one for a domain not trained yet;
the one model for the others), on its substrate (`eval_crma`: the one as it is now; ISOLATED: the
domain's own). From L and the starting model's
losses come ACC, BWT, FWT and drift (`crma_jax.cl.transfer_metrics`). At the end every domain is
also scored without the task id: the routed methods pick, per packed row, the LoRA with the
lowest loss on the first k target tokens (automatic routing); the others are one model anyway.
Both are scored on each row's later tokens only.

With `--lora-init pissa` the frozen base is PiSSA's residual W − s·A0·B0, and every fresh LoRA
starts from the same factors (A0, B0), so each domain starts from exactly the base model.

Layout: RUN/<condition>/seed<s>/<domain>/ is an ordinary `crma train` run dir (resumable);
RUN/<condition>/seed<s>/progress.json records finished domains and their L rows,
RUN/<condition>/seed<s>/adapters/ the LoRA sets and substrate, and memory.safetensors what the
method keeps (EWC's Fisher, O-LoRA's earlier LoRAs), substrates.safetensors each finished
domain's substrate (ISOLATED evaluates each domain with its own), after the last finished domain, so an
interrupted `crma cl --resume` restarts at the domain it stopped in.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from crma_jax import distributed
from crma_jax.atomic import write_text
from crma_jax.cl import METHODS, EWC, FrozenSubstrate, InfLoRA, Memory, Method, OLoRA, replay, transfer_metrics
from crma_jax.adapter_files import load_adapters
from crma_jax.crma import mix_displacement
from crma_jax.data import PackedData
from crma_jax.evaluate import crma_effect
from crma_jax.safetensors_io import save_tensors
from crma_jax.train import stops
from crma_jax.train.bench.util import cpu_model
from crma_jax.train.cl_data import Domain, build_domains, check_fingerprints, mix_replay  # noqa: F401 - re-exported
from crma_jax.train.cl_eval import agnostic_eval, qa_eval
from crma_jax.train.cl_results import markdown_table, summarize
from crma_jax.train.cl_stats import task_stats
from crma_jax.train.config import TrainConfig, parse_seeds, setting
from crma_jax.train.finetune import OnCheckpoint, Session, Task, evaluate_holdout, fit, fresh_adapters, \
    open_session, save_run_adapters
from crma_jax.train.run_dir import claim_run, commit, recover, write_config

CONDITIONS = tuple(METHODS)


@dataclasses.dataclass
class CLConfig(TrainConfig):
    # Every domain is its own source, split into train and holdout alike: one --eval-data or
    # --data-split for all of them would make every column of L the same set.
    cli_exclude = ("data", "data_config", "data_split", "eval_data", "eval_split", "compile_only", "target", "samples")

    out: str = setting("runs/cl", "output directory; must be new or empty unless --resume")
    samples: int = setting(0, "not offered: a sequence's domains write no sample generations")
    domains: str = setting("legal,code,docs,changelog,shell", "NAME or NAME=PATH, comma-separated, in training order "
                                              "(--domain flags take precedence)")
    conditions: str = setting("naive,frozen,modular", "comma-separated methods to run: " + ", ".join(CONDITIONS))
    seeds: str = setting("0", "comma-separated seeds; every condition runs every seed")
    routing_tokens: int = setting(32, "target tokens per row used to pick the LoRA when evaluating without the task "
                                      "id; every method is scored on the rest")
    replay_fraction: float = setting(0.1, "REPLAY: share of each later domain's training rows drawn from earlier "
                                          "domains (TRACE: 0.1)")
    ewc_lambda: float = setting(400.0, "EWC: λ of the penalty λ/2·Σ F(θ − θ*)² (TRACE: 400)")
    fisher_batches: int = setting(16, "EWC and InfLoRA: training batches per domain, drawn shuffled from the whole "
                                      "domain, for the diagonal Fisher (per-sequence squared gradients) and the "
                                      "inputs' Gram matrices")
    olora_lambda: float = setting(0.5, "O-LoRA: λ₁ of the orthogonality penalty λ₁·Σ|A_oldᵀ·A_new| (official: 0.5)")
    inflora_threshold: float = setting(0.97, "InfLoRA: share of each domain's input energy the subspace of earlier "
                                             "domains must hold after it (GPM's threshold)")
    zclip_across_domains: bool = setting(True, "one ZClip for the whole sequence: its statistics carry from each domain "
                                               "to the next, so its warmup happens once, not per domain")

    def domain_sources(self) -> dict[str, str]:
        out = {}
        for item in self.domains.split(","):
            name, _, path = item.partition("=")
            out[name.strip()] = (path or name).strip()
        if len(out) < 2:
            raise ValueError(f"continual learning needs >= 2 domains, got {list(out)}")
        return out

    def condition_list(self) -> list[str]:
        conds = [c.strip().lower() for c in self.conditions.split(",") if c.strip()]
        bad = set(conds) - set(CONDITIONS)
        if bad:
            raise ValueError(f"unknown conditions {sorted(bad)}; choose from {', '.join(CONDITIONS)}")
        if not 0.0 < self.replay_fraction < 1.0:
            raise ValueError(f"--replay-fraction must be in (0, 1), got {self.replay_fraction}")
        if not 0.0 < self.inflora_threshold < 1.0:
            raise ValueError(f"--inflora-threshold must be in (0, 1), got {self.inflora_threshold}")
        for cond in conds:
            if isinstance(self.method(cond), FrozenSubstrate) and self.weight_decay:
                raise ValueError(f"{cond} keeps the substrate fixed after the first domain, and --weight-decay "
                                 f"{self.weight_decay} would still shrink it; run {cond} with --weight-decay 0")
            if isinstance(self.method(cond), OLoRA):  # O-LoRA and InfLoRA: one model, every domain's LoRA summed
                if self.lora_init == "pissa":
                    raise ValueError(f"{cond} sums the domains' LoRAs, and with --lora-init pissa each one holds the "
                                     f"base's top singular directions again; run {cond} with --lora-init default")
                if isinstance(self.method(cond), InfLoRA) and self.weight_decay:
                    raise ValueError(f"{cond} keeps each domain's A fixed, and --weight-decay {self.weight_decay} would "
                                     f"still shrink it; run {cond} with --weight-decay 0")
                if cond in self.domain_sources():
                    raise ValueError(f"a domain named {cond!r} would clash with the LoRA set that holds {cond}'s "
                                     f"model; rename it")
        return conds

    def method(self, name: str) -> Method:
        """The method object of condition `name`, with this config's hyper-parameters."""
        return METHOD_SETTINGS.get(name, lambda cfg: METHODS[name]())(self)


# The config keys that only some methods read. `crma cl-table` pools runs that differ only in keys
# their method does not read (NAIVE's runs are one row whatever --ewc-lambda was).
METHOD_READS: dict[str, frozenset[str]] = {
    "replay": frozenset({"replay_fraction"}),
    "ewc": frozenset({"ewc_lambda", "fisher_batches"}),
    "olora": frozenset({"olora_lambda"}),
    "inflora": frozenset({"inflora_threshold", "fisher_batches"}),
}
METHOD_ONLY = frozenset().union(*METHOD_READS.values())


def unread_settings(condition: str) -> frozenset[str]:
    """The method-only config keys that `condition` does not read."""
    return METHOD_ONLY - METHOD_READS.get(condition, frozenset())


# The methods whose hyper-parameters come from the config (the others have none).
METHOD_SETTINGS: dict[str, Callable[[CLConfig], Method]] = {
    "replay": lambda cfg: replay(cfg.replay_fraction),
    "ewc": lambda cfg: EWC(lam=cfg.ewc_lambda),
    "olora": lambda cfg: OLoRA(lam=cfg.olora_lambda),
    "inflora": lambda cfg: InfLoRA(threshold=cfg.inflora_threshold),
}


def _save_memory(path: Path, memory: Memory) -> None:
    save_tensors({k: np.asarray(v) for k, v in traverse_util.flatten_dict(memory, sep="/").items()}, str(path))


def _load_memory(path: Path) -> Memory:
    return traverse_util.unflatten_dict(dict(load_file(str(path))), sep="/")


@dataclasses.dataclass
class SequenceProgress:
    """Where one method's sequence for one seed stands, in RUN/<condition>/seed<s>: the finished
    domains' LoRA sets, the substrate (and each finished domain's, for a method that keeps them),
    the method's memory, and progress.json (finished names, loss rows, base losses, substrate
    displacements, ZClip's statistics, seconds spent). `load` recovers and resumes it; `commit`
    writes it all as one (`crma_jax.atomic.commit`), so adapters, memory and progress always
    describe the same finished domains."""

    root: Path
    progress: dict[str, Any]
    trained: list[Any]
    crma: Any
    memory: Memory
    substrates: list[Any]

    PROGRESS, MEMORY, SUBSTRATES = "progress.json", "memory.safetensors", "substrates.safetensors"

    @classmethod
    def load(cls, root: Path, method: Method, memory: Memory, crma: Any, resume: bool) -> SequenceProgress:
        """A fresh sequence starting from `memory` and substrate `crma`, or (`resume`) the one saved
        in `root`, after finishing or dropping a commit that a kill cut short."""
        root.mkdir(parents=True, exist_ok=True)
        if distributed.is_writer():
            recover(root)  # a kill while a domain was being saved: its files all in place, or none
        distributed.sync(f"recovered {root}")
        state = cls(root, {"finished": [], "L": [], "substrate": [], "zclip": None}, [], crma, memory, [])
        if resume and (root / cls.PROGRESS).exists():
            state.progress = json.loads((root / cls.PROGRESS).read_text())
        if state.progress["finished"]:
            saved = load_adapters(root)
            state.trained = [saved.lora_sets[n] for n in state.progress["finished"]]
            state.crma = saved.crma_params if method.uses_crma else None
            if (root / cls.MEMORY).exists():
                state.memory = _load_memory(root / cls.MEMORY)
            if (root / cls.SUBSTRATES).exists():
                stored = _load_memory(root / cls.SUBSTRATES)
                state.substrates = [stored[str(t)] for t in range(len(stored))]
        return state

    @property
    def finished(self) -> list[str]:
        return self.progress["finished"]

    def commit(self, session: Session, method: Method, domains: dict[str, Domain]) -> None:
        """Write the finished domains' adapters, memory, substrates and progress as one."""
        if not distributed.is_writer():
            return

        def write(staging: Path) -> None:
            save_run_adapters(staging, session, method.saved_sets(self.finished, self.trained), self.crma,
                              {n: domains[n][2] for n in self.finished})
            if self.memory:
                _save_memory(staging / self.MEMORY, self.memory)
            if self.substrates:
                _save_memory(staging / self.SUBSTRATES, {str(t): c for t, c in enumerate(self.substrates)})
            (staging / self.PROGRESS).write_text(json.dumps(self.progress, indent=2))

        # Adapters, memory and progress describe the same finished domains, or resume would
        # redo a domain on a memory (EWC's anchors, InfLoRA's subspace) that already has it.
        commit(self.root, write)


def run_sequence(cfg: CLConfig, name_of_method: str, seed: int, domains: dict[str, Domain], session: Session,
                 on_checkpoint: OnCheckpoint | None = None) -> dict[str, Any]:
    """Train one method over `domains` in order for one seed.

    Returns {"L", "base", "acc", "bwt", "fwt", "drift", "substrate", "substrate_init", "agnostic",
    "wall_s", "cpus"}: the full loss matrix, the starting model's losses, the transfer metrics, where the
    substrate was after each domain and where it started (MODULAR; None for the others), the final
    task-agnostic evaluation, the seconds spent on the finished domains (kept in progress.json
    across resumes; of a domain cut short, only the run that finished it counts) plus the final
    evaluation's, and "cpus", the CPU models those seconds were spent on (`cpu_model`).
    """
    method = cfg.method(name_of_method)
    root = Path(cfg.out) / name_of_method / f"seed{seed}"
    names = list(domains)
    key = jax.random.PRNGKey(seed)
    fresh = [fresh_adapters(session, jax.random.fold_in(key, i))["lora"] for i in range(len(names))]
    initial = fresh_adapters(session, key).get("crma") if method.uses_crma else None  # the seed's substrate
    state = SequenceProgress.load(root, method, method.init_memory(fresh[0], len(names)), initial, cfg.resume)
    progress = state.progress

    def substrate_of(j: int) -> Any:
        """The substrate that domain j is evaluated with now (None without CRMA)."""
        return method.eval_crma(state.substrates, state.crma, j, initial) if method.uses_crma else None

    def variables(lora: Any, substrate: Any = None) -> dict[str, Any]:
        chosen = state.crma if substrate is None else substrate
        return {"params": session.frozen, "lora": lora, **({"crma": chosen} if method.uses_crma else {})}

    def loss_row() -> list[float]:
        return [evaluate_holdout(session, variables(method.eval_lora(state.trained, state.memory, j, fresh[j]),
                                                    substrate_of(j)), domains[n][1]) for j, n in enumerate(names)]

    def substrate(lora: Any, holdout: PackedData) -> dict[str, Any]:
        return {
            "mix_displacement": np.asarray(mix_displacement(state.crma, session.model.crma_config.sinkhorn_iters)).tolist(),
            "hidden_change": crma_effect(session.model, variables(lora), holdout, cfg.batch_size, place=session.place),
        }

    if "base" not in progress:  # the starting model: every domain's loss before any training
        progress["base"] = [evaluate_holdout(session, variables(fresh[j], initial), domains[n][1])
                            for j, n in enumerate(names)]
        if method.uses_crma:  # where the substrate starts, on the first domain's holdout
            progress["substrate_init"] = substrate(fresh[0], domains[names[0]][1])
    for i, name in enumerate(names):
        if name in state.finished:
            continue
        t0 = time.perf_counter()
        train_rows, holdout, spec = domains[name]
        # 1. Where this domain starts: a fresh or the last LoRA, moved by the method's statistics.
        start = fresh[i] if method.fresh_lora or not state.trained else state.trained[-1]
        if method.stats_before:
            stats = task_stats(method.stats_before, session, method, start, state.memory, train_rows,
                               cfg.fisher_batches, seed * 1000 + i)
            start = method.start(start, state.memory, stats)
        if method.uses_crma:
            state.crma = method.start_crma(state.crma, initial)
        # 2. Train it: an ordinary resumable run in RUN/<condition>/seed<s>/<domain>.
        earlier = [domains[n][0] for n in names[:i]]
        task = Task({"lora": start, **({"crma": state.crma} if method.uses_crma else {})},
                    mix_replay(train_rows, earlier, method.replay, seed * 1000 + i), holdout, spec,
                    zclip=progress.get("zclip") if cfg.zclip_across_domains else None)
        step_cfg = dataclasses.replace(cfg, out=str(root / name), data=spec.source, seed=seed, use_crma=method.uses_crma)
        if cfg.resume and distributed.is_writer():
            restart_uncheckpointed(root / name)
        distributed.sync(f"looked at {root / name}")
        done = fit(step_cfg, session, task, log_prefix=f"{name_of_method} s{seed} {name}",
                   on_checkpoint=on_checkpoint, data_name=name, method=method, memory=state.memory)
        # 3. Remember it: the method's memory, the substrate, and every domain's loss now.
        progress["zclip"] = [np.asarray(x).tolist() for x in done.zclip]  # JSON, resumable
        lora, state.crma = done.trainable["lora"], done.trainable.get("crma")
        if method.uses_crma:
            state.substrates.append(state.crma)
        stats = task_stats(method.stats_after, session, method, lora, state.memory, train_rows, cfg.fisher_batches,
                           seed * 1000 + i)
        state.memory = method.remember(state.memory, lora, i, stats)
        state.trained.append(lora)
        state.finished.append(name)
        progress["L"].append(loss_row())
        if method.uses_crma:
            progress["substrate"].append(substrate(lora, holdout))
        progress["wall_s"] = progress.get("wall_s", 0.0) + time.perf_counter() - t0
        progress["cpus"] = sorted({*progress.get("cpus", []), cpu_model()})  # a resume may run on another machine
        # 4. Commit it.
        state.commit(session, method, domains)
        distributed.sync(f"finished {root / name}")
    result: dict[str, Any] = {"L": progress["L"], "base": progress["base"], "substrate": progress["substrate"],
                              "substrate_init": progress.get("substrate_init"),
                              **transfer_metrics(np.asarray(progress["L"]), np.asarray(progress["base"]))}
    t0 = time.perf_counter()
    evaluated = (cfg, method, session, names, domains, state.trained, state.memory, fresh, substrate_of)
    result["agnostic"] = agnostic_eval(*evaluated)
    qa = qa_eval(*evaluated)
    if qa:
        result["qa"] = qa
    result["wall_s"] = progress.get("wall_s", 0.0) + time.perf_counter() - t0
    result["cpus"] = sorted({*progress.get("cpus", []), cpu_model()})
    return result


def restart_uncheckpointed(run: Path) -> None:
    """Remove the run directory of a domain that was cut short before its first checkpoint, saying
    so: `crma cl --resume` trains that domain again from its start (its steps are not counted
    anywhere: only a domain's finished run enters the results)."""
    if run.is_dir() and not any((run / "checkpoints").glob("[0-9]*")):
        print(f"{run}: cut short before its first checkpoint; training this domain again", file=sys.stderr)
        shutil.rmtree(run)


def run_continual(cfg: CLConfig, on_checkpoint: OnCheckpoint | None = None) -> dict[str, Any]:
    """Every condition x seed over the domains; writes results.json/.md and the plots.

    `on_checkpoint` is passed to every domain's `fit` (tests inject faults there).
    """

    from crma_jax.train.plots import plot_continual

    sources = cfg.domain_sources()
    conditions = cfg.condition_list()
    seeds = parse_seeds(cfg.seeds)
    out = Path(cfg.out)
    cfg.validate()
    with stops.deferred(), claim_run(out, cfg, cfg.resume, cfg.launch):
        writer = distributed.is_writer()
        results: dict[str, dict[int, dict[str, Any]]] = {}
        domains: dict[str, Domain] | None = None
        fingerprints: dict[str, Any] = {}
        sessions: dict[bool, Session] = {}
        for cond in conditions:
            # The methods without CRMA share one session, those with it another: all seeds and
            # domains reuse the loaded base and the compiled steps.
            with_crma = cfg.method(cond).uses_crma
            if with_crma not in sessions:
                sessions[with_crma] = open_session(dataclasses.replace(cfg, use_crma=with_crma), load_data=False)
            session = sessions[with_crma]
            if domains is None:
                domains, fingerprints = build_domains(cfg, sources, session.tokenizer)
                check_fingerprints(out, fingerprints)
                write_config(out, cfg)  # model and data loaded: the run directory is claimed
                if writer:
                    write_text(out / "fingerprints.json", json.dumps(fingerprints, indent=2))
            for seed in seeds:
                results.setdefault(cond, {})[seed] = run_sequence(cfg, cond, seed, domains, session, on_checkpoint)
        names = list(sources)
        summary = summarize(results)
        payload = {"domains": names, "conditions": conditions, "seeds": seeds, "fingerprints": fingerprints,
                   "results": results, "summary": summary}
        if writer:
            write_text(out / "results.md", markdown_table(summary, names, seeds))
            write_text(out / "results.json", json.dumps(payload, indent=2))  # last: a finished run has it
            if cfg.plots:
                plot_continual(payload, out)
        distributed.sync(f"finished {out}")
    return payload
