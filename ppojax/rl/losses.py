"""PPO loss terms as pure functions, and their composition into a total loss.

Every term has the signature ``term(inputs: LossInputs, **hyperparameters) -> (loss, metrics)``: ``loss`` is a
scalar to *minimise*, ``metrics`` a flat ``dict[str, scalar]``. Masked means are sums over real tokens divided by
``inputs.n_tokens``, so with a global token count the per-minibatch or per-device losses add up exactly.

A total loss is a plain weighted sum of terms, built by :func:`combine`::

    total = sum(term.weight * term.fn(inputs, **term.kwargs)[0] for term in terms)

Adding a term is writing one function. In Python::

    def length_penalty(inputs, *, scale=1.0):
        n = inputs.mask.sum(axis=-1)                      # [batch] response lengths
        loss = scale * n.mean()
        return loss, {"length": n.mean()}

    loss_fn = combine([
        LossTerm("policy", ppo_clip_loss, 1.0, {"clip_eps": 0.2}),
        LossTerm("value", value_loss, 0.1, {"clip_eps": 0.2}),
        LossTerm("length", length_penalty, 0.01, {"scale": 2.0}),
    ])
    total, metrics = loss_fn(inputs)  # metrics: policy_loss, ..., length, loss/policy, ..., loss/total

or from a config, naming the function as ``"my_pkg.my_terms:length_penalty"`` (built-in terms may be named bare,
``"ppo_clip_loss"``)::

    LossTerm("length", "my_pkg.my_terms:length_penalty", 0.01, {"scale": 2.0})

A term needing an array that :class:`LossInputs` lacks reads it from ``inputs.extra[name]``, which the caller fills.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp

from ppojax.registry import resolve_callable
from ppojax.rl.hparams import declare_hparams
from ppojax.rl.stats import masked_var

__all__ = [
    "LossInputs",
    "LossTerm",
    "TermFn",
    "combine",
    "resolve_term",
    "ppo_clip_loss",
    "value_loss",
    "entropy_loss",
    "kl_loss",
    "kl_estimate",
    "explained_variance",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "aggregate",
    "gspo_loss",
    "get_policy_loss",
    "policy_loss_hparams",
    "policy_losses",
    "register_policy_loss",
]

Metrics = dict[str, jax.Array]
TermFn = Callable[..., tuple[jax.Array, Metrics]]


@flax.struct.dataclass(kw_only=True)
class LossInputs:
    """Everything a loss term may read. Arrays are ``[batch, time]`` over response tokens unless noted.

    Fields a trainer does not compute may stay ``None``; a term that needs one fails loudly at trace time.
    """

    mask: jax.Array
    """Float, 1.0 on real response tokens, 0.0 on padding."""
    n_tokens: jax.Array
    """Scalar float: the denominator of every masked mean. ``mask.sum()`` by default (see :meth:`create`); the
    trainer may pass the token count of the whole batch so minibatch and device averages stay exact."""
    n_seqs: jax.Array | None = None
    """Scalar float: the sequence count the sequence-mean aggregations divide by (``batch`` by default; the
    trainer passes the global minibatch's, like ``n_tokens``)."""
    aggregation: str = dataclasses.field(default="token-mean", metadata={"pytree_node": False})
    """How the policy loss reduces its per-token values (:data:`LOSS_AGGREGATIONS`); metrics are token means."""
    response_length: int | None = dataclasses.field(default=None, metadata={"pytree_node": False})
    """The T that ``seq-mean-token-sum-norm`` divides by: the full response budget. None: ``mask.shape[-1]``. The
    trainer passes it when it runs a minibatch at a trimmed width (``ppo.length_buckets``)."""
    logprobs: jax.Array | None = None
    """Log-probabilities of the taken tokens under the current policy."""
    old_logprobs: jax.Array | None = None
    """Log-probabilities of the taken tokens under the rollout (behaviour) policy."""
    ref_logprobs: jax.Array | None = None
    """Log-probabilities of the taken tokens under the frozen reference policy."""
    entropy: jax.Array | None = None
    """Per-token entropy of the current policy's next-token distribution."""
    values: jax.Array | None = None
    """Current critic values."""
    old_values: jax.Array | None = None
    """Critic values at rollout time (the centre of value clipping)."""
    advantages: jax.Array | None = None
    """Advantages (whitened or not, as the trainer decides)."""
    returns: jax.Array | None = None
    """Value targets."""
    tokens: jax.Array | None = None
    """int32 response tokens."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Further named arrays for user terms; part of the pytree."""

    @classmethod
    def create(cls, *, mask: jax.Array, n_tokens: jax.Array | float | None = None, **fields) -> LossInputs:
        """Builds inputs with ``mask`` cast to float32 and ``n_tokens`` defaulting to ``mask.sum()``."""
        mask = jnp.asarray(mask, jnp.float32)
        if n_tokens is None:
            n_tokens = mask.sum()
        n_seqs = fields.pop("n_seqs", None)
        if n_seqs is None:
            n_seqs = mask.shape[0]
        return cls(mask=mask, n_tokens=jnp.asarray(n_tokens, jnp.float32), n_seqs=jnp.asarray(n_seqs, jnp.float32),
                   **fields)


def _require(inputs: LossInputs, *names: str) -> list[jax.Array]:
    """Fetches fields, checking presence and ``[batch, time]`` shapes equal to the mask's."""
    arrays = []
    for name in names:
        x = getattr(inputs, name)
        if x is None:
            raise ValueError(f"this loss term needs LossInputs.{name}, which is None")
        arrays.append(x)
    chex.assert_rank([inputs.mask, *arrays], 2)
    chex.assert_equal_shape([inputs.mask, *arrays])
    chex.assert_rank(inputs.n_tokens, 0)
    return arrays


def _mean(x: jax.Array, inputs: LossInputs) -> jax.Array:
    """Sum over real tokens divided by ``inputs.n_tokens``; padding values never leak, even inf or nan."""
    mask = inputs.mask
    return jnp.sum(jnp.where(mask > 0, x * mask, 0.0)) / inputs.n_tokens


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _aggregate(x: jax.Array, mask: jax.Array, mode: str, n_tokens, n_seqs, length: int | None = None) -> jax.Array:
    """A sum over this shard's rows divided by a global count, so shards and micro-batches add up exactly."""
    real = mask > 0
    x = jnp.where(real, x * mask, 0.0)
    if mode == "token-mean":
        return jnp.sum(x) / n_tokens
    if mode == "seq-mean-token-mean":
        per_seq = jnp.sum(x, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        return jnp.sum(per_seq) / n_seqs
    if mode == "seq-mean-token-sum":
        return jnp.sum(x) / n_seqs
    if mode == "seq-mean-token-sum-norm":
        return jnp.sum(x) / (n_seqs * (x.shape[-1] if length is None else length))
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str = "token-mean") -> jax.Array:
    r"""Reduce a per-token loss ``[B, T]`` to a scalar (verl's ``agg_loss``; Tunix ships the same set)::

        token-mean               sum(x m) / sum(m)
        seq-mean-token-mean      (1/B) sum_b [ sum_t x m / sum_t m ]
        seq-mean-token-sum       (1/B) sum_b sum_t x m
        seq-mean-token-sum-norm  sum(x m) / (B T)                      (Dr. GRPO: no length bias)

    ``mask`` is 1 on real tokens; padding values never leak (even inf or nan). A row with no real token counts as a
    sequence with mean 0.
    """
    chex.assert_rank([per_token, mask], 2)
    chex.assert_equal_shape([per_token, mask])
    mask = jnp.asarray(mask, jnp.float32)
    n_tokens = jnp.maximum(mask.sum(), 1.0)
    return _aggregate(jnp.asarray(per_token, jnp.float32), mask, mode, n_tokens, jnp.float32(mask.shape[0]))


def _agg(x: jax.Array, inputs: LossInputs) -> jax.Array:
    """``inputs.aggregation`` of ``x`` with the inputs' (global) token and sequence counts."""
    return _aggregate(x, inputs.mask, inputs.aggregation, inputs.n_tokens, inputs.n_seqs, inputs.response_length)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def ppo_clip_loss(
    inputs: LossInputs, *, clip_eps: float = 0.2, dual_clip: float | None = None, clip_eps_high: float | None = None
) -> tuple[jax.Array, Metrics]:
    r"""Clipped surrogate policy loss (Schulman et al. 2017, arXiv:1707.06347), optionally dual-clipped and with
    clip-higher.

    With ``ratio = exp(logp - logp_old)`` and advantage ``A``, per token::

        l = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))   eps_high = eps unless clip_eps_high
                                                                       (DAPO, Yu et al. 2025: 0.28)
        l = min(l, -c * A)      where A < 0, if dual_clip = c > 1   (Ye et al. 2020, arXiv:1912.09729)

    The loss reduces ``l`` by ``inputs.aggregation`` (token mean by default). Metrics (token means): ``policy_loss``,
    ``clipfrac`` (share of tokens where the clipped branch is taken), ``approx_kl = 0.5 * mean((logp -
    logp_old)^2)`` (as TRL), ``ratio_mean`` and ``ratio_max`` (max over this shard's real tokens; 0 if none).
    Hyperparameters may be Python numbers or (traced) arrays from the train state.
    """
    logp, old_logp, _ = _require(inputs, "logprobs", "old_logprobs", "advantages")
    # Zero the log-ratio at padding before exp, so garbage there gives neither inf nor nan gradients.
    log_ratio = jnp.where(inputs.mask > 0, logp - old_logp, 0.0)
    return _clipped_surrogate(inputs, jnp.exp(log_ratio), log_ratio, clip_eps, clip_eps_high, dual_clip)


def _clipped_surrogate(inputs: LossInputs, ratio, log_ratio, clip_eps, clip_eps_high, dual_clip):
    """``max(-A r, -A clip(r, 1 - eps, 1 + eps_high))`` (dual-clipped for ``A < 0``), reduced by the inputs'
    aggregation, and the policy metrics: the one surrogate behind every ratio (token or sequence level)."""
    if _is_number(dual_clip) and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip!r}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    real = inputs.mask > 0
    adv = jnp.where(real, inputs.advantages, 0.0)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, -dual_clip * adv), per_token)
    loss = _agg(per_token, inputs)
    return loss, {
        "policy_loss": loss,
        "clipfrac": _mean((clipped > unclipped).astype(jnp.float32), inputs),
        "approx_kl": 0.5 * _mean(jnp.square(log_ratio), inputs),
        "ratio_mean": _mean(ratio, inputs),
        "ratio_max": jnp.max(jnp.where(real, ratio, 0.0)),
    }


