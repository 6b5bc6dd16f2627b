"""The environment interface of multi-turn episodes, and its registry.

An environment is registered under a name with :func:`register_env` (a decorator on a class or a factory) and
selected by the config's ``env.name``; ``env.kwargs`` are the factory's keyword arguments. Every episode gets a
fresh object from the factory, so an environment may keep per-episode state in ``self``. The object has:

- ``reset(row, seed) -> observation``: the first observation of the episode for a task row
  (``ppojax.tasks.Row``: ``row.prompt``, ``row.target``) and a seed. A string, or a list of chat messages
  (``{"role", "content"}``); with ``prompts.chat`` a string is the user's message.
- ``step(text) -> (observation or None, reward, done)``: the model's decoded turn in, the next observation out (a
  string, said by the role in the environment's ``observation_role`` attribute, default ``"user"``; or a list of
  messages), a float reward for this turn, and whether the episode is over. ``None`` with ``done=False`` is not
  allowed (the model would have nothing new to read).

Optional attributes: ``observation_role`` (``"user"``, ``"tool"``, ...) and ``success`` (a bool read at the
episode's end: what the evaluation's success rate counts; absent, an episode whose rewards sum above 0 succeeded).

An episode must be a pure function of its row, its seed and the texts it is given: runs resume exactly by
rebuilding it (no episode state is checkpointed), and the ``k`` samples of one prompt share its seed.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from typing import Any, Callable, Mapping, Optional

EnvFactory = Callable[..., Any]

_ENVS: dict[str, EnvFactory] = {}


class EnvError(ValueError):
    """An environment that cannot be built or that broke its contract, in one line naming it (and the episode)."""


def register_env(name: str, *, replace: bool = False) -> Callable[[EnvFactory], EnvFactory]:
    """Decorator: registers a class (or any factory) whose call with ``env.kwargs`` gives one episode's object, as
    ``env.name: name``. Returns the factory unchanged."""
    if not isinstance(name, str) or not name or name != name.strip() or ":" in name:
        raise ValueError(f"an environment name is a non-empty string without spaces or ':', got {name!r}")

    def decorator(factory: EnvFactory) -> EnvFactory:
        if not callable(factory):
            raise TypeError(f"register_env({name!r}) decorates a class or a function, got {type(factory).__name__}")
        old = _ENVS.get(name)
        same = old is not None and (old is factory or (getattr(old, "__module__", None), getattr(
            old, "__qualname__", None)) == (getattr(factory, "__module__", None), getattr(factory, "__qualname__",
                                                                                           None)))
        if old is not None and not same and not replace:
            raise ValueError(f"an environment named {name!r} is already registered (pass replace=True to replace it)")
        _ENVS[name] = factory
        return factory

    return decorator


def env_names() -> list[str]:
    """The registered environment names, sorted."""
    return sorted(_ENVS)


def get_env(name: Any) -> EnvFactory:
    """The factory registered as ``name``; EnvError naming ``env.name`` and the closest registered name."""
    if isinstance(name, str) and name in _ENVS:
        return _ENVS[name]
    close = difflib.get_close_matches(name, list(_ENVS), n=1) if isinstance(name, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise EnvError(f"env.name={name!r}: unknown environment{hint} (registered: {', '.join(env_names())}; a module "
                   "that registers more (ppojax.register_env) is named under imports:)")


def check_env_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """EnvError for an ``env.kwargs`` key the factory does not take (with the closest name)."""
    factory = get_env(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise EnvError(f"env.kwargs.{key}: the environment {name!r} takes no such argument{hint} (it takes: "
                           f"{', '.join(known) or 'none'})")


def make_episode(name: str, kwargs: Mapping[str, Any]):
    """A fresh episode object: ``factory(**kwargs)``, checked to have ``reset`` and ``step``."""
    episode = get_env(name)(**dict(kwargs))
    for method in ("reset", "step"):
        if not callable(getattr(episode, method, None)):
            raise EnvError(f"env.name={name!r}: the object its factory returned ({type(episode).__name__}) has no "
                           f"{method}() method; an episode has reset(row, seed) and step(text)")
    return episode


def is_messages(x: Any) -> bool:
    """A non-empty list of ``{"role": str, "content": str}`` dicts."""
    return (isinstance(x, list) and bool(x) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x))


def check_observation(obs: Any, *, allow_none: bool) -> Optional[str]:
    """What is wrong with an observation (None: nothing)."""
    if obs is None:
        return None if allow_none else "an observation is a string or a list of chat messages, got None"
    if isinstance(obs, str):
        return None if obs else "the observation is an empty string (the model would read nothing new)"
    if is_messages(obs):
        return None
    return (f"an observation is a non-empty string or a list of {{'role', 'content'}} messages, got "
            f"{type(obs).__name__} {str(obs)[:40]!r}")


def check_step(out: Any) -> tuple[Any, float, bool]:
    """``step``'s return value as ``(observation or None, float reward, bool done)``; ValueError saying what is
    wrong otherwise (the caller names the environment and the episode)."""
    if not (isinstance(out, tuple) and len(out) == 3):
        got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise ValueError(f"step() returned {got}; it returns (observation or None, reward, done)")
    obs, reward, done = out
    if not isinstance(reward, numbers.Real) or isinstance(reward, bool) or not math.isfinite(float(reward)):
        raise ValueError(f"step() returned the reward {reward!r}; a reward is a finite float")
    if not isinstance(done, (bool, numbers.Integral)) and type(done).__name__ != "bool_":
        raise ValueError(f"step() returned done={done!r}; done is a bool")
    done = bool(done)
    problem = check_observation(obs, allow_none=done)
    if problem is not None:
        raise ValueError(f"step() returned {'done=False with no observation' if obs is None else problem}")
    return obs, float(reward), done


__all__ = ["EnvError", "check_env_kwargs", "check_observation", "check_step", "env_names", "get_env", "is_messages",
           "make_episode", "register_env"]
