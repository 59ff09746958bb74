"""`crma ablate`: the stability ablation, CRMA on/off x ZClip on/off on identical runs.

Same model, data, holdout and hyper-parameters in every arm; only the two switches change. For
each seed (`--seeds`), every arm starts from the same LoRA draw and sees the same data order,
so the arms differ only in CRMA and ZClip. Writes RUN/<arm>/seed<s>/ (ordinary `crma train`
run dirs), RUN/ablation.json (every run's summary and, per arm, each column's mean, std and
range over seeds), RUN/ablation.md and RUN/grad_norm_overlay.png (the first seed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from crma_jax import distributed
from crma_jax.train import stats
from crma_jax.train.config import TrainConfig, parse_seeds, setting
from crma_jax.train.finetune import Session, fit, fresh_adapters, open_session
from crma_jax.train.plots import plot_overlay
from crma_jax.train import stops
from crma_jax.train.run_dir import claim_run, write_config

ARMS = {  # name -> (crma, zclip)
    "crma+zclip": (True, True),
    "crma": (True, False),
    "zclip": (False, True),
    "plain": (False, False),
}
COLUMNS = ("final_loss", "holdout_loss", "peak_grad_norm", "mean_grad_norm", "clip_count")


@dataclasses.dataclass
class AblateConfig(TrainConfig):
    # every arm sets the switches, every seed the seed; planning is crma train's
    cli_exclude = ("use_crma", "zclip", "seed", "compile_only", "target", "samples")

    out: str = setting("runs/ablate", "output directory (one run per arm and seed inside); new or empty unless --resume")
    samples: int = setting(0, "not offered: the arms write no sample generations")
    seeds: str = setting("0", "comma-separated seeds; every arm runs every seed (the holdout split stays seed 0's)")


def run_ablation(cfg: AblateConfig, arms: dict[str, tuple[bool, bool]] = ARMS) -> dict[str, Any]:
    """Every arm x seed; returns {"runs": {arm: {seed: summary}}, "summary": {arm: {column: stats}}}."""
    seeds = parse_seeds(cfg.seeds)
    out = Path(cfg.out)
    cfg.validate()
    with stops.deferred(), claim_run(out, cfg, cfg.resume, cfg.launch):
        runs: dict[str, dict[int, Any]] = {name: {} for name in arms}
        sessions: dict[bool, Session] = {}
        for seed in seeds:
            for name, (crma, zclip) in arms.items():
                arm_cfg = dataclasses.replace(cfg, out=str(out / name / f"seed{seed}"), use_crma=crma, zclip=zclip, seed=seed)
                if crma not in sessions:
                    sessions[crma] = open_session(dataclasses.replace(arm_cfg, seed=0))
                    write_config(out, cfg)  # model and data loaded: the run directory is claimed
                session = sessions[crma]
                task = session.task(trainable=fresh_adapters(session, jax.random.PRNGKey(seed)))
                runs[name][seed] = fit(arm_cfg, session, task, log_prefix=f"ablate {name} s{seed}").summary
        payload = {"seeds": seeds, "runs": runs, "summary": summarize(runs)}
        if distributed.is_writer():
            (out / "ablation.json").write_text(json.dumps(payload, indent=2))
            (out / "ablation.md").write_text(ablation_table(payload["summary"], cfg, seeds))
            plot_overlay({n: out / n / f"seed{seeds[0]}" for n in arms}, "grad_norm", out / "grad_norm_overlay.png",
                         f"Gradient norm by arm (seed {seeds[0]})")
        distributed.sync(f"finished {out}")
        return payload


def summarize(runs: dict[str, dict[int, Any]]) -> dict[str, dict[str, dict[str, Any] | None]]:
    """Per arm and column: `crma_jax.train.stats.summary` over the seeds (n, mean, sample std,
    min, max); None for a column some run did not report (holdout_loss without --eval-every)."""
    out: dict[str, dict[str, dict[str, Any] | None]] = {}
    for name, by_seed in runs.items():
        out[name] = {}
        for col in COLUMNS:
            raw = [r.get(col) for r in by_seed.values()]
            if any(v is None for v in raw):
                out[name][col] = None
                continue
            out[name][col] = stats.summary(raw)
    return out


def ablation_table(summary: dict[str, Any], cfg: TrainConfig, seeds: list[int]) -> str:
    lines = [
        f"Stability ablation: model {cfg.model}, data {cfg.data}, {cfg.steps} steps, B={cfg.batch_size}, "
        f"T={cfg.seq_len}, LoRA r={cfg.lora_rank}, CRMA rank {cfg.crma_rank}; mean ± sample std (ddof 1) [min, "
        f"max] over the n = {len(seeds)} seeds {seeds}.",
        "",
        "| arm | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, cols in summary.items():
        cells = ["–" if s is None else stats.spread(s, signed=False) for s in cols.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
