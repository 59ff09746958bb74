"""`crma cl`: the continual-learning protocol over an ordered list of domains.

Every condition is a method object from `crma_jax.cl` (identical data order, seeds, budget and
hyper-parameters for all):

- NAIVE:   one shared LoRA trained on every domain in turn;
- FROZEN:  a fresh LoRA per domain, no shared state (forgets nothing by construction);
- MODULAR: a fresh LoRA per domain on a shared CRMA substrate that keeps training;
- REPLAY:  NAIVE with a fraction of earlier domains' training rows mixed into each later domain;
- EWC:     NAIVE with the diagonal-Fisher penalty λ/2·Σ F(θ − θ*)² of every earlier domain;
- OLORA:   a fresh LoRA per domain beside the earlier ones (frozen, in the forward pass), with
           the orthogonality penalty λ₁·Σ|A_oldᵀ·A_new|; one model, no task id;
- INFLORA: a LoRA per domain beside the earlier ones, its A fixed before training to the top
           directions of the domain's inputs outside the earlier domains' input subspace, only B
           trained; one model, no task id.

After training domain i, the holdout loss L[i][j] of every domain j is measured over every
token of its holdout (`crma_jax.evaluate`), with the task id (oracle): the method's
`eval_lora` (domain j's own LoRA for FROZEN/MODULAR, a fresh one for a domain not trained yet;
the one model for the others), on the substrate as it is now. From L and the starting model's
losses come ACC, BWT, FWT and drift (`crma_jax.cl.transfer_metrics`). At the end every domain is
also scored without the task id: FROZEN and MODULAR pick, per packed row, the LoRA with the
lowest loss on the first k target tokens (automatic routing); the others are one model anyway.
Both are scored on each row's later tokens only.

With `--lora-init pissa` the frozen base is PiSSA's residual W − s·A0·B0, and every fresh LoRA
starts from the same factors (A0, B0), so each domain starts from exactly the base model.

Layout: RUN/<condition>/seed<s>/<domain>/ is an ordinary `crma train` run dir (resumable);
RUN/<condition>/seed<s>/progress.json records finished domains and their L rows,
RUN/<condition>/seed<s>/adapters/ the LoRA sets and substrate, and memory.safetensors what the
method keeps (EWC's Fisher, O-LoRA's earlier LoRAs), after the last finished domain, so an
interrupted `crma cl --resume` restarts at the domain it stopped in.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from crma_jax import distributed
from crma_jax.cl import METHODS, EWC, InfLoRA, Memory, Method, OLoRA, diagonal_fisher, replay, transfer_metrics
from crma_jax.lora import LORA_INPUTS
from crma_jax.convert.adapter_files import load_adapters
from crma_jax.crma import mix_displacement
from crma_jax.data import DataSpec, PackedData, split_holdout
from crma_jax.domains import FACTS_PREFIX, is_builtin
from crma_jax.evaluate import crma_effect, eval_batches, route
from crma_jax.facts import Fact, answer_questions, domain_facts, questions
from crma_jax.train.cl_results import markdown_table, summarize
from crma_jax.train.config import TrainConfig, parse_seeds, setting
from crma_jax.train.finetune import OnCheckpoint, Session, data_spec, evaluate_holdout, fresh_adapters, \
    open_session, save_run_adapters, train
from crma_jax.train.run_dir import begin_run, commit, recover, write_config
from crma_jax.train_step import forward_loss

CONDITIONS = tuple(METHODS)
Domain = tuple[PackedData, PackedData, DataSpec]  # (train, holdout, spec)


@dataclasses.dataclass
class CLConfig(TrainConfig):
    # Every domain is its own source, split into train and holdout alike: one --eval-data or
    # --data-split for all of them would make every column of L the same set.
    cli_exclude = ("data", "data_config", "data_split", "eval_data", "eval_split", "compile_only", "target")

    out: str = setting("runs/cl", "output directory; must be new or empty unless --resume")
    domains: str = setting("legal,code,docs,changelog,shell", "NAME or NAME=PATH, comma-separated, in training order "
                                              "(--domain flags take precedence)")
    conditions: str = setting("naive,frozen,modular", "comma-separated methods to run: " + ", ".join(CONDITIONS))
    seeds: str = setting("0", "comma-separated seeds; every condition runs every seed")
    routing_tokens: int = setting(32, "target tokens per row used to pick the LoRA when evaluating without the task "
                                      "id; every method is scored on the rest")
    replay_fraction: float = setting(0.1, "REPLAY: share of each later domain's training rows drawn from earlier "
                                          "domains (TRACE: 0.1)")
    ewc_lambda: float = setting(400.0, "EWC: λ of the penalty λ/2·Σ F(θ − θ*)² (TRACE: 400)")
    fisher_batches: int = setting(16, "EWC and InfLoRA: training batches per domain for the diagonal Fisher and the "
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


# The methods whose hyper-parameters come from the config (the others have none).
METHOD_SETTINGS: dict[str, Callable[[CLConfig], Method]] = {
    "replay": lambda cfg: replay(cfg.replay_fraction),
    "ewc": lambda cfg: EWC(lam=cfg.ewc_lambda),
    "olora": lambda cfg: OLoRA(lam=cfg.olora_lambda),
    "inflora": lambda cfg: InfLoRA(threshold=cfg.inflora_threshold),
}


def drift(matrix: list[list[float | None]]) -> list[float]:
    """drift_j = (L[K][j] − L[j][j]) / L[j][j] for every domain j before the last."""
    last = len(matrix) - 1
    return [(matrix[last][j] - matrix[j][j]) / matrix[j][j] for j in range(last)]


def mix_replay(current: PackedData, earlier: list[PackedData], fraction: float, seed: int) -> PackedData:
    """`current`'s rows plus rows drawn (without replacement where possible) from `earlier`, so
    that they make up `fraction` of the result; the mix is shuffled by the training iterator."""
    if not earlier or fraction <= 0:
        return current
    pool = {k: np.concatenate([getattr(d, k) for d in earlier]) for k in ("input_ids", "segment_ids", "positions",
                                                                          "loss_mask")}
    n_pool, n_extra = pool["input_ids"].shape[0], round(fraction / (1 - fraction) * current.num_rows)
    rng = np.random.default_rng(seed)
    picked = rng.choice(n_pool, n_extra, replace=n_extra > n_pool)
    return PackedData(**{k: np.concatenate([getattr(current, k), v[picked]]) for k, v in pool.items()})


def task_stats(names: tuple[str, ...], session: Session, method: Method, lora: Any, memory: Memory,
               data: PackedData, batches: int) -> dict[str, Any]:
    """The statistics `names` ("fisher", "input_gram") of one domain's training data."""
    return {name: TASK_STATS[name](session, method, lora, memory, data, batches) for name in names}


