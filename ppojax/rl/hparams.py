"""Hyperparameters as arrays: every float that changes neither a shape nor the code lives in ``state.hparams``.

``HParams`` holds them as float32 scalars: the learning rate and Adam's constants, clip ranges, loss coefficients and
term weights, gamma and lambda, the sampling temperature and top-p, penalties, the KL controller's target and horizon,
and (``HParams.declared``) every hyperparameter the run's advantage estimator or policy loss declared at registration
(``ppo.hparams.<name>``). Changing one between iterations (:func:`set_hparams`) recompiles nothing, and a sweep stacks
them on a run axis. :func:`static_view` replaces each of them in the configs by an :class:`InState` marker, so configs
that differ only in these values give equal static views (one setup, one compilation).
"""

from __future__ import annotations

import copy
import difflib
import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Optional

import flax.struct
import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from ppojax.rl.config import OptimizerConfig, PPOConfig
    from ppojax.rl.state import TrainState


@flax.struct.dataclass
class HParams:
    """Every float hyperparameter that changes neither a shape nor the code, as float32 scalar arrays.

    The static setup decides whether an optional one is used at all (``ppo.dual_clip: null`` compiles no dual clip;
    ``ppo.top_p: 1`` no nucleus filter; ``optimizer.max_grad_norm: null`` no clipping); its array here is then
    unused. ``term_weights`` holds the weights of the config's ``ppo.extra_loss_terms`` by name; ``declared`` the
    hyperparameters the run's advantage estimator and policy loss declared at registration (``ppo.hparams``), by name.
    """

    learning_rate: jax.Array
    b1: jax.Array
    b2: jax.Array
    eps: jax.Array
    weight_decay: jax.Array
    max_grad_norm: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    gamma: jax.Array
    lam: jax.Array
    clip_eps: jax.Array
    clip_eps_high: jax.Array
    dual_clip: jax.Array
    value_clip_eps: jax.Array
    vf_coef: jax.Array
    entropy_coef: jax.Array
    kl_loss_coef: jax.Array
    missing_truncate_penalty: jax.Array
    missing_eos_penalty: jax.Array
    kl_target: jax.Array
    kl_horizon: jax.Array
    term_weights: dict
    declared: dict


# Config path -> HParams field. The initial KL coefficient is an array too, but of the KL controller's state.
HPARAM_PATHS: dict[str, str] = {
    "optimizer.learning_rate": "learning_rate",
    "optimizer.b1": "b1",
    "optimizer.b2": "b2",
    "optimizer.eps": "eps",
    "optimizer.weight_decay": "weight_decay",
    "optimizer.max_grad_norm": "max_grad_norm",
    "ppo.temperature": "temperature",
    "ppo.top_p": "top_p",
    "ppo.gamma": "gamma",
    "ppo.lam": "lam",
    "ppo.clip_eps": "clip_eps",
    "ppo.clip_eps_high": "clip_eps_high",
    "ppo.dual_clip": "dual_clip",
    "ppo.value_clip_eps": "value_clip_eps",
    "ppo.vf_coef": "vf_coef",
    "ppo.entropy_coef": "entropy_coef",
    "ppo.kl_loss_coef": "kl_loss_coef",
    "ppo.missing_truncate_penalty": "missing_truncate_penalty",
    "ppo.missing_eos_penalty": "missing_eos_penalty",
    "ppo.kl.target": "kl_target",
    "ppo.kl.horizon": "kl_horizon",
}
ARRAY_CONFIG_PATHS = (*HPARAM_PATHS, "ppo.kl.init_coef")
"""The built-in config fields that live in the state as arrays: runs that differ only in these share one program
(:func:`is_array_path` adds the loss terms' weights and the declared ``ppo.hparams.<name>``)."""


def is_array_path(path: str) -> bool:
    """Whether the config field at ``path`` lives in the state as an array, so that runs differing only there share
    one program: a field of :data:`ARRAY_CONFIG_PATHS`, a user loss term's ``ppo.extra_loss_terms.<name>.weight``, or
    a declared hyperparameter ``ppo.hparams.<name>``."""
    return (path in ARRAY_CONFIG_PATHS or path.startswith("ppo.hparams.")
            or (path.startswith("ppo.extra_loss_terms.") and path.endswith(".weight")))


