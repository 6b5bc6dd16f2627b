"""Typed configs: nested frozen dataclasses built from YAML and ``--set a.b=value`` overrides.

A config is a tree of ``@dataclasses.dataclass(frozen=True, kw_only=True)`` classes. Each field is documented by
an *attribute docstring*, the string literal on the line after it, which ``describe`` prints for ``--help``::

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class PPOConfig:
        learning_rate: float = 1e-5
        "Adam step size."
        minibatch_size: int = 8
        "Sequences per gradient step."

        def __post_init__(self):
            if self.minibatch_size <= 0:
                raise ValueError(f"minibatch_size must be positive, got {self.minibatch_size}")

(``dataclasses.field(metadata={"help": ...})`` is honoured too, and wins where both are given.)

Everything here is plain Python and PyYAML, with no jax, so a bad config fails in milliseconds, before anything
compiles. Every problem is one ``ConfigError`` naming the dotted field path, what was expected and what was given::

    ppo.minibatch_size: expected int, got str 'eight'
    ppo.lerning_rate: unknown field; did you mean 'learning_rate'? (valid fields: learning_rate, minibatch_size)

YAML is read as YAML 1.2 reads scalars, not 1.1: ``1e-5`` and ``3E4`` are floats (1.1 wants ``1.0e-5``), and only
``true``/``false`` are booleans (1.1 also turns ``yes``, ``no``, ``on``, ``off`` into booleans, so that a field
meant to hold the string ``no`` silently becomes ``False``).
"""

from __future__ import annotations

import ast
import collections.abc
import copy
import dataclasses
import difflib
import functools
import inspect
import os
import pathlib
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "from_dict",
    "to_dict",
    "parse_override",
    "apply_overrides",
    "load_yaml",
    "save_yaml",
    "load_config",
    "import_modules",
    "describe",
    "field_docs",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be built; the message names the dotted field path."""


# --------------------------------------------------------------------------------------------------------------
# YAML dialect

_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_TAG = "tag:yaml.org,2002:bool"
# Floats with an exponent but no dot, or an unsigned exponent: 1e-5, 3E4, 2.5e3. YAML 1.1's resolver (PyYAML's)
# requires both, so it reads these as strings.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_STRICT_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and booleans, which rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys; in a config that is a silent typo.
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _STRICT_BOOL, list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _EXPONENT_FLOAT, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings our loader would read as floats (``'1e-5'``), so they round-trip."""