def gspo_loss(
    inputs: LossInputs, *, clip_eps: float = 0.2, dual_clip: float | None = None, clip_eps_high: float | None = None
) -> tuple[jax.Array, Metrics]:
    r"""GSPO's sequence-level clipped surrogate (Zheng et al. 2025, arXiv:2507.18071).

    Per sequence ``i`` with ``|y_i|`` real tokens, the importance ratio is the geometric mean of the token ratios::

        s_i = exp( (1/|y_i|) sum_t (logp_it - logp_old_it) )
        l_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps, 1 + eps_high))

    written on every token of the sequence as ``s_it = sg(s_i) * exp(logp_it - sg(logp_it))`` (same value; the
    gradient is the paper's ``s_i / |y_i| * grad sum_t logp_it``), then reduced by ``inputs.aggregation`` (verl
    recommends ``seq-mean-token-mean``, which weighs each sequence once). ``A_i`` is the advantage on the sequence's
    tokens (group estimators give every token the same one). ``dual_clip`` as in :func:`ppo_clip_loss`.
    Metrics: ``policy_loss``, ``clipfrac`` and ``ratio_mean``/``ratio_max`` of the sequence ratios (token means),
    ``approx_kl`` as in :func:`ppo_clip_loss`.
    """
    logp, old_logp, _ = _require(inputs, "logprobs", "old_logprobs", "advantages")
    real = inputs.mask > 0
    log_ratio = jnp.where(real, logp - old_logp, 0.0)  # [B, T]
    lengths = jnp.maximum(jnp.sum(real, axis=-1), 1).astype(jnp.float32)
    seq_log_ratio = jnp.sum(log_ratio, axis=-1) / lengths  # [B]
    token_ratio = jnp.exp(jnp.where(real, logp - jax.lax.stop_gradient(logp), 0.0))  # 1, with logp's gradient
    ratio = jax.lax.stop_gradient(jnp.exp(seq_log_ratio))[:, None] * token_ratio  # [B, T]: s_i on each token
    return _clipped_surrogate(inputs, ratio, log_ratio, clip_eps, clip_eps_high, dual_clip)


