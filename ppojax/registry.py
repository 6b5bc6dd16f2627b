"""User callables: resolve ``'package.module:function'`` specs and check them in one place.

A config names a user's advantage estimator, policy loss, loss term or reward by registered name or as
``'package.module:function'``; every such string goes through :func:`resolve_callable`, which imports the module,
walks the attribute path and refuses (with one line naming the config key) anything malformed, missing, not
importable or not callable. ``ppojax.train.callables`` resolves every user callable of a run's config through it and
traces the iteration once, so that a wrong signature fails before the run writes anything. This module imports
nothing of ppojax: every registry (estimators, losses, rewards) sits above it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Optional

__all__ = ["RegistryError", "error_detail", "resolve_callable"]


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


def error_detail(e: BaseException) -> str:
    """``'TypeError: first line of the message'``: an exception as one line."""
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
        raise _ImportFailed(f"{at}cannot import module {module_name!r} for {what} {spec!r}: {error_detail(e)}") from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise _MissingAttribute(f"{at}{what} {spec!r}: {getattr(obj, '__name__', obj)!r} has no attribute "
                                    f"{attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise _NotCallable(f"{at}{what} {spec!r} resolves to a {type(obj).__name__}, which is not callable")
    return obj
