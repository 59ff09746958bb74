"""The optimizer: ZClip adaptive gradient clipping, then per-label AdamW with warmup + cosine.

    tx = make_optimizer(param_labels(trainable), {"lora_a": 2e-4, "lora_b": 2e-4,
                        "crma_read_mix": 1e-3, "crma_gate": 1e-2}, total_steps=1000, warmup_steps=10)

A step whose gradient norm is not finite is skipped by the whole chain: the updates are zero and
neither ZClip's statistics nor AdamW's moments, step count or schedule position move, so the
next finite step proceeds as if the bad one never happened.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

FROZEN = "frozen"


class ZClipState(NamedTuple):
    """ZClip statistics and the outcome of the last step (all scalars except `buffer`).

    count: int32, finite steps folded into the statistics (a skipped step does not count, so a
      non-finite norm during warmup lengthens the warmup by one step);
    buffer: float32 (warmup_steps,), the warmup norms; mu, var: EMA mean and variance of the
      norm (0 until warmup ends); z: last z-score (0 during warmup and on skipped steps);
    clipped: last step was scaled down (z-rule or hard cap); raw_norm: last global norm as seen;
    clipped_norm: norm of the updates passed on (0 when skipped); skipped: last norm non-finite.
    """

    count: jax.Array
    buffer: jax.Array
    mu: jax.Array
    var: jax.Array
    z: jax.Array
    clipped: jax.Array
    raw_norm: jax.Array
    clipped_norm: jax.Array
    skipped: jax.Array


class SkipChainState(NamedTuple):
    """State of `chain_skipping_nonfinite`: the clipper's state and the inner optimizer's."""

    zclip: ZClipState
    inner: Any


def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    eps: float = 1e-6,
    max_grad_norm: float | None = None,
) -> optax.GradientTransformation:
    """ZClip: clip the global update norm g when its z-score against an EMA exceeds `z_thresh`.

    Warmup (the first `warmup_steps` finite steps): norms are collected, nothing is clipped; the
    last warmup step sets mu and the population variance from them. After warmup:
    z = (g - mu) / (sigma + eps); if z > z_thresh, g is clipped to mu + (z_thresh**2 / z) * sigma;
    then mu = alpha * mu + (1 - alpha) * g_c and var = alpha * var + (1 - alpha) * (g_c - mu)**2
    around the new mu, with g_c the z-clipped norm. `max_grad_norm` caps the norm after the
    z-rule (warmup included); it does not feed the statistics. A non-finite g zeroes the updates
    and leaves the statistics (and `count`) as they were. All updates are scaled by one factor.
    `z_thresh=inf` disables the z-rule but keeps the statistics, the cap and the skip.
    """
    if warmup_steps < 1:
        raise ValueError(f"zclip warmup_steps must be >= 1, got {warmup_steps}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"zclip alpha must be in [0, 1), got {alpha}")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"zclip max_grad_norm must be positive or None, got {max_grad_norm}")

    def init(params: Any) -> ZClipState:
        del params  # the statistics are scalars, whatever the tree
        f0 = jnp.zeros((), jnp.float32)
        no = jnp.zeros((), jnp.bool_)
        return ZClipState(jnp.zeros((), jnp.int32), jnp.zeros((warmup_steps,), jnp.float32), f0, f0, f0, no, f0, f0, no)

    def update(updates: Any, state: ZClipState, params: Any = None) -> tuple[Any, ZClipState]:
        del params
        # float32 norm even for bf16 gradients: the statistics need more than 8 mantissa bits.
        g = optax.global_norm(jax.tree.map(lambda u: u.astype(jnp.float32), updates))
        finite = jnp.isfinite(g)
        g_safe = jnp.where(finite, g, 0.0)  # keeps NaN out of every arithmetic branch below
        in_warmup = state.count < warmup_steps

        # (1) warmup: record the norm; the step that fills the buffer initialises the statistics.
        slot = jnp.minimum(state.count, warmup_steps - 1)
        record = finite & in_warmup
        buffer = jnp.where(record, state.buffer.at[slot].set(g_safe), state.buffer)
        fills = record & (state.count == warmup_steps - 1)
        warm_mu = jnp.mean(buffer)
        warm_var = jnp.mean(jnp.square(buffer - warm_mu))  # population variance (ddof 0) of the warmup norms

        # (2) z-rule, reciprocal: the further out the spike, the closer to mu it lands.
        sigma = jnp.sqrt(state.var)
        z = jnp.where(in_warmup | ~finite, 0.0, (g_safe - state.mu) / (sigma + eps))
        z_fires = z > z_thresh
        g_z = jnp.where(z_fires, state.mu + (z_thresh**2 / jnp.where(z_fires, z, 1.0)) * sigma, g_safe)

        # (3) EMA on the z-clipped norm: mean first, variance around the new mean.
        ema_mu = alpha * state.mu + (1.0 - alpha) * g_z
        ema_var = alpha * state.var + (1.0 - alpha) * jnp.square(g_z - ema_mu)
        after = finite & ~in_warmup
        mu = jnp.where(fills, warm_mu, jnp.where(after, ema_mu, state.mu))
        var = jnp.where(fills, warm_var, jnp.where(after, ema_var, state.var))

        # Hard cap last, so it bounds what is applied but not what the statistics learn.
        g_c = g_z if max_grad_norm is None else jnp.minimum(g_z, max_grad_norm)
        clipped = finite & (z_fires | (g_c < g_z))
        scale = jnp.where(g_safe > 0, g_c / jnp.where(g_safe > 0, g_safe, 1.0), 1.0)
        # (4) where, not multiply: NaN * 0 is NaN.
        out = jax.tree.map(lambda u: jnp.where(finite, u * scale.astype(u.dtype), jnp.zeros_like(u)), updates)
        new = ZClipState(
            count=jnp.where(finite, optax.safe_increment(state.count), state.count),
            buffer=buffer,
            mu=mu,
            var=var,
            z=z,
            clipped=clipped,
            raw_norm=g,
            clipped_norm=jnp.where(finite, g_c, 0.0),
            skipped=~finite,
        )
        return out, new

    return optax.GradientTransformation(init, update)


def chain_skipping_nonfinite(
    clip: optax.GradientTransformation, inner: optax.GradientTransformation, mask: Any = None
) -> optax.GradientTransformation:
    """`clip` (a `zclip`) then `inner`; when the clip reports `skipped`, the updates are zero and
    `inner`'s state is kept as it was (moments, counts, schedules), so nothing moves.

    `mask` (a bool pytree prefix of the updates, or a callable returning one) picks the leaves
    the clipper sees and scales; the others go to `inner` untouched (use it to keep frozen
    leaves out of the norm). `inner` still runs on a skipped step (its result is discarded with
    `jnp.where`), which keeps the step free of control flow and sharding-friendly.
    """

    def split(updates: Any) -> tuple[Any, Any]:
        if mask is None:
            return None, updates
        m = mask(updates) if callable(mask) else mask
        return m, jax.tree.map(lambda keep, u: u if keep else None, m, updates)

    def init(params: Any) -> SkipChainState:
        _, seen = split(params)
        return SkipChainState(clip.init(seen), inner.init(params))

    def update(updates: Any, state: SkipChainState, params: Any = None) -> tuple[Any, SkipChainState]:
        m, seen = split(updates)
        clipped, zstate = clip.update(seen, state.zclip, None)
        if m is not None:
            clipped = jax.tree.map(lambda keep, u, c: c if keep else u, m, updates, clipped)
        new_updates, inner_state = inner.update(clipped, state.inner, params)
        skip = zstate.skipped
        inner_state = jax.tree.map(lambda old, new: jnp.where(skip, old, new), state.inner, inner_state)
        new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        return new_updates, SkipChainState(zstate, inner_state)

    return optax.GradientTransformation(init, update)


def lr_schedule(lr: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to 0 at `total_steps`
    (optax.warmup_cosine_decay_schedule). total_steps == 0: warmup then constant `lr`."""
    if total_steps < 0 or warmup_steps < 0:
        raise ValueError(f"total_steps and warmup_steps must be >= 0, got {total_steps}, {warmup_steps}")
    if total_steps == 0:
        return optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps else optax.constant_schedule(lr)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be < total_steps ({total_steps})")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps, 0.0)


