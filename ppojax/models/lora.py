"""LoRA over one shared, frozen base (Hu et al. 2021, https://arxiv.org/abs/2106.09685), for any model family.

For each adapted projection of the trunk (a kernel ``W [in, out]`` per layer, stacked ``[n_layer, in, out]``)::

    W' = W + (alpha / r) · A B,        A [n_layer, in, r],  B [n_layer, r, out]

``A`` starts as PEFT's kaiming-uniform, ``U(-1/sqrt(in), 1/sqrt(in))``, and ``B`` at zero, so a fresh adapter leaves
the model exactly as it was; the scale ``alpha / r`` is PEFT's ``lora_alpha / r``. Adapters are float32 whatever the
base's storage dtype (they are small and Adam updates them); the merged kernel is cast back to the base's dtype.

Which modules: ``ModelFamily.lora_targets`` names the projections a family lets LoRA adapt (GPT-2: ``c_attn``,
``c_proj``, ``c_fc``, ``c_proj_mlp``; Llama-style: ``q_proj`` .. ``down_proj``). A target is found in the trunk by
name, as the one ``{name: {'kernel': [n_layer, in, out], ...}}`` node of ``params['transformer']``.

Adapters are a named pytree::

    {target: {'lora_a': [n_layer, in, r] f32, 'lora_b': [n_layer, r, out] f32}, ...}

:func:`merge` builds the adapted params inside jit, one batched einsum per target (all layers at once): the merged
kernels are transient values of the forward, the base itself is never copied into the state.

``ppojax.rl.roles.LoraRoles`` is the PPO state's role view (``create_train_state(..., roles=LoraRoles(...))``): the state
holds ONE frozen copy of the base; the optimizer sees only the adapters and the value head::

    frozen  = {'base': base LM params}
    params  = {'actor': adapters,
               'critic': {'adapters': adapters, 'head': {'kernel', 'bias'}}}    (when the estimator needs a critic)
    actor     = merge(base, params['actor'])
    reference = base                                                           (adapters off: the base itself)
    critic    = {'transformer': merge(base, critic adapters)['transformer'], 'head': head}

A LoRA reward model on the same base (``ppojax.rl.rewards.LoraRewardModel``) keeps only its adapters and head in
``state.reward``; the iteration hands it the run's frozen reference at scoring time.

Export: merged weights are ``ppojax.save_pretrained(path, config, state.actor_params)``; :func:`save_adapter` writes
the adapter alone in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) so that
``peft.PeftModel.from_pretrained(transformers_base, path)`` reproduces the adapted model; :func:`load_adapter`
reads such a directory back. The PEFT names come from the family's ``HFConverter.lora_modules``.

Why not Google's ``qwix`` (which has LoRA for Flax): it intercepts the ``dot_general`` calls of a Flax module and
creates the adapter variables inside that module's own ``params`` collection. Here a family is a set of pure
functions over param trees, the trunk's blocks are one ``nn.scan`` over stacked params, and the adapters must live
in a separate trainable tree from the one frozen base (the same mechanism as a frozen reference). Adapting the
kernels at the param level (:func:`merge`) works for every family through the interface, with no change to any
model's code; that is a few lines, so they are written here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ppojax.models.base import Params, family_of, init_params

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "LoraError",
    "LoraSpec",
    "family_targets",
    "init_adapters",
    "load_adapter",
    "merge",
    "save_adapter",
]

LORA_A, LORA_B = "lora_a", "lora_b"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class LoraError(ValueError):
    """A LoRA setting that cannot work with this model (bad rank or targets), or an adapter file that does not fit."""


# ----------------------------------------------------------------------------------------------------------------
# Finding the adapted kernels


def family_targets(config: Any) -> tuple:
    """The projections the config's model family lets LoRA adapt (``ModelFamily.lora_targets``)."""
    family = family_of(config)
    if not family.lora_targets:
        raise LoraError(f"model family {family.name!r} names no LoRA targets (ModelFamily.lora_targets is empty)")
    return tuple(family.lora_targets)


def _find(trunk: Mapping, name: str, prefix: tuple = ()) -> list:
    """Paths (inside the trunk) of every ``{name: {'kernel': ...}}`` node."""
    found = []
    for key, value in trunk.items():
        if not isinstance(value, Mapping):
            continue
        if key == name and "kernel" in value:
            found.append(prefix + (key,))
        else:
            found += _find(value, name, prefix + (key,))
    return found