_POLICY_LOSSES: dict[str, TermFn] = {"ppo": ppo_clip_loss, "gspo": gspo_loss}
_POLICY_LOSS_HPARAMS: dict[str, dict[str, float]] = {}


def register_policy_loss(name: str, fn: TermFn | None = None, *, replace: bool = False,
                         hparams: Mapping[str, float] | None = None):
    """Register ``fn(inputs, *, clip_eps, clip_eps_high, dual_clip) -> (loss, metrics)`` as the policy loss
    ``name`` (``ppo.policy_loss: name``); usable as a decorator. Its metrics must include ``policy_loss``.

    ``hparams={"beta": 0.1}`` declares float hyperparameters of its own, with their defaults: each becomes an array
    of the train state (``ppo.hparams.beta``; changeable without recompiling) passed to ``fn`` as a keyword
    argument (``fn(inputs, *, clip_eps, ..., beta)``)."""

    def register(f):
        if not callable(f):
            raise TypeError(f"policy loss {name!r} must be callable")
        if name in _POLICY_LOSSES and not replace and _POLICY_LOSSES[name] is not f:
            raise ValueError(f"a policy loss named {name!r} is already registered (pass replace=True)")
        declared = declare_hparams(f"policy loss {name!r}", hparams)
        _POLICY_LOSSES[name] = f
        _POLICY_LOSS_HPARAMS[name] = declared
        f.declared_hparams = declared  # found again when a config names it as 'package.module:function'
        return f

    return register if fn is None else register(fn)


