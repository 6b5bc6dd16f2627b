"""User callables: resolve ``'package.module:function'`` specs and check them in one place.

A config names a user's advantage estimator, policy loss, loss term or reward by registered name or as
``'package.module:function'``; every such string goes through :func:`resolve_callable`, which imports the module,
walks the attribute path and refuses (with one line naming what the callable is for) anything malformed, missing or
not callable, before anything compiles.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["resolve_callable"]


def resolve_callable(spec: str | Callable, *, what: str = "function") -> Callable:
    """The callable named ``'package.module:function'`` (an attribute path such as ``'pkg.mod:Class.method'``
    works too), or ``spec`` itself when it is callable. Errors name ``what`` (a reward, a loss term, an
    estimator...) and say what is wrong: a malformed string (ValueError), a module that does not import
    (ImportError), a missing attribute (AttributeError), or something not callable (TypeError)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a {what} is a callable or a 'package.module:function' string, got {type(spec).__name__}")
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path or ":" in attr_path or not all(attr_path.split(".")):
        raise ValueError(f"{what} {spec!r} must look like 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import module {module_name!r} for {what} {spec!r}: {e}") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise AttributeError(f"{what} {spec!r}: {getattr(obj, '__name__', obj)!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise TypeError(f"{what} {spec!r} resolves to a {type(obj).__name__}, which is not callable")
    return obj
