"""User callables: resolve ``'package.module:function'`` specs and check them in one place.

A config names a user's advantage estimator, policy loss, loss term or reward by registered name or as
``'package.module:function'``; every such string goes through :func:`resolve_callable`, which imports the module,
walks the attribute path and refuses (with one line naming the config key) anything malformed, missing, not
importable or not callable. :func:`check_callables` resolves every user callable of an ``ExperimentConfig`` and,
given a train state, traces the iteration once with ``jax.eval_shape`` (nothing compiles) so that a wrong
signature or a wrong output shape fails before the run writes anything, naming the key of the function at fault.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from typing import Any, Optional

__all__ = ["RegistryError", "check_callables", "resolve_callable", "user_callables"]


class RegistryError(ValueError):
    """A user callable that cannot be used, said in one line naming its config key. What failed is also in the
    type: a module that does not import is an ImportError too, a missing attribute an AttributeError, something
    not callable (or not a string) a TypeError."""


class _ImportFailed(RegistryError, ImportError):
    pass


class _MissingAttribute(RegistryError, AttributeError):
    pass


class _NotCallable(RegistryError, TypeError):
    pass


def _detail(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def resolve_callable(spec: str | Callable, *, what: str = "function", key: Optional[str] = None) -> Callable:
    """The callable named ``'package.module:function'`` (an attribute path such as ``'pkg.mod:Class.method'``
    works too), or ``spec`` itself when it is callable.

    Every failure is a :class:`RegistryError` (a ValueError) of one line, starting with ``key=spec`` when the config
    key is given (e.g. ``ppo.extra_loss_terms[0].fn='mymod:term': ``), that names ``what`` it is for (a reward, a
    loss term, an estimator...) and what is wrong: a malformed string, a module that does not import (not found, a
    syntax error, or anything it raises while it runs), a missing attribute, or something not callable."""
    if callable(spec):
        return spec
    at = f"{key}={spec!r}: " if key else ""
    if not isinstance(spec, str):
        raise _NotCallable(f"{at}a {what} is a callable or a 'package.module:function' string, got "
                           f"{type(spec).__name__}")
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path or ":" in attr_path or not all(attr_path.split(".")):
        raise RegistryError(f"{at}{what} {spec!r} must look like 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # whatever the module raises while it runs: one line, not its traceback
        raise _ImportFailed(f"{at}cannot import module {module_name!r} for {what} {spec!r}: {_detail(e)}") from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise _MissingAttribute(f"{at}{what} {spec!r}: {getattr(obj, '__name__', obj)!r} has no attribute "
                                    f"{attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise _NotCallable(f"{at}{what} {spec!r} resolves to a {type(obj).__name__}, which is not callable")
    return obj


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
        raise RegistryError(f"{where} fails when the iteration is traced on its shapes: {_detail(e)}") from None
    return found