def _kernel_paths(trunk: Mapping, targets: Sequence[str]) -> dict:
    """``{target: path}`` of each target's stacked kernel in ``trunk``; one error for anything that does not fit."""
    paths, problems = {}, []
    for name in targets:
        found = _find(trunk, name)
        if len(found) != 1:
            where = "no" if not found else f"{len(found)} ({', '.join('/'.join(p) for p in found)})"
            problems.append(f"{name!r} matches {where} 'kernel' nodes of the trunk (expected one)")
            continue
        kernel = _get(trunk, found[0])["kernel"]
        if len(kernel.shape) != 3:
            problems.append(f"{name!r}'s kernel has shape {tuple(kernel.shape)}; LoRA adapts stacked kernels "
                            "[n_layer, in, out]")
            continue
        paths[name] = found[0]
    if problems:
        raise LoraError("LoRA targets do not fit the model's params: " + "; ".join(problems))
    return paths


def _get(tree: Mapping, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Mapping, path: tuple, value) -> dict:
    """A copy of ``tree`` with ``path`` set to ``value``: only the dicts along the path are new; every other node and
    array is shared."""
    new = dict(tree)
    new[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
    return new


# ----------------------------------------------------------------------------------------------------------------
# The spec: rank, alpha, targets


def _as_targets(targets) -> tuple:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise LoraError(f"LoRA targets must be module names (a list, or one comma-separated string), got {targets!r}")
    targets = tuple(t for t in targets if t)
    if not targets:
        raise LoraError("LoRA targets are empty: name at least one projection module")
    duplicated = sorted({t for t in targets if targets.count(t) > 1})
    if duplicated:
        raise LoraError(f"LoRA targets {duplicated} are named more than once")
    return targets


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha and target modules of a set of adapters: ``W' = W + (alpha / rank) · A B``.

    Frozen and hashable, so it can sit in a static setup. ``targets``: names from the family's ``lora_targets``, as a
    tuple or one comma-separated string. The checks that need the model (:meth:`check`) run when adapters are built,
    before anything compiles."""

    rank: int
    """r: the inner dimension of A [in, r] and B [r, out]."""
    alpha: float
    """PEFT's lora_alpha: the update is scaled by alpha / rank."""
    targets: tuple
    """The projection modules to adapt (``ModelFamily.lora_targets`` names)."""

    def __post_init__(self):
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank < 1:
            raise LoraError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.floating))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise LoraError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", _as_targets(self.targets))

    @property
    def scale(self) -> float:
        """``alpha / rank`` (PEFT's ``scaling``; rsLoRA's alpha / sqrt(r) is not used)."""
        return self.alpha / self.rank

    def check(self, config: Any, params: Params) -> dict:
        """Raise one :class:`LoraError` if a target is not one of the family's, does not match exactly one stacked
        kernel of ``params['transformer']``, or is narrower than the rank (``rank > min(in, out)``). Works on
        abstract params (``jax.eval_shape``). Returns ``{target: (n_layer, in, out)}``."""
        valid = family_targets(config)
        unknown = [t for t in self.targets if t not in valid]
        if unknown:
            raise LoraError(f"LoRA targets {unknown} match no projection of the {family_of(config).name} model; "
                            f"valid targets: {', '.join(valid)}")
        if not isinstance(params, Mapping) or "transformer" not in params:
            raise LoraError("LoRA adapts LM params {'transformer': trunk, ...}; got a tree without 'transformer'")
        trunk = params["transformer"]
        shapes = {t: tuple(_get(trunk, p)["kernel"].shape) for t, p in _kernel_paths(trunk, self.targets).items()}
        narrow = {t: s for t, s in shapes.items() if self.rank > min(s[1:])}
        if narrow:
            limit = min(min(s[1:]) for s in shapes.values())
            detail = ", ".join(f"{t} [in={s[1]}, out={s[2]}]" for t, s in narrow.items())
            raise LoraError(f"LoRA rank {self.rank} is larger than min(in, out) of {detail}: a rank-r update of a "
                            f"[in, out] matrix needs r <= min(in, out); use rank <= {limit}")
        return shapes

    def init_adapters(self, config: Any, base_params: Params, key: jax.Array) -> Params:
        """Fresh adapters for ``base_params`` (see :func:`init_adapters`)."""
        shapes = self.check(config, base_params)
        adapters = {}
        for i, name in enumerate(self.targets):
            n_layer, d_in, d_out = shapes[name]
            bound = 1.0 / math.sqrt(d_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, in]
            a = jax.random.uniform(jax.random.fold_in(key, i), (n_layer, d_in, self.rank), jnp.float32,
                                   -bound, bound)
            adapters[name] = {LORA_A: a, LORA_B: jnp.zeros((n_layer, self.rank, d_out), jnp.float32)}
        return adapters

    def merge(self, base_params: Params, adapters: Params) -> Params:
        """``base_params`` with each adapted kernel replaced by ``W + (alpha / rank) · A B`` (see :func:`merge`)."""
        return merge(base_params, adapters, self.alpha, self.rank)