def task_fisher(session: Session, method: Method, lora: Any, memory: Memory, data: PackedData, batches: int) -> Any:
    """EWC's diagonal Fisher of `lora` on up to `batches` training batches of one domain."""
    @jax.jit
    def grad(l: Any, batch: Any) -> Any:
        def mean_loss(x: Any) -> jax.Array:
            total, (count, _) = forward_loss(session.model, {"params": session.frozen, "lora": x}, batch, None)
            return total / jnp.maximum(count, 1.0)
        return jax.grad(mean_loss)(l)

    chosen = itertools.islice(eval_batches(data, session.cfg.batch_size), batches)
    return diagonal_fisher(lambda p, b: grad(p, session.place(b)), lora, chosen)


def task_input_grams(session: Session, method: Method, lora: Any, memory: Memory, data: PackedData,
                     batches: int) -> Any:
    """XᵀX of every LoRA target's inputs (L, in, in), summed over up to `batches` full training
    batches of one domain, on the model the method trains (its forward LoRA on the base)."""
    @jax.jit
    def grams(forward: Any, batch: Any) -> Any:
        _, state = session.model.apply({"params": session.frozen, "lora": forward}, batch["input_ids"],
                                       positions=batch["positions"], segment_ids=batch["segment_ids"],
                                       method="hidden", mutable=[LORA_INPUTS])
        return jax.tree.map(lambda sown: sown[0], state[LORA_INPUTS], is_leaf=lambda x: isinstance(x, tuple))

    full = (b for b in eval_batches(data, session.cfg.batch_size) if b["segment_ids"].any(axis=1).all())
    total = None
    for batch in itertools.islice(full, batches):
        g = grams(method.forward_lora(lora, memory), session.place(batch))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    if total is None:
        raise ValueError(f"no full batch of {session.cfg.batch_size} rows to measure the inputs on")
    # {module: {proj: {"gram": G}}} -> {module: {proj: G}}, the layout of a LoRA set's pairs
    return jax.tree.map(lambda node: node["gram"], total, is_leaf=lambda x: isinstance(x, dict) and "gram" in x)