# Hyperparameters declared at registration (``register_estimator(..., hparams=...)``, ``register_policy_loss``):
# name -> (default, who declared it). Names are global: ``ppo.hparams.<name>`` means one thing in every run.
_DECLARED: dict[str, tuple[float, str]] = {}


def declare_hparams(owner: str, hparams: Optional[Mapping[str, float]]) -> dict[str, float]:
    """Check and record the array hyperparameters a registration declares, ``{name: default}``; returns them as
    floats. ``owner`` names the registration in messages (``"advantage estimator 'gae2'"``).

    A name is an identifier, is not a built-in :class:`HParams` field, and has one default: declaring it again with
    another default (from another registration) is a ``ValueError``; the same owner may re-declare (``replace=True``).
    """
    if hparams is None:
        return {}
    if not isinstance(hparams, Mapping):
        raise TypeError(f"{owner}: hparams must be a mapping {{name: default}}, got {type(hparams).__name__}")
    builtin = set(HParams.__dataclass_fields__)
    out = {}
    for name, default in hparams.items():
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"{owner}: hyperparameter name {name!r} must be an identifier")
        if name in builtin:
            raise ValueError(f"{owner}: hyperparameter {name!r} would shadow the built-in HParams field {name!r}; "
                             "choose another name")
        if isinstance(default, bool) or not isinstance(default, numbers.Real) or not math.isfinite(default):
            raise ValueError(f"{owner}: hyperparameter {name!r} needs a finite number as its default, got {default!r}")
        known = _DECLARED.get(name)
        if known is not None and known[1] != owner and known[0] != float(default):
            raise ValueError(f"{owner} declares hyperparameter {name!r} = {float(default)!r}, but {known[1]} declared "
                             f"it = {known[0]!r}: names are global (ppo.hparams.{name}), so use another name or the "
                             "same default")
        out[name] = float(default)
    for name, default in out.items():
        if name not in _DECLARED or _DECLARED[name][1] == owner:
            _DECLARED[name] = (default, owner)
    return out

# Optional fields whose None (or, for top_p, 1.0) switches code off: the presence is static, the value an array.
_SWITCHES = {"optimizer.max_grad_norm": None, "ppo.clip_eps_high": None, "ppo.dual_clip": None,
             "ppo.missing_truncate_penalty": None, "ppo.missing_eos_penalty": None, "ppo.top_p": 1.0}


def _f32(x) -> jax.Array:
    return jnp.asarray(0.0 if x is None else x, jnp.float32)


def _get_path(cfgs: dict, path: str):
    obj = cfgs
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def hparams_from_config(ppo: "PPOConfig", optimizer: "OptimizerConfig") -> HParams:
    """The state's hyperparameter arrays for these configs (an optional one that is off is stored as 0)."""
    cfgs = {"ppo": ppo, "optimizer": optimizer}
    values = {field: _f32(_get_path(cfgs, path)) for path, field in HPARAM_PATHS.items()}
    if ppo.clip_eps_high is None:
        values["clip_eps_high"] = _f32(ppo.clip_eps)
    return HParams(**values, term_weights={t.name: _f32(t.weight) for t in ppo.extra_loss_terms},
                   declared={name: _f32(value) for name, value in ppo.declared_hparams.items()})


class InState:
    """Marks, in the static setup, a config value that lives in ``state.hparams``: reading it as a number raises,
    so static code never uses a value that a sweep or ``set_hparams`` changes."""

    def __init__(self, path: str):
        self.path = path

    def __repr__(self) -> str:
        return f"<in state.hparams: {self.path}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, InState) and other.path == self.path

    def __hash__(self) -> int:
        return hash(("InState", self.path))

    def _refuse(self, *_):
        raise TypeError(f"{self.path} is an array hyperparameter: read it from state.hparams, not from the setup")

    __float__ = __int__ = __bool__ = __lt__ = __le__ = __gt__ = __ge__ = __neg__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse


def _replace_static(obj, **fields):
    """A copy of a frozen config dataclass with fields set, skipping its validation (the values are markers)."""
    new = copy.copy(obj)
    for k, v in fields.items():
        object.__setattr__(new, k, v)
    return new