def init_adapters(config: Any, base_params: Params, *, rank: int, alpha: float, targets, key: jax.Array) -> Params:
    """Adapters ``{target: {'lora_a': A, 'lora_b': B}}`` for ``base_params``: A ``[n_layer, in, r]`` drawn from
    ``U(-1/sqrt(in), 1/sqrt(in))`` (PEFT's kaiming-uniform for ``lora_A``), B ``[n_layer, r, out]`` zero, so
    ``W' = W + (alpha / r) · A B = W`` at the start. One clear error for bad targets or rank."""
    return LoraSpec(rank, alpha, targets).init_adapters(config, base_params, key)


def merge(base_params: Params, adapters: Params, alpha: float, rank: int) -> Params:
    """The adapted params: for each target kernel ``W [n_layer, in, out]``

        W' = W + (alpha / rank) · A B        (A [n_layer, in, r], B [n_layer, r, out]; one batched einsum)

    computed in float32 and cast to ``W``'s dtype. Every other leaf is ``base_params``'s own array. Pure and
    jittable; gradients flow to A and B. Zero B gives ``W' == W`` exactly."""
    trunk = base_params["transformer"]
    paths = _kernel_paths(trunk, tuple(adapters))
    scale = alpha / rank
    for name, path in paths.items():
        w = _get(trunk, path)["kernel"]
        a, b = adapters[name][LORA_A], adapters[name][LORA_B]
        n_layer, d_in, d_out = w.shape
        if a.shape != (n_layer, d_in, rank) or b.shape != (n_layer, rank, d_out):
            raise LoraError(f"adapter {name!r}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do not fit the "
                            f"kernel {tuple(w.shape)} at rank {rank} (expected {(n_layer, d_in, rank)} and "
                            f"{(n_layer, rank, d_out)})")
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))  # [n_layer, in, out]
        merged = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
        trunk = _set(trunk, path + ("kernel",), merged)
    return {**base_params, "transformer": trunk}


# ----------------------------------------------------------------------------------------------------------------
# PEFT's adapter format


def _peft_modules(config: Any, targets: Sequence[str]) -> dict:
    """``{target: transformers module path with '{layer}'}`` from the family's converter."""
    family = family_of(config)
    modules = dict(getattr(family.hf, "lora_modules", ()) or ()) if family.hf is not None else {}
    missing = [t for t in targets if t not in modules]
    if missing:
        raise LoraError(f"model family {family.name!r} does not name the transformers modules of LoRA targets "
                        f"{missing} (HFConverter.lora_modules), so they cannot be written in PEFT's format")
    return {t: modules[t] for t in targets}


def _peft_name(template: str, layer: int, matrix: str) -> str:
    return f"{_PEFT_PREFIX}{template.format(layer=layer)}.{matrix}.weight"