TASK_STATS = {"fisher": task_fisher, "input_gram": task_input_grams}


def _save_memory(path: Path, memory: Memory) -> None:
    save_file({k: np.asarray(v) for k, v in traverse_util.flatten_dict(memory, sep="/").items()}, str(path))


def _load_memory(path: Path) -> Memory:
    return traverse_util.unflatten_dict(dict(load_file(str(path))), sep="/")


def run_sequence(cfg: CLConfig, name_of_method: str, seed: int, domains: dict[str, Domain], session: Session,
                 on_checkpoint: OnCheckpoint | None = None) -> dict[str, Any]:
    """Train one method over `domains` in order for one seed.

    Returns {"L", "base", "acc", "bwt", "fwt", "drift", "substrate", "substrate_init", "agnostic",
    "wall_s"}: the full loss matrix, the starting model's losses, the transfer metrics, where the
    substrate was after each domain and where it started (MODULAR; None for the others), the final
    task-agnostic evaluation, and the seconds spent on the finished domains (kept in progress.json
    across resumes; of a domain cut short, only the run that finished it counts) plus the final
    evaluation's.
    """

    method = cfg.method(name_of_method)
    root = Path(cfg.out) / name_of_method / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    progress_file, memory_file = root / "progress.json", root / "memory.safetensors"
    names = list(domains)
    key = jax.random.PRNGKey(seed)
    fresh = [fresh_adapters(session, jax.random.fold_in(key, i))["lora"] for i in range(len(names))]
    crma = fresh_adapters(session, key).get("crma") if method.crma else None  # the seed's substrate
    memory = method.init_memory(fresh[0], len(names))
    progress: dict[str, Any] = {"finished": [], "L": [], "substrate": [], "zclip": None}
    trained: list[Any] = []
    if distributed.is_writer():
        recover(root)  # a kill while a domain was being saved: its files all in place, or none
    distributed.sync(f"recovered {root}")
    if cfg.resume and progress_file.exists():
        progress = json.loads(progress_file.read_text())
    if progress["finished"]:
        saved = load_adapters(root)
        trained = [saved.lora_sets[n] for n in progress["finished"]]
        crma = saved.crma_params if method.crma else None
        if memory_file.exists():
            memory = _load_memory(memory_file)

    def variables(lora: Any) -> dict[str, Any]:
        return {"params": session.frozen, "lora": lora, **({"crma": crma} if method.crma else {})}

    def loss_row() -> list[float]:
        return [evaluate_holdout(session, variables(method.eval_lora(trained, memory, j, fresh[j])), domains[n][1])
                for j, n in enumerate(names)]

    def substrate(lora: Any, holdout: PackedData) -> dict[str, Any]:
        return {
            "mix_displacement": np.asarray(mix_displacement(crma, session.model.crma.sinkhorn_iters)).tolist(),
            "hidden_change": crma_effect(session.model, variables(lora), holdout, cfg.batch_size, place=session.place),
        }

    if "base" not in progress:  # the starting model: every domain's loss before any training
        progress["base"] = [evaluate_holdout(session, variables(fresh[j]), domains[n][1]) for j, n in enumerate(names)]
        if method.crma:  # where the substrate starts, on the first domain's holdout
            progress["substrate_init"] = substrate(fresh[0], domains[names[0]][1])
    for i, name in enumerate(names):
        if name in progress["finished"]:
            continue
        t0 = time.perf_counter()
        start = fresh[i] if method.fresh_lora or not trained else trained[-1]
        train_rows, holdout, spec = domains[name]
        if method.stats_before:
            stats = task_stats(method.stats_before, session, method, start, memory, train_rows, cfg.fisher_batches)
            start = method.start(start, memory, stats)
        session.trainable = {"lora": start, **({"crma": crma} if method.crma else {})}
        earlier = [domains[n][0] for n in names[:i]]
        session.train_data = mix_replay(train_rows, earlier, method.replay, seed * 1000 + i)
        session.holdout, session.data_spec = holdout, spec
        step_cfg = dataclasses.replace(cfg, out=str(root / name), data=spec.source, seed=seed, crma=method.crma)
        carried = progress.get("zclip") if cfg.zclip_across_domains else None
        train(step_cfg, session, log_prefix=f"{name_of_method} s{seed} {name}", on_checkpoint=on_checkpoint,
              data_name=name, method=method, memory=memory, zclip_from=carried)
        progress["zclip"] = [np.asarray(x).tolist() for x in session.zclip_state]  # JSON, resumable
        lora = session.trainable["lora"]
        crma = session.trainable.get("crma")
        stats = task_stats(method.stats_after, session, method, lora, memory, train_rows, cfg.fisher_batches)
        memory = method.remember(memory, lora, i, stats)
        trained.append(lora)
        progress["finished"].append(name)
        progress["L"].append(loss_row())
        if method.crma:
            progress["substrate"].append(substrate(lora, holdout))
        progress["wall_s"] = progress.get("wall_s", 0.0) + time.perf_counter() - t0
        if distributed.is_writer():
            def write(staging: Path) -> None:
                save_run_adapters(staging, session, method.saved_sets(progress["finished"], trained), crma,
                                  {n: domains[n][2] for n in progress["finished"]})
                if memory:
                    _save_memory(staging / memory_file.name, memory)
                (staging / progress_file.name).write_text(json.dumps(progress, indent=2))

            # Adapters, memory and progress describe the same finished domains, or resume would
            # redo a domain on a memory (EWC's anchors, InfLoRA's subspace) that already has it.
            commit(root, write)
        distributed.sync(f"finished {root / name}")
    result: dict[str, Any] = {"L": progress["L"], "base": progress["base"], "substrate": progress["substrate"],
                              "substrate_init": progress.get("substrate_init"),
                              **transfer_metrics(np.asarray(progress["L"]), np.asarray(progress["base"]))}
    t0 = time.perf_counter()
    result["agnostic"] = agnostic_eval(cfg, method, session, names, domains, trained, memory, fresh, crma)
    qa = qa_eval(cfg, method, session, names, domains, trained, memory, fresh, crma)
    if qa:
        result["qa"] = qa
    result["wall_s"] = progress.get("wall_s", 0.0) + time.perf_counter() - t0
    return result


