"""Environments for multi-turn episodes: the interface (``ppojax.envs.base``), the registry and the built-ins.

``ppojax.register_env(name)`` registers a class or factory; the config's ``env:`` section selects it (``name``,
``kwargs``, ``max_turns``, ``timeout_s``, ...). ``ppojax.train.multiturn`` runs the episodes token-in/token-out.
Built-ins: ``calculator`` (a tool for the ``arithmetic`` task), ``guess`` (a guessing game) and ``scripted_user``
(a dialogue with a scripted user). See ``docs/multi_turn.md``.
"""

from ppojax.envs.base import (EnvError, check_env_kwargs, check_observation, check_step, env_names, get_env,
                              is_messages, make_episode, register_env)
from ppojax.envs import calculator, dialogue, guess  # noqa: E402,F401  (each registers itself)

__all__ = ["EnvError", "check_env_kwargs", "check_observation", "check_step", "env_names", "get_env", "is_messages",
           "make_episode", "register_env"]
