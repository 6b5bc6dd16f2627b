"""The optimizer: global grad-norm clipping then Adam(W), built from the state's hyperparameter arrays, with an
optional linear decay of the learning rate (lm-human-preferences), and a fused per-parameter update step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from ppojax.rl.hparams import HParams

if TYPE_CHECKING:
    from ppojax.rl.config import OptimizerConfig, PPOConfig
    from ppojax.rl.setup import PPOSetup


def total_updates(ppo: "PPOConfig", optimizer: "OptimizerConfig", total_iterations: int) -> int:
    """Optimizer updates over which a linear learning-rate schedule decays to 0."""
    return int(optimizer.decay_iterations or total_iterations) * ppo.updates_per_iteration


def learning_rate_at(setup: "PPOSetup", hparams: HParams, count) -> jax.Array:
    """``lr * max(1 - count / total_updates, 0)`` for the linear schedule (lm-human-preferences), else ``lr``."""
    lr = hparams.learning_rate
    if setup.optimizer.schedule == "linear":
        frac = jnp.minimum(jnp.asarray(count, jnp.float32) / max(setup.total_updates, 1), 1.0)
        lr = lr * (1.0 - frac)
    return lr


def make_optimizer(setup: "PPOSetup", hparams: HParams, learning_rate) -> optax.GradientTransformation:
    """The optax chain at these (possibly traced) hyperparameters: clip by global norm -> Adam(W).

    Built anew at every update from the state's arrays; the optimizer state's structure does not depend on their
    values, so ``init`` at any values and ``update`` at the current ones agree."""
    opt = setup.optimizer
    if opt.name == "adam":
        inner = optax.adam(learning_rate, b1=hparams.b1, b2=hparams.b2, eps=hparams.eps)
    else:
        inner = optax.adamw(learning_rate, b1=hparams.b1, b2=hparams.b2, eps=hparams.eps,
                            weight_decay=hparams.weight_decay)
    parts = [optax.clip_by_global_norm(hparams.max_grad_norm)] if opt.max_grad_norm is not None else []
    return optax.chain(*parts, inner)


def update_count(opt_state) -> jax.Array:
    """Optimizer updates done (Adam's ``count``)."""
    has_count = lambda x: "count" in getattr(x, "_fields", ())  # optax states are NamedTuples
    counts = [x.count for x in jax.tree.leaves(opt_state, is_leaf=has_count) if has_count(x)]
    return counts[0] if counts else jnp.zeros((), jnp.int32)


def optimizer_step(setup: "PPOSetup", hparams: HParams, learning_rate, grads, opt_state, params):
    """One update of :func:`make_optimizer`'s chain, fused per parameter: ``(params, opt_state, grad_norm)``.

    The math of optax's ``clip_by_global_norm -> adam`` (or ``adamw``) and the same optimizer-state tree (the chain's
    ``ScaleByAdamState`` is replaced in place), written as one expression per output so that XLA makes three
    elementwise passes per parameter (``m``, ``v``, ``p``). Through optax's chain it makes four to five on a CPU: the
    clipped gradient is written out and read back, and without clipping the ``g^2`` of Adam's second moment is
    shared with the global norm's and written out too. With ``k`` the updates done so far::

        n  = ||g||_2 over every parameter                            (returned: the logged grad_norm)
        c  = 1 if n < max_grad_norm else max_grad_norm / n           (1 without clipping)
        m' = b1 m + (1 - b1) c g
        v' = b2 v + (1 - b2) c^2 g^2
        p' = p - lr [ (m' / (1 - b1^(k+1))) / (sqrt(v' / (1 - b2^(k+1))) + eps) + wd p ]     (wd: AdamW only)

    Each output keeps its input's dtype. Equal to the optax chain up to float rounding (tests/test_perf_options.py).
    """
    from optax import tree_utils as otu

    opt = setup.optimizer
    grad_norm = optax.global_norm(grads)
    scale = jnp.float32(1.0)
    if opt.max_grad_norm is not None:  # optax: g if n < max_norm else (g / n) * max_norm
        scale = jnp.where(grad_norm < hparams.max_grad_norm, 1.0, hparams.max_grad_norm / grad_norm)
    b1, b2, eps = hparams.b1, hparams.b2, hparams.eps
    count = optax.safe_increment(otu.tree_get(opt_state, "count"))
    c1, c2 = (1.0 - b1) * scale, (1.0 - b2) * scale * scale  # scalars folded in: no clipped gradient in memory
    bc1, bc2 = 1.0 - b1 ** count, 1.0 - b2 ** count
    decay = hparams.weight_decay if opt.name == "adamw" else None

    def leaf(p, m, v, g):
        m_new = b1 * m + c1 * g
        v_new = b2 * v + (c2 * g) * g
        step = (m_new / bc1) / (jnp.sqrt(v_new / bc2) + eps)
        if decay is not None:
            step = step + decay * p
        return (p - learning_rate * step).astype(p.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype)

    leaves, treedef = jax.tree.flatten(params)
    others = [treedef.flatten_up_to(t) for t in (otu.tree_get(opt_state, "mu"), otu.tree_get(opt_state, "nu"), grads)]
    with jax.named_scope("optimizer_step"):  # names its ops in profiles (benchmarks/profile_iteration.py)
        new_p, new_m, new_v = (treedef.unflatten(list(col)) for col in zip(*map(leaf, leaves, *others)))
    return new_p, otu.tree_set(opt_state, count=count, mu=new_m, nu=new_v), grad_norm