def trained_facts(cfg: CLConfig, source: str) -> list[Fact]:
    """The facts of a facts-<domain> source whose documents fell in the training split."""
    facts = domain_facts(source[len(FACTS_PREFIX):])
    if cfg.max_documents:
        facts = facts[:cfg.max_documents]
    train_idx, _ = split_holdout(list(range(len(facts))), cfg.holdout_fraction, seed=0)
    return [facts[i] for i in train_idx]


def qa_eval(cfg: CLConfig, method: Method, session: Session, names: list[str], domains: dict[str, Domain],
            trained: list[Any], memory: Memory, fresh: list[Any], crma: Any) -> dict[str, Any] | None:
    """The CRMA-toggle QA benchmark on the facts domains among `names`: each trained fact asked
    in its held-out wording, greedy answer, exact match; with the task id, CRMA on and off on
    the same weights (off only for a method that trains CRMA). None without facts domains."""
    asked = {n: questions(trained_facts(cfg, domains[n][2].source)) for n in names
             if is_builtin(domains[n][2].source) and domains[n][2].source.startswith(FACTS_PREFIX)}
    if not asked:
        return None
    toggles = (True, False) if method.crma else (True,)
    per_domain: dict[str, dict[str, float]] = {}
    right = {on: 0 for on in toggles}
    for j, n in enumerate(names):
        if n not in asked:
            continue
        lora = method.eval_lora(trained, memory, j, fresh[j])
        variables = {"params": session.frozen, "lora": lora, **({"crma": crma} if method.crma else {})}
        per_domain[n] = {}
        for on in toggles:
            correct = answer_questions(session.model, variables, session.tokenizer, asked[n], crma_enabled=on,
                                       batch_size=cfg.batch_size)
            per_domain[n]["crma_on" if on else "crma_off"] = float(np.mean(correct))
            right[on] += sum(correct)
    total = sum(len(q) for q in asked.values())
    return {"questions": total, "per_domain": per_domain,
            **{("crma_on" if on else "crma_off"): right[on] / total for on in toggles}}


