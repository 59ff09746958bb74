"""The pure training step: `train_step(trainable, opt_state, frozen, batch, rng, memory)`.

Only the trainable collections (`lora`, `crma`) are differentiated; the frozen base (`params`)
is an argument like the batch. A continual-learning `method` (`crma_jax.cl`) may change the LoRA
the forward pass uses and add a regulariser; what it remembers of earlier tasks is `memory`
(plain arrays, `{}` without a method), an argument too, so a new task needs no recompilation. Gradient accumulation runs as a `lax.scan` over micro-batches,
summing token-weighted gradients, so the update equals one big batch. `jit_train_step` compiles
it with explicit in/out `NamedSharding`s over a (data, fsdp, model) mesh.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from crma_jax.cl import Method
from crma_jax.crma import DIAGNOSTICS, crma_diagnostics
from crma_jax.data import BATCH_KEYS  # noqa: F401 - the batch layout the step takes, re-exported
from crma_jax.sharding import DEFAULT_RULES, param_shardings

Batch = dict[str, jax.Array]


def forward_loss(model: Any, variables: dict[str, Any], batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Any]:
    """(summed next-token NLL, (token count, diagnostics state)) on one (micro-)batch, through
    the chunked LM head + cross-entropy (`Decoder.loss`)."""
    deterministic = rng is None
    collect = [DIAGNOSTICS] if model.crma_config is not None else []
    (total, count), state = model.apply(
        variables,
        batch["input_ids"],
        batch["loss_mask"],
        batch["positions"],
        batch["segment_ids"],
        deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng},
        mutable=collect,
        method="loss",
    )
    return total, (count, state)


def make_train_step(model: Any, optimizer: optax.GradientTransformation, accum_steps: int = 1,
                    method: Method | None = None) -> Callable[..., Any]:
    """Build `train_step(trainable, opt_state, frozen, batch, rng, memory) -> (trainable, opt_state, metrics)`.

    `batch` arrays are (B, T) with B divisible by `accum_steps`. The gradient is that of the
    mean token loss plus, with a `method`, its `penalty(lora, memory)`; the forward pass uses
    `method.forward(trainable, memory)`. `metrics` holds float32 scalars `loss` (the mean token
    loss), `tokens`, `grad_norm` (before clipping), `penalty` with a method and, with CRMA,
    per-layer diagnostics.
    """
    use_dropout = model.lora_config is not None and model.lora_config.dropout > 0

    def grads_of(trainable: Any, frozen: Any, batch: Batch, rng: jax.Array, memory: Any) -> tuple[Any, jax.Array, jax.Array, Any]:
        def loss(t: Any) -> tuple[jax.Array, Any]:
            if method is not None:
                t = method.forward(t, memory)
            return forward_loss(model, {"params": frozen, **t}, batch, rng if use_dropout else None)

        (total, (count, state)), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
        return grads, total, count, state

    def train_step(trainable: Any, opt_state: Any, frozen: Any, batch: Batch, rng: jax.Array,
                   memory: Any) -> tuple[Any, Any, dict]:
        if accum_steps == 1:
            grads, total, count, state = grads_of(trainable, frozen, batch, rng, memory)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)
            rngs = jax.random.split(rng, accum_steps)
            zeros = jax.tree.map(jnp.zeros_like, trainable)

            def body(carry: Any, xs: Any) -> tuple[Any, Any]:
                g_sum, t_sum, c_sum = carry
                g, t, c, st = grads_of(trainable, frozen, xs[0], xs[1], memory)
                return (jax.tree.map(jnp.add, g_sum, g), t_sum + t, c_sum + c), st

            (grads, total, count), states = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, rngs))
            state = jax.tree.map(lambda x: x[-1], states)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        penalty = {}
        if method is not None:
            value, pgrads = jax.value_and_grad(lambda t: method.penalty(t["lora"], memory))(trainable)
            grads = jax.tree.map(jnp.add, grads, pgrads)
            penalty = {"penalty": value}
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": total / denom, "tokens": count, "grad_norm": optax.global_norm(grads), **penalty}
        if model.crma_config is not None:
            diag = crma_diagnostics(state)
            metrics["crma_spectral_dev"] = jnp.max(jnp.abs(diag["spectral_norm"] - 1.0))
            metrics["crma_sinkhorn_residual"] = jnp.max(diag["sinkhorn_residual"])
            metrics["crma_alpha"] = diag["alpha"]
            metrics["crma_gain"] = diag["gain"]
        return trainable, opt_state, metrics

    return train_step


def batch_sharding(mesh: Mesh, rules: Any = DEFAULT_RULES) -> NamedSharding:
    """(B, T) batches split over the mesh axes that the `batch` rule names."""
    return NamedSharding(mesh, PartitionSpec(rules["batch"], None))


def jit_train_step(
    step: Callable[..., Any], mesh: Mesh, trainable: Any, opt_state: Any, frozen: Any, memory: Any = None
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """jit `step` with explicit shardings; returns (compiled step, the shardings used).

    Frozen weights follow the logical-axis rules; adapters and optimizer state are small and
    replicated; batches are split along `data` x `fsdp`. Trainable state and optimizer state
    are donated, so an update does not hold two copies.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {
        "trainable": jax.tree.map(lambda _: replicated, trainable),
        "opt_state": jax.tree.map(lambda _: replicated, opt_state),
        "frozen": param_shardings(frozen, mesh),
        "batch": batch_sharding(mesh),
        "rng": replicated,
        "memory": jax.tree.map(lambda _: replicated, memory if memory is not None else {}),
    }
    def step_on_mesh(*args: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for `constrain_batch`
            return step(*args)

    compiled = jax.jit(
        step_on_mesh,
        in_shardings=(shardings["trainable"], shardings["opt_state"], shardings["frozen"], shardings["batch"], replicated,
                      shardings["memory"]),
        out_shardings=(shardings["trainable"], shardings["opt_state"], replicated),
        donate_argnums=(0, 1),
    )
    return compiled, shardings