def make_optimizer(
    labels: Any | Callable[[Any], Any],
    lr: Mapping[str, float],
    *,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float | Mapping[str, float] = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    zclip_kwargs: dict[str, Any] | None = None,
    use_zclip: bool = True,
) -> optax.GradientTransformation:
    """zclip -> optax.partition({label: AdamW(lr_schedule(lr[label]))}, labels), frozen -> zero.

    `labels`: a label pytree (e.g. `param_labels(tree)`, a prefix of the updates) or a callable
    returning one. Every label but "frozen" needs an `lr` entry (ValueError naming the missing
    ones, raised here for a tree and at `init` for a callable); extra `lr` labels are allowed.
    `weight_decay`: one value, or per label (missing labels get 0, unknown ones raise). Each
    AdamW sits in `optax.inject_hyperparams` so `learning_rates` can read its LR. Frozen leaves
    are excluded from the ZClip norm and always get zero updates. With lr 0 a label's updates
    are exactly zero. `use_zclip=False` turns off only the z-rule: the `max_grad_norm` cap, the
    non-finite skip and the metrics stay. State: `SkipChainState(zclip, PartitionState)`.
    """
    if FROZEN in lr:
        raise ValueError("'frozen' parameters never train; drop 'frozen' from lr")
    decay = dict(weight_decay) if isinstance(weight_decay, Mapping) else {k: weight_decay for k in lr}
    unknown = sorted(set(decay) - set(lr))
    if unknown:
        raise ValueError(f"weight_decay has labels with no lr entry: {unknown}")

    def adamw(label: str) -> optax.GradientTransformation:
        return optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(
            learning_rate=lr_schedule(lr[label], total_steps, warmup_steps),
            b1=b1, b2=b2, eps=eps, weight_decay=decay.get(label, 0.0),
        )

    transforms = {label: adamw(label) for label in lr}
    transforms[FROZEN] = optax.set_to_zero()

    def check(tree: Any) -> Any:
        missing = sorted(set(jax.tree.leaves(tree)) - set(transforms))
        if missing:
            raise ValueError(f"lr has no entry for label(s) {missing}; got lr for {sorted(lr)}")
        return tree

    if callable(labels):
        label_of: Any = lambda tree: check(labels(tree))  # noqa: E731
        mask: Any = lambda tree: jax.tree.map(lambda s: s != FROZEN, label_of(tree))  # noqa: E731
    else:
        label_of = check(labels)
        mask = jax.tree.map(lambda s: s != FROZEN, labels)

    kwargs = dict(zclip_kwargs or {})
    if not use_zclip:
        kwargs["z_thresh"] = float("inf")
    return chain_skipping_nonfinite(zclip(**kwargs), optax.partition(transforms, label_of), mask)


