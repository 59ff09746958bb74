"""`crma ablate`: the stability ablation, CRMA on/off x ZClip on/off on identical runs.

Same model, data, seed and hyper-parameters in every arm; only the two switches change. Writes
RUN/<arm>/ (ordinary `crma train` run dirs), RUN/ablation.json, RUN/ablation.md and
RUN/grad_norm_overlay.png.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from crma_jax.train.config import TrainConfig, setting
from crma_jax.train.finetune import open_session, train
from crma_jax.train.plots import plot_overlay
from crma_jax.train.run_dir import check_run_dir, write_config

ARMS = {  # name -> (crma, zclip)
    "crma+zclip": (True, True),
    "crma": (True, False),
    "zclip": (False, True),
    "plain": (False, False),
}
COLUMNS = ("final_loss", "holdout_loss", "peak_grad_norm", "mean_grad_norm", "clip_count")


@dataclasses.dataclass
class AblateConfig(TrainConfig):
    cli_exclude = ("crma", "zclip")  # every arm sets these two itself

    out: str = setting("runs/ablate", "output directory (one run per arm inside); new or empty unless --resume")


def run_ablation(cfg: TrainConfig, arms: dict[str, tuple[bool, bool]] = ARMS) -> dict[str, Any]:
    out = Path(cfg.out)
    check_run_dir(out, cfg, cfg.resume)
    results: dict[str, Any] = {}
    sessions: dict[bool, Any] = {}
    initial: dict[bool, Any] = {}  # every arm starts from the same adapters
    for name, (crma, zclip) in arms.items():
        arm_cfg = dataclasses.replace(cfg, out=str(out / name), crma=crma, zclip=zclip)
        if crma not in sessions:
            sessions[crma] = open_session(arm_cfg)
            initial[crma] = sessions[crma].trainable
            write_config(out, cfg)  # model and data loaded: the run directory is claimed
        session = sessions[crma]
        session.trainable = initial[crma]
        results[name] = train(arm_cfg, session, log_prefix=f"ablate {name}")
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    (out / "ablation.md").write_text(ablation_table(results, cfg))
    plot_overlay({n: out / n for n in arms}, "grad_norm", out / "grad_norm_overlay.png", "Gradient norm by arm")
    return results


def ablation_table(results: dict[str, Any], cfg: TrainConfig) -> str:
    lines = [
        f"Stability ablation: model {cfg.model}, data {cfg.data}, {cfg.steps} steps, B={cfg.batch_size}, "
        f"T={cfg.seq_len}, seed {cfg.seed}, LoRA r={cfg.lora_rank}, CRMA rank {cfg.crma_rank}.",
        "",
        "| arm | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, r in results.items():
        cells = [f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