# The dumper keeps YAML 1.1 booleans: it then quotes 'yes' and 'no', which every reader takes as strings.
_Dumper.add_implicit_resolver(_FLOAT_TAG, _EXPONENT_FLOAT, list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- _Loader is a SafeLoader.


# --------------------------------------------------------------------------------------------------------------
# Formatting helpers


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _fmt_value(value: Any) -> str:
    """A value as it would be written in YAML (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_fmt_value(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fmt_value(_plain(value))
    return repr(value)


def _given(value: Any) -> str:
    """What was given, for an error message: its kind and a short rendering."""
    if value is None:
        return "null"
    kind = "dict" if isinstance(value, Mapping) else "list" if isinstance(value, tuple) else type(value).__name__
    text = _fmt_value(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_homogeneous_tuple(args: tuple) -> bool:
    return len(args) == 2 and args[1] is Ellipsis


def _type_name(tp: Any) -> str:
    """A type in the words a YAML author uses: ``int``, ``list[float]``, ``'adam' | 'sgd'``, ``str | null``."""
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(_fmt_value(a) for a in args)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        if not args:
            return "list"
        if origin is tuple and not _is_homogeneous_tuple(args):
            return "list[" + ", ".join(_type_name(a) for a in args) + "]"
        return f"list[{_type_name(args[0])}]"
    if origin in (dict, collections.abc.Mapping):
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]" if args else "dict"
    if tp in (list, tuple):
        return "list"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def _type_error(path: str, tp: Any, value: Any, hint: str = "") -> ConfigError:
    return ConfigError(f"{path}: expected {_type_name(tp)}, got {_given(value)}{hint}")


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_field(path: str, key: Any, names: Sequence[str]) -> ConfigError:
    suggestion = _suggest(key, names) if isinstance(key, str) else ""
    return ConfigError(f"{path}: unknown field{suggestion} (valid fields: {', '.join(names)})")


# --------------------------------------------------------------------------------------------------------------
# Introspection


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as e:  # NameError from a string annotation, most often.
        raise TypeError(
            f"cannot resolve the type annotations of {cls.__qualname__}: {e} "
            "(config classes and the types they name must be importable at module level)") from e


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _field_default(f: dataclasses.Field) -> Any:
    """The field's default value (calling its factory), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _dataclass_in(tp: Any) -> type | None:
    """``tp`` if it is a dataclass, or the one dataclass in a union such as ``Sub | None`` or ``Sub | str``."""
    if _is_dataclass_type(tp):
        return tp
    if _is_union(tp):
        found = [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
        if len(found) == 1:
            return found[0]
    return None


def _dict_value_type(tp: Any) -> Any | None:
    """The value type of ``dict[str, X]`` (or of ``dict[str, X] | None``), else None."""
    if _is_union(tp):
        others = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(others) != 1:
            return None
        tp = others[0]
    if tp is dict:
        return Any
    if typing.get_origin(tp) in (dict, collections.abc.Mapping):
        args = typing.get_args(tp)
        return args[1] if args else Any
    return None


def _attribute_docstrings(klass: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literals that follow annotated assignments in ``klass``'s source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):  # No source: built in a REPL, by exec, or by make_dataclass.
        return {}
    classdef = next((node for node in tree.body if isinstance(node, ast.ClassDef)), None)
    if classdef is None:
        return {}
    docs = {}
    for stmt, following in zip(classdef.body, classdef.body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    return docs


@functools.cache
def _field_docs(cls: type) -> types.MappingProxyType:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # Base classes first, so a subclass's docstring wins.
        if klass is not object:
            docs.update(_attribute_docstrings(klass))
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs[f.name] = inspect.cleandoc(f.metadata["help"])
    return types.MappingProxyType(docs)


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: documentation}`` for a config dataclass.

    A field is documented by the string literal on the line after it (an attribute docstring, read from the class
    source), or by ``dataclasses.field(metadata={"help": ...})``, which wins where both are given. Fields of base
    classes are included. Undocumented fields are absent, so a test can check ``set(fields) - set(docs)`` is empty.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"field_docs expects a dataclass type, got {cls!r}")
    return dict(_field_docs(cls))


# --------------------------------------------------------------------------------------------------------------
# Building configs from plain data


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Builds the (nested) dataclass ``cls`` from plain data, as loaded from YAML, checking every value's type.

    Field types understood: ``int``; ``float`` (ints are accepted and converted); ``bool`` (only real booleans);
    ``str``; ``Literal[...]``; ``X | None`` and other unions (each member is tried in order); ``tuple[X, ...]``,
    fixed ``tuple[X, Y]``, ``list[X]`` and ``Sequence[X]``, all from lists; ``dict[str, X]``; nested dataclasses,
    from mappings; ``Any``. A nested dataclass given as a mapping starts from the field's default, so setting one
    of its keys keeps the others the parent chose. Values that already are the right dataclass are kept as is.

    Args:
      cls: the dataclass type to build.
      data: its fields by name. Absent fields take their defaults.
      path: dotted prefix for error messages, when ``data`` is a part of a larger config.

    Returns:
      The ``cls`` instance.

    Raises:
      ConfigError: an unknown or missing field, a value of the wrong type, or a ``ValueError`` from a
        ``__post_init__`` check, with the path of the class that raised it prefixed.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    return _build(cls, data, path, base=None)


def _build(cls: type[T], data: Any, path: str, base: Any) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping of {cls.__name__} fields, got {_given(data)}")
    hints = _type_hints(cls)
    fields = _init_fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            raise _unknown_field(_join(path, str(key)), key, names)

    kwargs, missing = {}, []
    for f in fields:
        field_path = _join(path, f.name)
        if f.name in data:
            value = data[f.name]
            field_base = None
            if isinstance(value, Mapping) and _dataclass_in(hints[f.name]) is not None:
                field_base = getattr(base, f.name) if base is not None else _field_default(f)
            kwargs[f.name] = _convert(hints[f.name], value, field_path, field_base)
        elif base is not None:
            kwargs[f.name] = getattr(base, f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append((field_path, _type_name(hints[f.name])))
    if len(missing) == 1:
        (field_path, type_name), = missing
        raise ConfigError(f"{field_path}: missing required field, expected {type_name}")
    if missing:
        listed = ", ".join(f"{field_path} ({type_name})" for field_path, type_name in missing)
        raise ConfigError(f"{path or cls.__name__}: missing required fields: {listed}")

    try:
        return cls(**kwargs)
    except ValueError as e:  # A __post_init__ check: say which part of the config it is about.
        message = str(e)
        if path and message.startswith(f"{path}."):  # the check already names its field by the full path
            raise ConfigError(message) from e
        raise ConfigError(f"{path or cls.__name__}: {message}") from e


def _convert(tp: Any, value: Any, path: str, base: Any = None) -> Any:
    """``value`` checked against (and, for containers and dataclasses, converted to) the annotation ``tp``."""
    if tp is Any or tp is object:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(path, tp, value)

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return _convert_union(tp, args, value, path, base)

    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):  # Keeps True from matching Literal[1].
                return choice
        string_choices = [c for c in args if isinstance(c, str)]
        hint = _suggest(value, string_choices) if isinstance(value, str) else ""
        raise _type_error(path, tp, value, hint)

    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected {tp.__name__} (a mapping of its fields), got {_given(value)}")
        return _build(tp, value, path, base if isinstance(base, tp) else None)

    if tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, tp, value)
        if origin is tuple and args and not _is_homogeneous_tuple(args):
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {_type_name(tp)} ({len(args)} items), got {_given(value)}")
            return tuple(_convert(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(args, value)))
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if (tp is list or origin is list) else tuple(items)  # Sequence -> tuple: frozen stays frozen.

    if tp is dict or origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise _type_error(path, tp, value)
        key_type, value_type = args if args else (Any, Any)
        return {_convert(key_type, k, _join(path, str(k))): _convert(value_type, v, _join(path, str(k)))
                for k, v in value.items()}

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, tp, value, " (write true or false)" if isinstance(value, (str, int)) else "")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, tp, value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(path, tp, value)
    raise TypeError(f"{path}: unsupported field annotation {tp!r}")


