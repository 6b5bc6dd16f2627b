"""How much memory a run needs, estimated before anything is initialised or compiled, and the check that refuses a
run that cannot fit its devices (``ppojax.train.run.load_inputs`` calls :func:`check_run_fits`).

The estimate (:func:`estimate_run_bytes`) adds named parts, each an upper bound of what XLA holds at once:

- ``state``: the train state as ``create_state`` builds it (shapes by ``jax.eval_shape``, nothing allocated): the
  trainable params (policy, a separate critic, LoRA adapters), the optimizer's moments, the frozen reference or
  base, and a jittable reward's own arrays.
- ``gradients``: one gradient per trainable param.
- ``kv_cache``: the rollout's KV cache, ``batch_size x (max_prompt_tokens + response_length)`` slots per layer,
  twice (the decode loop's carry in and out).
- ``rollout``: the per-token arrays of the rollout batch (tokens, masks, log-probs of policy and reference,
  values, rewards, advantages, returns: 12 arrays of ``batch_size x T``), the decode step's logits
  (``batch_size x vocab``, 3 copies: logits, probabilities, the filtered ones) and the recomputing forward of
  ``rollout_chunk_size`` rows (hidden states per layer and one ``vocab_chunk_size`` slice of logits).
- ``update``: the activations a minibatch's forward keeps for its backward, per layer and token ``18 x width``
  values (LayerNorms, q/k/v, the attention output, the 4x MLP in and out; Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", section 4.1) plus ``2 x heads x T`` (attention scores
  and probabilities); with ``model.remat: true`` one ``width`` per layer plus one whole layer, with ``dots``
  ``10 x width`` (the weight matmuls' outputs) plus one whole layer. A separate critic runs
  its own forward. The vocabulary projection adds 3 copies of a ``vocab_chunk_size`` slice per token.
- ``margin``: a quarter of the rest, for what is not modelled (fragmentation, small buffers, XLA's copies).

Activations and per-token arrays are counted in float32 (4 bytes), the state in its own dtypes. The estimate is of
the whole run; it is compared with the memory of all the devices together (on CPU: the host's available RAM, less
:data:`HOST_RUNTIME_BYTES` for the Python process, JAX and XLA's compiler). It is conservative but not absurd: the
measured device peak of the tiny and offline configs (XLA's ``memory_analysis`` of the compiled, donated iteration:
arguments + temporaries + outputs not aliased) lies between ``estimate / ESTIMATE_FACTOR`` and the estimate, and a
tiny run's peak RSS stays below ``estimate + HOST_RUNTIME_BYTES`` (tests/test_memory.py). Sharding over a mesh is not
modelled: the estimate of the whole run is compared with all the devices' memory together.

``PPOJAX_SKIP_MEMORY_CHECK=1`` skips the refusal, for users who know better (e.g. a device whose memory JAX does
not report, or a run relying on host offload).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

F32 = 4
"""Bytes of a float32 (activations, logits and per-token arrays)."""
HOST_RUNTIME_BYTES = 2 << 30
"""What the Python process, JAX, the tokenizer and XLA's compiler take on a host beside the run's arrays: 2 GiB
(a tiny run's peak RSS is about 1.2-1.6 GiB, nearly all of it this)."""
ESTIMATE_FACTOR = 4
"""Not absurd: the measured device peak of the tiny and offline configs (XLA's ``memory_analysis`` of the donated,
compiled iteration) is at most the estimate and at least ``estimate / ESTIMATE_FACTOR``."""
SKIP_ENV = "PPOJAX_SKIP_MEMORY_CHECK"


class MemoryCheckError(ValueError):
    """The run's estimate exceeds its devices' memory (one line naming the largest parts and their config keys)."""


def _tree_bytes(tree) -> int:
    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def _heads(model_config, kv_heads: int) -> int:
    for name in ("n_head", "num_attention_heads"):
        if getattr(model_config, name, None):
            return int(getattr(model_config, name))
    return kv_heads


def estimate_run_bytes(cfg, model_config, *, reward: Any = None) -> dict:
    """The named parts of a run's memory in bytes, and their ``total`` (see the module's docstring for what each
    part counts). ``cfg`` is an ``ExperimentConfig``, ``model_config`` the family config of the model it builds;
    ``reward`` a jittable reward pytree whose arrays the state holds (None: none). Pure: shapes come from
    ``jax.eval_shape``, nothing is allocated or compiled."""
    import jax

    import ppojax
    from ppojax.train.build import create_state

    ppo, prompts = cfg.ppo, cfg.prompts
    batch, minibatch = ppo.batch_size, ppo.minibatch_size
    length = prompts.max_prompt_tokens + ppo.response_length  # T: prompt + response
    vocab, width = model_config.vocab_size, model_config.width
    chunk_v = min(ppo.vocab_chunk_size, vocab)

    params = jax.eval_shape(lambda: ppojax.init_params(model_config, jax.random.key(0)))
    state = jax.eval_shape(lambda p: create_state(cfg, model_config, p, reward), params)
    state_bytes = _tree_bytes((state.params, state.opt_state, state.frozen, state.reward))
    gradients = _tree_bytes(state.params)
    separate_critic = state.setup.has_critic and ppo.critic == "separate"

    cache = jax.eval_shape(lambda: ppojax.init_cache(model_config, batch, length))
    n_layer, _, kv_heads = cache.key.shape[:3]
    kv_cache = 2 * _tree_bytes((cache.key, cache.value))
    heads = _heads(model_config, kv_heads)

    rows = ppo.rollout_chunk_size or minibatch
    rollout = (12 * batch * length * F32 + 3 * batch * vocab * F32
               + rows * length * (n_layer * width + 3 * chunk_v) * F32)

    remat = getattr(model_config, "remat", False)
    kept = 18 * width + 2 * heads * length  # per layer and token, nothing recomputed
    per_layer_token = kept if not remat else 10 * width if remat == "dots" else width
    layer_extra = kept * minibatch * length if remat else 0
    trunk = n_layer * per_layer_token * minibatch * length + layer_extra
    update = ((2 if separate_critic else 1) * trunk + 3 * minibatch * length * chunk_v) * F32

    parts = {"state": state_bytes, "gradients": gradients, "kv_cache": kv_cache, "rollout": rollout,
             "update": update}
    parts["margin"] = sum(parts.values()) // 4  # what is not modelled: XLA's fragmentation, small buffers, copies
    return {**parts, "total": sum(parts.values())}


_KEYS = {
    "state": "the model's size (model.*), lora.rank, ppo.critic",
    "gradients": "the model's size (model.*), lora.rank",
    "kv_cache": "ppo.batch_size x (prompts.max_prompt_tokens + ppo.response_length)",
    "rollout": "ppo.batch_size, ppo.rollout_chunk_size x (prompts.max_prompt_tokens + ppo.response_length)",
    "update": "ppo.minibatch_size x (prompts.max_prompt_tokens + ppo.response_length); model.remat (true, dots) keeps less",
}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory() -> tuple[Optional[int], str]:
    """``(bytes, where)``: the memory the run's arrays can use -- the sum of ``memory_stats()['bytes_limit']`` over
    the run's accelerators (this process's, times the process count), or on CPU the host's available RAM
    (``MemAvailable`` of /proc/meminfo, else ``os.sysconf``) less :data:`HOST_RUNTIME_BYTES`. ``(None, ...)`` when
    unknown (then nothing is refused)."""
    import jax

    devices = jax.local_devices()
    if devices and devices[0].platform != "cpu":
        limits = []
        for d in devices:
            try:
                stats = d.memory_stats() or {}
            except Exception:  # noqa: BLE001 -- a backend without memory stats: unknown
                stats = {}
            limits.append(stats.get("bytes_limit"))
        if all(limits):  # every process holds as many devices (a multi-process run counts them all)
            count = len(devices) * jax.process_count()
            each = format_bytes(limits[0])
            return sum(limits) * jax.process_count(), f"{count} x {devices[0].device_kind} ({each} each)"
        return None, "unknown"
    available = _meminfo_available()
    if available is None:
        return None, "unknown"
    return max(available - HOST_RUNTIME_BYTES, 0), "available host RAM less 2 GiB for the runtime"


def check_run_fits(cfg, model_config, *, reward: Any = None) -> dict:
    """Refuse (``MemoryCheckError``, one line) a run whose :func:`estimate_run_bytes` exceeds :func:`device_memory`,
    unless ``$PPOJAX_SKIP_MEMORY_CHECK`` is set. Returns the estimate."""
    estimate = estimate_run_bytes(cfg, model_config, reward=reward)
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return estimate
    limit, where = device_memory()
    if limit is None or estimate["total"] <= limit:
        return estimate
    parts = sorted(((v, k) for k, v in estimate.items() if k not in ("total", "margin")), reverse=True)[:2]
    biggest = "; ".join(f"{k} {format_bytes(v)} ({_KEYS[k]})" for v, k in parts)
    raise MemoryCheckError(
        f"the run needs about {format_bytes(estimate['total'])} but its devices have {format_bytes(limit)} "
        f"({where}): largest parts {biggest}; reduce them, or set {SKIP_ENV}=1 to run anyway")


__all__ = ["ESTIMATE_FACTOR", "HOST_RUNTIME_BYTES", "MemoryCheckError", "check_run_fits", "device_memory",
           "estimate_run_bytes", "format_bytes"]