def _find(state: Any, pred: Callable[[Any], bool]) -> list[Any]:
    return [x for x in jax.tree.leaves(state, is_leaf=pred) if pred(x)]


def zclip_metrics(state: Any) -> dict[str, jax.Array]:
    """{mu, sigma, z, clipped, raw_norm, clipped_norm, skipped} of the (first) ZClipState found in
    `state` (a ZClipState or any optimizer state holding one); {} when there is none."""
    found = _find(state, lambda x: isinstance(x, ZClipState))
    if not found:
        return {}
    s = found[0]
    return {
        "mu": s.mu, "sigma": jnp.sqrt(s.var), "z": s.z, "clipped": s.clipped,
        "raw_norm": s.raw_norm, "clipped_norm": s.clipped_norm, "skipped": s.skipped,
    }


def learning_rates(opt_state: Any) -> dict[str, jax.Array]:
    """label -> learning rate of the last update (schedule(0) before the first), from the
    `inject_hyperparams` states of a `make_optimizer` state. Frozen has none."""
    out: dict[str, jax.Array] = {}
    for part in _find(opt_state, lambda x: isinstance(x, optax.PartitionState)):
        for label, sub in part.inner_states.items():
            # duck-typed: inject_hyperparams' state class differs across optax versions
            for inj in _find(sub, lambda x: isinstance(getattr(x, "hyperparams", None), dict)):
                out.setdefault(label, inj.hyperparams["learning_rate"])
    return out