def _shape(tp: Any) -> str | None:
    """Which kind of YAML node a type is read from, where that is a container."""
    if _is_dataclass_type(tp) or _dict_value_type(tp) is not None:
        return "mapping"
    if tp in (list, tuple) or typing.get_origin(tp) in (list, tuple, collections.abc.Sequence):
        return "list"
    return None


def _convert_union(tp: Any, args: tuple, value: Any, path: str, base: Any) -> Any:
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    errors = []
    for member in members:
        try:
            return _convert(member, value, path, base)
        except ConfigError as e:
            errors.append(e)
    # Where one member alone has the value's shape (the dataclass, for a mapping), its error is the precise one,
    # e.g. a typo deep inside ``optimizer: AdamConfig | str``.
    value_shape = "mapping" if isinstance(value, Mapping) else "list" if isinstance(value, (list, tuple)) else None
    matching = [e for m, e in zip(members, errors) if value_shape is not None and _shape(m) == value_shape]
    if len(matching) == 1:
        raise matching[0]
    raise _type_error(path, tp, value)


# --------------------------------------------------------------------------------------------------------------
# Back to plain data


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _init_fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """A config as plain, YAML-serialisable data: nested dicts, lists (for tuples) and scalars.

    Only ``init`` fields are written (derived fields are recomputed on load), so ``from_dict(type(x), to_dict(x))
    == x``.
    """
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"to_dict expects a dataclass instance, got {obj!r}")
    return _plain(obj)


# --------------------------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Splits ``"a.b.c=value"`` into ``(["a", "b", "c"], value)``.

    The value is read as a YAML scalar or flow collection: ``3``, ``1e-5``, ``true``, ``null``, ``[1, 2]``,
    ``{k: v}``; anything else (``gpt2``, ``"quoted"``) is a string. ``a=`` sets null. Only the first ``=``
    splits, so values may contain ``=``.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"malformed override {text!r}: expected the form --set a.b=value")
    keys = key.split(".")
    if any(not k.strip() or k != k.strip() for k in keys):
        raise ConfigError(f"malformed override {text!r}: empty or padded name in {key!r}; "
                          "expected the form --set a.b=value")
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot read the value {raw!r} as YAML: "
                          f"{getattr(e, 'problem', None) or e}") from e
    return keys, value


def _check_override_path(cls: type, keys: Sequence[str], text: str) -> None:
    """Rejects an override path that names no field of ``cls``, before anything is built."""
    tp: Any = cls
    for i, key in enumerate(keys):
        here = ".".join(keys[: i + 1])
        dataclass_type = _dataclass_in(tp)
        value_type = _dict_value_type(tp)
        if dataclass_type is not None:
            names = [f.name for f in _init_fields(dataclass_type)]
            if key not in names:
                raise _unknown_field(here, key, names)
            tp = _type_hints(dataclass_type)[key]
        elif value_type is not None:
            tp = value_type  # Any key is a valid dict key.
        elif tp is Any:
            return
        else:
            parent = ".".join(keys[:i])
            raise ConfigError(f"{here}: unknown field; {parent} is {_type_name(tp)}, which has no fields "
                              f"(in override {text!r})")


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], cls: type | None = None) -> dict[str, Any]:
    """``data`` with each ``"a.b=value"`` override set, in order; intermediate mappings are created as needed.

    ``data`` is not modified. When ``cls`` is given, every override path must name a field of it, else a
    ``ConfigError`` with a did-you-mean suggestion. Values are type-checked later, by ``from_dict``.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'a.b=value' strings, not one string")
    result = copy.deepcopy(dict(data))
    for text in overrides:
        keys, value = parse_override(text)
        if cls is not None:
            _check_override_path(cls, keys, text)
        node = result
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif isinstance(child, Mapping):
                child = node[key] = dict(child)
            else:
                raise ConfigError(f"override {text!r}: {'.'.join(keys[: i + 1])} holds {_given(child)}, not a mapping")
            node = child
        node[keys[-1]] = value
    return result


# --------------------------------------------------------------------------------------------------------------
# Files


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML file (``{}`` for an empty file), with errors that name the file and line."""
    path = pathlib.Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"config file {what}: {str(path)!r} (working directory: {os.getcwd()})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e}") from e
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of field names to values, got {_given(data)}")
    return data