def static_view(ppo: "PPOConfig", optimizer: "OptimizerConfig"):
    """The configs with every array field replaced by an :class:`InState` marker (or left as the None / 1.0 that
    switches it off): equal for runs that differ only in array hyperparameters."""
    def mark(cfg, prefix, names):
        out = {}
        for name in names:
            path = f"{prefix}.{name}"
            if path in _SWITCHES and getattr(cfg, name) == _SWITCHES[path]:
                continue
            out[name] = InState(path)
        return out

    fields = lambda prefix: [p.split(".", 1)[1] for p in ARRAY_CONFIG_PATHS
                             if p.startswith(prefix + ".") and p.count(".") == 1]
    kl = _replace_static(ppo.kl, init_coef=InState("ppo.kl.init_coef"), target=InState("ppo.kl.target"),
                         horizon=InState("ppo.kl.horizon"))
    terms = tuple(_replace_static(t, weight=InState(f"ppo.extra_loss_terms.{t.name}.weight"))
                  for t in ppo.extra_loss_terms)
    # Every declared name is marked, set in the config or not: runs differing only in these values share a setup.
    declared = {name: InState(f"ppo.hparams.{name}") for name in ppo.declared_hparams}
    ppo_static = _replace_static(ppo, kl=kl, extra_loss_terms=terms, hparams=declared,
                                 **mark(ppo, "ppo", fields("ppo")))
    opt_static = _replace_static(optimizer, **mark(optimizer, "optimizer", fields("optimizer")))
    return ppo_static, opt_static



def _hparam_field(name: str, declared: Mapping) -> str:
    if name in HPARAM_PATHS:
        return HPARAM_PATHS[name]
    if name in HParams.__dataclass_fields__ and name not in ("term_weights", "declared"):
        return name
    choices = (list(HPARAM_PATHS) + [f for f in HParams.__dataclass_fields__ if f not in ("term_weights", "declared")]
               + [*declared, *(f"ppo.hparams.{n}" for n in declared)])
    close = difflib.get_close_matches(name, choices, n=1)
    raise KeyError(f"{name!r} is not an array hyperparameter{f'; did you mean {close[0]!r}?' if close else ''} "
                   f"(see ppojax.rl.hparams.HPARAM_PATHS)")


def set_hparams(state: TrainState, **values) -> TrainState:
    """The state with hyperparameters changed; nothing recompiles. Keys are ``HParams`` field names
    (``clip_eps=0.3``) or config paths through a dict (``**{"ppo.clip_eps": 0.3}``); ``term_weights={"name": w}``
    sets user loss-term weights; a hyperparameter declared by the run's estimator or policy loss is set by its name
    (``lam_critic=0.8``) or path (``**{"ppo.hparams.lam_critic": 0.8}``). An optional hyperparameter that the setup switched off (``ppo.dual_clip: null``...)
    cannot be switched on here: that changes the program."""
    changes, weights, declared = {}, dict(state.hparams.term_weights), dict(state.hparams.declared)
    for name, value in values.items():
        if name == "term_weights":
            unknown = set(value) - set(weights)
            if unknown:
                raise KeyError(f"no loss terms {sorted(unknown)} in this run (terms: {sorted(weights)})")
            weights.update({k: _f32(v) for k, v in value.items()})
            continue
        short = name.removeprefix("ppo.hparams.")
        if short in declared:
            declared[short] = jnp.asarray(value, jnp.float32).reshape(declared[short].shape)
            continue
        if name != short:
            close = difflib.get_close_matches(short, list(declared), n=1)
            raise KeyError(f"{name!r}: this run's estimator and policy loss declare no hyperparameter {short!r}"
                           f"{f'; did you mean {close[0]!r}?' if close else ''} (declared: {sorted(declared)})")
        field = _hparam_field(name, declared)
        path = next(p for p, f in HPARAM_PATHS.items() if f == field)
        if path in _SWITCHES:
            section, attr = path.split(".")
            static = getattr(getattr(state.setup, section), attr)
            if not isinstance(static, InState):
                raise ValueError(f"{path} is off in this run's setup ({static!r}); switching it on changes the "
                                 "compiled program: set it in the config instead")
        old = getattr(state.hparams, field)
        changes[field] = jnp.asarray(value, jnp.float32).reshape(old.shape)
    return state.replace(hparams=state.hparams.replace(**changes, term_weights=weights, declared=declared))
