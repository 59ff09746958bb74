"""`crma train ... --compile-only --target NAME`: compile exactly the step that command would run,
for an accelerator this machine does not have, with that accelerator's own compiler, and print
its per-chip plan. Nothing is loaded (the model's config alone is read), nothing is written.

The analogue of MaxText's train_compile: the same model config, LoRA and CRMA settings, base
storage (--dtype, --quant), compute dtype, attention, remat (auto: the policy `crma train` would
pick on that chip), gradient accumulation, optimizer and shapes as `crma train` builds them. The
mesh is --mesh, except that the default 1,1,1 on a target of several chips becomes FSDP over all
of them.
"""

from __future__ import annotations

import math

from crma_jax.memory_plan import TargetPlan, plan_for_target
from crma_jax.pretrained import config_from_hf, hf_config_of, resolve_dtype
from crma_jax.targets import resolve_target
from crma_jax.train.config import TrainConfig

GIB = 2**30


class DoesNotFit(ValueError):
    """The planned step does not fit the target's memory (the settings are the input at fault)."""


def compile_only(cfg: TrainConfig) -> TargetPlan:
    """Plan `cfg`'s training step on `cfg.target` and print the report; raise `DoesNotFit` when
    the step does not fit a chip."""
    from crma_jax import targets
    from crma_jax.convert.hub import resolve_model_path
    from crma_jax.train.finetune import build_optimizer, crma_config_of, lora_config_of

    if not cfg.target:
        raise ValueError("--compile-only needs --target NAME (see crma bench memory -h for the names)")
    cfg.validate()
    target = resolve_target(cfg.target)
    targets.prepare_host()
    path = resolve_model_path(cfg.model, cfg.allow_download)
    config = config_from_hf(hf_config_of(path), path)
    mesh = cfg.mesh_shape if math.prod(cfg.mesh_shape) > 1 or target.chips == 1 else (1, target.chips, 1)
    plan = plan_for_target(
        config, target, remat=cfg.remat, mesh_shape=mesh, batch_size=cfg.batch_size,
        seq_len=cfg.seq_len, quant=cfg.quant or None, dtype=resolve_dtype(cfg.dtype),
        compute_dtype=resolve_dtype(cfg.compute_dtype or cfg.dtype), lora_config=lora_config_of(cfg), crma_config=crma_config_of(cfg),
        accum_steps=cfg.accum_steps, optimizer=lambda trainable: build_optimizer(cfg, trainable),
        attention=cfg.attention, roofline=True)
    print(report(cfg, plan))
    if not plan.fits:
        raise DoesNotFit(f"--target {target.name}: the step does not fit one chip "
                         f"({plan.error or _needs(plan)}); try --remat full, a smaller --batch-size or --seq-len, "
                         "--quant nf4, or a larger --mesh")
    return plan


def _needs(plan: TargetPlan) -> str:
    assert plan.plan is not None
    return f"{plan.plan.total / GIB:.2f} GiB planned of {plan.usable / GIB:.2f} GiB usable"


def report(cfg: TrainConfig, plan: TargetPlan) -> str:
    """The per-chip plan as a few lines a person reads."""
    target = plan.target
    lines = [f"compile-only: {cfg.model} step (B={cfg.batch_size}, T={cfg.seq_len}, base {cfg.quant or cfg.dtype}) for "
             f"{target.name} ({target.chips} x {target.chip.name}), mesh {','.join(map(str, plan.mesh_shape))}, "
             f"compiled by the {target.platform.upper()} compiler in {plan.compile_seconds:.0f} s (a compiler plan, "
             "not a measurement)"]
    lines.append(f"  remat {plan.policy} (tried, beyond the arguments: {plan.tried()})")
    if plan.plan is None:
        lines.append(f"  the compiler refused it: {plan.error}")
    else:
        g = plan.plan.gib()
        lines.append(f"  per chip: arguments {g['argument']:.2f} GiB (base {g['weights']:.2f}), temporaries "
                     f"{g['temp']:.2f}, outputs {g['output']:.2f}, total {g['total']:.2f} of {plan.usable / GIB:.2f} "
                     f"GiB usable: {'fits' if plan.fits else 'does not fit'}")
    if plan.roofline is not None:
        bound, costs = plan.roofline, plan.costs
        moved = "" if costs.bytes_accessed is None else f" and {costs.bytes_accessed / 1e9:.2f} GB"
        lines.append(f"  roofline: {costs.flops / 1e12:.2f} TFLOP{moved} per chip (counted by "
                     f"XLA:{costs.counted_by.upper()}): a step takes at least {bound.seconds * 1e3:.1f} ms "
                     f"(bound by {bound.bound_by}; {target.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s, "
                     f"{target.chip.hbm_bandwidth / 1e9:.0f} GB/s), so MFU <= {100 * bound.mfu:.0f}%")
    return "\n".join(lines)