def save_yaml(path: str | os.PathLike, data: Mapping[str, Any] | Any) -> None:
    """Writes a mapping (or a config dataclass, through ``to_dict``) as block-style YAML that ``load_yaml`` reads
    back unchanged, atomically (a reader never sees a torn file). Creates the parent directory."""
    from ppojax.io.atomic import atomic_write_text  # here: importing ppojax.io imports jax, which configlib avoids

    text = yaml.dump(_plain(data), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    atomic_write_text(path, text)


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    defaults_path: str | os.PathLike | None = None,
) -> T:
    """The validated ``cls`` from, in increasing precedence: class defaults, ``defaults_path``, ``path``, and
    ``overrides`` (``"a.b=value"`` strings). YAML files merge mapping by mapping, so ``path`` need only hold what
    differs from ``defaults_path``."""
    data: dict[str, Any] = {}
    for source in (defaults_path, path):
        if source is not None:
            data = _merge(data, load_yaml(source))
    data = apply_overrides(data, overrides, cls)
    return from_dict(cls, data)


# --------------------------------------------------------------------------------------------------------------
# User modules

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")


def import_modules(names: Sequence[str], *, search_dirs: Sequence[str | os.PathLike] = (),
                   key: str = "imports") -> list[types.ModuleType]:
    """Imports each module of ``names`` (dotted names, in order) and returns them: what they register at import
    (a reward, an advantage estimator, a model family) can then be named in a config.

    Modules are looked up on ``sys.path``, then in ``search_dirs`` (typically the config file's directory and the
    working directory), which are appended to ``sys.path`` for the rest of the process, so that a module's own
    later imports, and ``'module:function'`` specs naming it, resolve the same way.

    Raises:
      ConfigError: one line naming ``key`` and the module, for a malformed name or a module that cannot be
        imported (not found, a syntax error, or any exception raised while it runs), e.g.
        ``imports: module 'mypkg.rewards' could not be imported: ModuleNotFoundError: No module named 'mypkg'``.
    """
    import importlib
    import sys

    if isinstance(names, str):
        raise ConfigError(f"{key}: expected a list of module names, got the string {names!r} (write [{names}])")
    for d in search_dirs:
        d = os.fspath(pathlib.Path(d).resolve())
        if d not in sys.path:
            sys.path.append(d)
    modules = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not _MODULE_NAME.match(name):
            hint = " (a module, not 'module:function')" if isinstance(name, str) and ":" in name else ""
            raise ConfigError(f"{key}[{i}]: expected a module name like 'package.module'{hint}, got {_given(name)}")
        try:
            modules.append(importlib.import_module(name))
        except (Exception, SystemExit) as e:  # whatever the module raises: one line, not its traceback
            lines = str(e).strip().splitlines()
            detail = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
            raise ConfigError(f"{key}: module {name!r} could not be imported: {detail}") from e
    return modules


# --------------------------------------------------------------------------------------------------------------
# Help text


def describe(cls: type) -> str:
    """Help text: one entry per dotted field, ``name: type = default``, then its documentation indented.

    Nested dataclasses are listed field by field under their own entry; defaults are those the enclosing config
    gives them. Entries of a ``dict[str, Dataclass]`` field are listed as ``field.<key>.subfield``.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"describe expects a dataclass type, got {cls!r}")
    lines: list[str] = []
    _describe_into(cls, "", None, lines)
    return "\n".join(lines)


def _describe_into(cls: type, prefix: str, base: Any, lines: list[str]) -> None:
    hints = _type_hints(cls)
    docs = _field_docs(cls)
    for f in _init_fields(cls):
        name = prefix + f.name
        tp = hints[f.name]
        default = getattr(base, f.name) if base is not None else _field_default(f)
        nested = _dataclass_in(tp)
        head = f"{name}: {_type_name(tp)}"
        if default is dataclasses.MISSING:
            head += "  (required)"
        elif not (nested is not None and isinstance(default, nested)):
            head += f" = {_fmt_value(default)}"
        lines.append(head)
        lines.extend("    " + line for line in docs.get(f.name, "").splitlines())
        if nested is not None:
            _describe_into(nested, name + ".", default if isinstance(default, nested) else None, lines)
        else:
            value_type = _dict_value_type(tp)
            if value_type is not None and _is_dataclass_type(value_type):
                _describe_into(value_type, name + ".<key>.", None, lines)