def agnostic_eval(cfg: CLConfig, method: Method, session: Session, names: list[str], domains: dict[str, Domain],
                  trained: list[Any], memory: Memory, fresh: list[Any], crma: Any) -> dict[str, Any]:
    """Every domain scored without its task id, on each row's tokens after the first
    `routing_tokens` targets: routed methods pick a LoRA per row by the loss on those first
    tokens, the others are one model. `oracle_loss` is the task-id model on the same tokens."""
    shared = {"crma": crma} if method.crma else None
    if method.routed:
        sets = dict(zip(names, trained))
    else:
        sets = {"model": method.eval_lora(trained, memory, None, fresh[0])}
    out: dict[str, Any] = {"prefix_tokens": cfg.routing_tokens, "routed": method.routed, "loss": [], "oracle_loss": [],
                           "scored_tokens": [], "accuracy": {}}
    for n in names:
        r = route(session.model, session.frozen, sets, domains[n][1], n if method.routed else "model", cfg.batch_size,
                  cfg.routing_tokens, shared=shared, place=session.place)
        out["loss"].append(r.routed.loss)
        out["oracle_loss"].append(r.oracle.loss)
        out["scored_tokens"].append(r.routed.tokens)
        if method.routed:
            out["accuracy"][n] = r.accuracy
    out["acc"] = float(np.mean(out["loss"]))
    return out


def run_continual(cfg: CLConfig, on_checkpoint: OnCheckpoint | None = None) -> dict[str, Any]:
    """Every condition x seed over the domains; writes results.json/.md and the plots.

    `on_checkpoint` is passed to every domain's `train` (tests inject faults there).
    """

    from crma_jax.train.plots import plot_continual

    sources = cfg.domain_sources()
    conditions = cfg.condition_list()
    seeds = parse_seeds(cfg.seeds)
    out = Path(cfg.out)
    cfg.validate()
    begin_run(out, cfg, cfg.resume, cfg.launch)
    writer = distributed.is_writer()
    results: dict[str, dict[int, dict[str, Any]]] = {}
    domains: dict[str, Domain] | None = None
    sessions: dict[bool, Session] = {}
    for cond in conditions:
        # The methods without CRMA share one session, those with it another: all seeds and
        # domains reuse the loaded base and the compiled steps.
        with_crma = cfg.method(cond).crma
        if with_crma not in sessions:
            sessions[with_crma] = open_session(dataclasses.replace(cfg, crma=with_crma), load_data=False)
        session = sessions[with_crma]
        if domains is None:
            # One split for every condition and seed: the holdout never depends on the seed.
            domains = {}
            for n, src in sources.items():
                spec = data_spec(cfg, source=src, split_seed=0)
                domains[n] = (*spec.build(session.tokenizer), spec)
            write_config(out, cfg)  # model and data loaded: the run directory is claimed
        for seed in seeds:
            results.setdefault(cond, {})[seed] = run_sequence(cfg, cond, seed, domains, session, on_checkpoint)
    names = list(sources)
    summary = summarize(results)
    payload = {"domains": names, "conditions": conditions, "seeds": seeds, "results": results, "summary": summary}
    if writer:
        (out / "results.json").write_text(json.dumps(payload, indent=2))
        (out / "results.md").write_text(markdown_table(summary, names, seeds))
        if cfg.plots:
            plot_continual(payload, out)
    distributed.sync(f"finished {out}")
    return payload
