"""A run's train state from its experiment config: the one construction the runner, the sweeps and the pipeline
share, so that a sweep's run r and the single run with the same seed and values start from the same state."""

from __future__ import annotations

from typing import Any, Optional

import jax

from ppojax.rl.roles import roles_from_config
from ppojax.rl.state import TrainState, create_train_state


def create_state(cfg: Any, model_config: Any, actor_params: Any, reward: Any, *,
                 axis_name: Optional[str] = None) -> TrainState:
    """``create_train_state`` for an ``ExperimentConfig``: its PPO and optimizer settings, the run's seed as the
    key, ``iterations`` as the length of a linear learning-rate decay, and LoRA roles when ``lora.rank > 0``
    (the policy's weights are then the shared frozen base)."""
    roles = roles_from_config(getattr(cfg, "lora", None), model_config)
    return create_train_state(model_config, actor_params, ppo=cfg.ppo, reward=reward, key=jax.random.key(cfg.seed),
                              optimizer=cfg.optimizer, total_iterations=cfg.iterations, axis_name=axis_name,
                              roles=roles)


__all__ = ["create_state"]