def save_adapter(path: str | os.PathLike, config: Any, adapters: Params, spec: LoraSpec, *,
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Write ``adapters`` as a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Tensor names are PEFT's, e.g. ``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight [r, in]`` and
    ``...lora_B.weight [out, r]`` for GPT-2 (``lora_A.weight = A[layer]^T``, ``lora_B.weight = B[layer]^T``: PEFT
    computes ``x A B`` as ``lora_B(lora_A(x))``), ``base_model.model.model.layers.0.self_attn.q_proj...`` for Llama.
    ``peft.PeftModel.from_pretrained(transformers_base_model, path)`` then gives ppojax's adapted logits. Written
    atomically (a failed save leaves nothing behind; an existing directory is replaced once the new one is whole).
    """
    from safetensors.numpy import save_file

    from ppojax.io.atomic import atomic_directory

    spec = LoraSpec(spec.rank, spec.alpha, spec.targets)
    if set(adapters) != set(spec.targets):
        raise LoraError(f"save_adapter: the adapters are for {sorted(adapters)}, the spec names {list(spec.targets)}")
    family = family_of(config)
    modules = _peft_modules(config, spec.targets)
    tensors = {}
    for name, template in modules.items():
        a = np.asarray(jax.device_get(adapters[name][LORA_A]), np.float32)  # [n_layer, in, r]
        b = np.asarray(jax.device_get(adapters[name][LORA_B]), np.float32)  # [n_layer, r, out]
        if a.ndim != 3 or a.shape[2] != spec.rank or b.shape[:2] != (a.shape[0], spec.rank):
            raise LoraError(f"save_adapter: adapter {name!r} has lora_a {a.shape} and lora_b {b.shape}, not rank "
                            f"{spec.rank} adapters [n_layer, in, r] / [n_layer, r, out]")
        for layer in range(a.shape[0]):
            tensors[_peft_name(template, layer, "lora_A")] = np.ascontiguousarray(a[layer].T)  # [r, in]
            tensors[_peft_name(template, layer, "lora_B")] = np.ascontiguousarray(b[layer].T)  # [out, r]
    # PEFT matches a listed target by the end of a module's name: "attn.c_proj" adapts attention's c_proj only,
    # where a bare "c_proj" would also adapt the MLP's.
    target_modules = sorted({template.split("{layer}.", 1)[-1] for template in modules.values()})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "fan_in_fan_out": bool(getattr(family.hf, "fan_in_fan_out", False)),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    with atomic_directory(path) as tmp:
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    return Path(path).expanduser()


def load_adapter(path: str | os.PathLike, config: Any) -> tuple[LoraSpec, Params]:
    """``(spec, adapters)`` from a PEFT LoRA adapter directory (written by :func:`save_adapter` or by PEFT) for a
    model of ``config``. The targets are read from the tensors present; plain LoRA only (no rsLoRA, DoRA, per-module
    ranks, biases or extra trained modules): anything else fails with one message naming it."""
    from safetensors.numpy import load_file

    path = Path(path).expanduser()
    cfg_file, weights = path / ADAPTER_CONFIG_FILE, path / ADAPTER_WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.exists():
            raise LoraError(f"{path} is not a PEFT adapter directory: {f.name} is missing")
    try:
        peft = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LoraError(f"{cfg_file}: not valid JSON ({e.msg})") from None
    if not isinstance(peft, dict) or peft.get("peft_type") != "LORA":
        raise LoraError(f"{cfg_file}: peft_type is {peft.get('peft_type') if isinstance(peft, dict) else None!r}; "
                        "ppojax loads LORA adapters")
    unsupported = {"use_rslora": False, "use_dora": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
                   "modules_to_save": None, "layers_to_transform": None}
    bad = [f"{k}={peft[k]!r}" for k, ok in unsupported.items() if peft.get(k, ok) not in (ok, None, [], {})]
    if bad:
        raise LoraError(f"{cfg_file}: {', '.join(bad)} is not supported (ppojax loads plain LoRA adapters)")
    rank, alpha = peft.get("r"), peft.get("lora_alpha")
    tensors = dict(load_file(str(weights)))
    family = family_of(config)
    trunk = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))["transformer"]
    modules = dict(getattr(family.hf, "lora_modules", ()) or ())
    adapters = {}
    for name, template in modules.items():
        n_layer = _get(trunk, _kernel_paths(trunk, (name,))[name])["kernel"].shape[0]
        names = [_peft_name(template, i, m) for i in range(n_layer) for m in ("lora_A", "lora_B")]
        present = [n in tensors for n in names]
        if not any(present):
            continue
        if not all(present):
            raise LoraError(f"{weights}: the adapter of {name!r} ({template}) lacks "
                            f"{[n for n, p in zip(names, present) if not p][:4]}")
        a = np.stack([tensors.pop(_peft_name(template, i, "lora_A")).T for i in range(n_layer)])  # [n_layer, in, r]
        b = np.stack([tensors.pop(_peft_name(template, i, "lora_B")).T for i in range(n_layer)])  # [n_layer, r, out]
        adapters[name] = {LORA_A: jnp.asarray(a, jnp.float32), LORA_B: jnp.asarray(b, jnp.float32)}
    if tensors:
        raise LoraError(f"{weights}: {len(tensors)} tensors have no place in a {family.name} LoRA adapter, e.g. "
                        f"{sorted(tensors)[:4]}")
    if not adapters:
        raise LoraError(f"{weights}: holds no LoRA tensors")
    spec = LoraSpec(rank, alpha, tuple(adapters))
    shapes = spec.check(config, {"transformer": trunk})
    for name, (n_layer, d_in, d_out) in shapes.items():
        a, b = adapters[name][LORA_A], adapters[name][LORA_B]
        if a.shape != (n_layer, d_in, spec.rank) or b.shape != (n_layer, spec.rank, d_out):
            raise LoraError(f"{weights}: {name!r} has lora_A {a.shape[1:][::-1]} and lora_B {b.shape[1:][::-1]} per "
                            f"layer, expected [r={spec.rank}, in={d_in}] and [out={d_out}, r={spec.rank}]")
    return spec, adapters