def policy_losses() -> dict[str, TermFn]:
    """The registered policy losses by name."""
    return dict(_POLICY_LOSSES)


def get_policy_loss(spec: str) -> TermFn:
    """A policy loss by registered name or ``'package.module:function'``."""
    if isinstance(spec, str) and ":" not in spec:
        if spec not in _POLICY_LOSSES:
            import difflib

            close = difflib.get_close_matches(spec, list(_POLICY_LOSSES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown policy loss {spec!r} (registered: {', '.join(sorted(_POLICY_LOSSES))}){hint}")
        return _POLICY_LOSSES[spec]
    return resolve_callable(spec, what="policy loss", key="ppo.policy_loss")


def policy_loss_hparams(spec: str) -> dict[str, float]:
    """The hyperparameters the policy loss ``spec`` (a registered name or ``'package.module:function'``) declared at
    registration, ``{name: default}``; empty for a plain function."""
    fn = get_policy_loss(spec)
    if isinstance(spec, str) and ":" not in spec:
        return dict(_POLICY_LOSS_HPARAMS.get(spec, {}))
    return dict(getattr(fn, "declared_hparams", {}))


def value_loss(inputs: LossInputs, *, clip_eps: float = 0.2) -> tuple[jax.Array, Metrics]:
    r"""Clipped value loss (as in lm-human-preferences and TRL), reduced by ``inputs.aggregation``::

        V_clip = V_old + clip(V - V_old, -eps, eps)
        loss   = 0.5 * mean(max((V - R)^2, (V_clip - R)^2))

    Metrics: ``value_loss``, ``value_clipfrac`` (share of tokens where the clipped branch is larger).
    Explained variance needs a global variance, see :func:`explained_variance`.
    """
    values, old_values, returns = _require(inputs, "values", "old_values", "returns")
    values_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    unclipped = jnp.square(values - returns)
    clipped = jnp.square(values_clipped - returns)
    loss = 0.5 * _agg(jnp.maximum(unclipped, clipped), inputs)
    metrics = {
        "value_loss": loss,
        "value_clipfrac": _mean((clipped > unclipped).astype(jnp.float32), inputs),
    }
    return loss, metrics


def entropy_loss(inputs: LossInputs) -> tuple[jax.Array, Metrics]:
    """Negative mean entropy: with a positive weight this is an entropy bonus. Metric ``entropy`` (positive)."""
    (entropy,) = _require(inputs, "entropy")
    return -_agg(entropy, inputs), {"entropy": _mean(entropy, inputs)}


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k1") -> jax.Array:
    r"""Per-token estimate of KL(policy || reference) from the sampled token (Schulman, "Approximating KL
    divergence", 2020). With ``log r = logp_ref - logp``::

        k1 = -log r                 unbiased, can be negative; the usual choice inside the reward
        k2 = (log r)^2 / 2          biased, >= 0
        k3 = (r - 1) - log r        unbiased, >= 0, low variance; the usual choice as a loss

    Elementwise; any matching shapes. ``estimator`` is a static Python string.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    chex.assert_equal_shape([logprobs, ref_logprobs])
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    return jnp.expm1(log_r) - log_r  # expm1 keeps precision when r is close to 1


def kl_loss(inputs: LossInputs, *, estimator: str = "k3") -> tuple[jax.Array, Metrics]:
    """Mean per-token KL estimate to the reference policy, as a penalty to minimise. Metric ``kl_<estimator>``."""
    logp, ref_logp = _require(inputs, "logprobs", "ref_logprobs")
    real = inputs.mask > 0
    # Sanitise padding before the estimator's exp.
    kl = kl_estimate(jnp.where(real, logp, 0.0), jnp.where(real, ref_logp, 0.0), estimator)
    return _agg(kl, inputs), {f"kl_{estimator}": _mean(kl, inputs)}


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array, axis_name=None) -> jax.Array:
    """``1 - Var(R - V) / Var(R)`` over real tokens (biased variances; global over ``axis_name``).

    1 is a perfect critic, 0 no better than a constant, negative worse; nan-free (returns 0 when Var(R) = 0).
    """
    chex.assert_equal_shape([values, returns, mask])
    var_returns = masked_var(returns, mask, axis_name)
    var_residual = masked_var(returns - values, mask, axis_name)
    safe = jnp.where(var_returns > 0, var_returns, 1.0)
    return jnp.where(var_returns > 0, 1.0 - var_residual / safe, 0.0)


# --- composition -------------------------------------------------------------------------------------------------

_BUILTIN_TERMS: dict[str, TermFn] = {
    "ppo_clip_loss": ppo_clip_loss,
    "value_loss": value_loss,
    "entropy_loss": entropy_loss,
    "kl_loss": kl_loss,
}


def resolve_term(spec: str | TermFn) -> TermFn:
    """Returns the loss-term function named by ``spec``.

    ``spec`` is ``"package.module:function"`` (an attribute path such as ``"pkg.mod:Class.method"`` also works), a
    bare built-in name (``"ppo_clip_loss"``, ``"value_loss"``, ``"entropy_loss"``, ``"kl_loss"``), or already a
    callable (returned as is).

    Raises:
      ValueError: malformed string or unknown bare name.
      ImportError: the module cannot be imported.
      AttributeError: the module has no such attribute.
      TypeError: the attribute is not callable, or ``spec`` is neither a string nor callable.
    """
    if isinstance(spec, str) and ":" not in spec:
        if spec in _BUILTIN_TERMS:
            return _BUILTIN_TERMS[spec]
        raise ValueError(
            f"loss term {spec!r} is not 'package.module:function' nor a built-in term ({sorted(_BUILTIN_TERMS)})"
        )
    return resolve_callable(spec, what="loss term")


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One weighted term of the total loss: ``weight * fn(inputs, **kwargs)[0]``."""

    name: str
    """Unique name; the weighted value is logged as ``loss/<name>``."""
    fn: TermFn | str
    """The term function, or a ``"module:function"`` / built-in name string resolved by :func:`resolve_term`."""
    weight: float = 1.0
    """Static weight. To vary it during training without recompiling, pass ``weights=`` to the combined fn."""
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword hyperparameters bound to ``fn``."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"LossTerm.name must be a non-empty string without '/', got {self.name!r}")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"LossTerm.weight must be a finite number, got {self.weight!r} for term {self.name!r}")
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"LossTerm.kwargs must be a mapping, got {type(self.kwargs).__name__}")
        # Resolve strings now, so a bad config fails at construction rather than inside jit.
        object.__setattr__(self, "fn", resolve_term(self.fn))
        object.__setattr__(self, "kwargs", dict(self.kwargs))


def combine(terms: Sequence[LossTerm]) -> Callable[..., tuple[jax.Array, Metrics]]:
    """Builds ``loss_fn(inputs, weights=None) -> (total, metrics)``, the weighted sum of ``terms``.

    ``metrics`` holds every term's own metrics (names must not collide), ``loss/<name>`` (the weighted term) and
    ``loss/total``. ``weights``, if given, maps term names to (possibly traced) weights that override the static
    ones, e.g. an annealed entropy coefficient kept as an array in the train state; ``kwargs`` maps term names to
    keyword arguments that override the bound ones (a clip range from the state's hyperparameters).
    """
    terms = tuple(terms)
    if not terms:
        raise ValueError("combine() needs at least one LossTerm")
    for term in terms:
        if not isinstance(term, LossTerm):
            raise TypeError(f"combine() takes LossTerm objects, got {type(term).__name__}")
    names = [term.name for term in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"loss term names must be unique, got {names}")

    def loss_fn(inputs: LossInputs, weights: Mapping[str, jax.Array] | None = None,
                kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[jax.Array, Metrics]:
        weights = dict(weights or {})
        kwargs = dict(kwargs or {})
        unknown = (set(weights) | set(kwargs)) - set(names)
        if unknown:
            raise ValueError(f"weights or kwargs given for unknown loss terms {sorted(unknown)}; terms are {names}")
        total = jnp.zeros((), jnp.float32)
        metrics: Metrics = {}
        for term in terms:
            out = term.fn(inputs, **{**term.kwargs, **kwargs.get(term.name, {})})
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
                raise TypeError(f"loss term {term.name!r} must return (loss, metrics_dict)")
            loss, term_metrics = out
            chex.assert_rank(loss, 0, custom_message=f"loss term {term.name!r} must return a scalar loss")
            for key, value in term_metrics.items():
                if key.startswith("loss/"):
                    raise ValueError(f"loss term {term.name!r} emits metric {key!r}; 'loss/' names are reserved")
                if key in metrics:
                    raise ValueError(f"loss term {term.name!r} emits metric {key!r}, which another term already set")
                metrics[key] = value
            weighted = weights.get(term.name, term.weight) * loss
            metrics[f"loss/{term.name}"] = weighted
            total = total + weighted
        metrics["loss/total"] = total
        return total, metrics

    return loss_fn
