"""Every user callable of a run, resolved and checked in one place before anything compiles.

A run's config names user functions as ``'package.module:function'`` (or by the name a user module registered):
the advantage estimator, the policy loss, each extra loss term and the reward. :func:`user_callables` resolves them
all through ``ppojax.registry.resolve_callable`` (one line naming the config key for a module that does not import
or an attribute that is missing); :func:`check_callables` then traces one iteration on the state's shapes with
``jax.eval_shape`` (nothing runs or compiles), so that a function with the wrong signature or output shape fails
before the run writes a file, again in one line naming its key.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, Optional

from ppojax.registry import RegistryError, error_detail, resolve_callable


def user_callables(cfg: Any) -> dict[str, Callable]:
    """Every user callable an ``ExperimentConfig`` names as ``'package.module:function'``, resolved, by config key
    (``ppo.advantage_estimator``, ``ppo.policy_loss``, ``ppo.extra_loss_terms[i].fn``, ``reward.function``), and
    an estimator or policy loss that a user module registered and the config names by its registered name (a typo
    in a name is refused with the closest one when the config is built). ``RegistryError`` for the first that
    cannot be resolved."""
    specs = {"ppo.advantage_estimator": cfg.ppo.advantage_estimator, "ppo.policy_loss": cfg.ppo.policy_loss}
    for i, term in enumerate(cfg.ppo.extra_loss_terms):
        specs[f"ppo.extra_loss_terms[{i}].fn"] = term.fn
    if cfg.reward.function is not None:
        specs["reward.function"] = cfg.reward.function
    what = {"ppo.advantage_estimator": "advantage estimator", "ppo.policy_loss": "policy loss",
            "reward.function": "reward"}
    found = {key: resolve_callable(spec, what=what.get(key, "loss term"), key=key)
             for key, spec in specs.items() if callable(spec) or (isinstance(spec, str) and ":" in spec)}
    # Registered by a user module (imports:) and named by its registered name: the user's function all the same.
    from ppojax.rl.advantages import get_estimator
    from ppojax.rl.losses import get_policy_loss

    for key, get in (("ppo.advantage_estimator", lambda s: get_estimator(s).fn), ("ppo.policy_loss", get_policy_loss)):
        if key not in found:
            fn = get(specs[key])
            if not getattr(fn, "__module__", "ppojax").startswith("ppojax"):
                found[key] = fn
    return found


def _spec_line(cfg: Any, key: str) -> str:
    value: Any = cfg
    for part in key.replace("[", ".").replace("]", "").split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return f"{key}={value if callable(value) else repr(value)}"


def _culprit(e: BaseException, found: dict[str, Callable]) -> Optional[str]:
    """The key of the user function an exception raised while tracing comes from: the innermost traceback frame
    that runs one of them, else the one whose name the message calls (``f() takes 1 positional argument``)."""
    codes = {getattr(getattr(fn, "__wrapped__", fn), "__code__", None): key for key, fn in found.items()}
    culprit = None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        culprit = codes.get(frame.f_code, culprit)
    if culprit is not None:
        return culprit
    message = str(e)
    named = [key for key, fn in found.items() if f"{getattr(fn, '__name__', '?')}()" in message]
    return named[0] if len(named) == 1 else None


def check_callables(cfg: Any, state: Any = None, prompt_ids: Any = None, prompt_mask: Any = None, *,
                    host_reward: bool = False) -> dict[str, Callable]:
    """Resolve every user callable of ``cfg`` (:func:`user_callables`) and, given a train ``state`` and prompts
    (arrays or ``jax.ShapeDtypeStruct``), trace one iteration on their shapes with ``jax.eval_shape``
    (``ppojax.rl.iteration.check_iteration``; nothing runs or compiles), so that a function that takes the wrong
    arguments or returns the wrong shapes fails now. ``host_reward``: the scores come from the host (the rollout
    and the update are traced). Returns the resolved callables by key.

    Raises ``RegistryError``, one line: ``ppo.extra_loss_terms[0].fn='mymod:term' fails when traced on the
    iteration's shapes: TypeError: term() missing 1 required positional argument: 'scale'``."""
    found = user_callables(cfg)
    if state is None:
        return found
    from ppojax.rl import iteration

    try:
        iteration.check_iteration(state, prompt_ids, prompt_mask, host_reward=host_reward)
    except Exception as e:  # noqa: BLE001 -- whatever a user's function raises, one line naming it
        key = _culprit(e, found)
        if key is not None:
            where = _spec_line(cfg, key)
        elif found:
            where = "one of " + ", ".join(_spec_line(cfg, k) for k in found)
        else:
            raise  # no user function is involved: a bug of ppojax, whose traceback is worth reading
        raise RegistryError(f"{where} fails when the iteration is traced on its shapes: {error_detail(e)}") from None
    return found


__all__ = ["check_callables", "user_callables"]
