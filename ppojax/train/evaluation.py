"""Held-out evaluation of the policy: jitted generation on the task's evaluation prompts, scored by the run's
reward, summarised as ``eval/...`` metrics.

For ``n`` prompts with ``k`` responses each, scores ``s_ij`` and (for a verifiable task) correctness
``c_ij = correct(response_ij, target_i)``:

    eval/score_mean = mean_ij s_ij
    eval/accuracy   = mean_ij c_ij                       (mean@k; with k = 1 and greedy decoding, plain accuracy)
    eval/pass@k     = mean_i max_j c_ij                  (k > 1 only)
    eval/response_length = mean_ij |response_ij|,   eval/ended = mean_ij 1[response_ij ended by EOS or a stop]

Generation is deterministic: greedy, or sampled with keys that depend only on ``eval.seed`` and the row's index
(never on the iteration or the batch it shares), so the same policy always gets the same numbers, and a resumed
run logs the rows an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ppojax.generate.sampling import sample


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How to evaluate: ``samples`` responses per prompt, greedy or at ``temperature``, ``batch`` prompts per call,
    ``max_new_tokens`` per response, sampling keys from ``seed``."""

    samples: int = 1
    greedy: bool = True
    temperature: float = 1.0
    batch: int = 8
    max_new_tokens: int = 24
    seed: int = 0


@dataclasses.dataclass
class EvalResult:
    """Per-response results, flattened prompt-major (rows ``i*k .. i*k+k-1`` answer prompt ``i``)."""

    metrics: dict
    responses: list
    scores: np.ndarray
    correct: Optional[np.ndarray]
    lengths: np.ndarray
    ended: np.ndarray


def _generate(setup, params, frozen, prompt_ids, prompt_mask, key, example_ids, *, greedy: bool,
              temperature: float, max_new_tokens: int):
    actor = setup.roles.actor(params, frozen)
    cfg = setup.ppo
    out = sample(setup.model, actor, prompt_ids, prompt_mask, key, max_new_tokens=max_new_tokens,
                 temperature=0.0 if greedy else temperature, top_k=0 if greedy else cfg.top_k,
                 top_p=1.0 if greedy else cfg.top_p, eos_token_id=cfg.eos_token_id,
                 pad_token_id=setup.pad_token_id, example_ids=example_ids, stop_sequences=cfg.stop_token_ids)
    return out.tokens, out.mask


_generate_jit = jax.jit(_generate, static_argnums=0, static_argnames=("greedy", "temperature", "max_new_tokens"))


def _scores_jit_fn(state, prompt_ids, prompt_mask, tokens, mask):
    from ppojax.rl.iteration import compute_scores

    batch = _Scored(prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=tokens, mask=mask)
    return compute_scores(state, batch)


@dataclasses.dataclass(frozen=True)
class _Scored:
    """What ``compute_scores`` reads of a rollout."""

    prompt_ids: Any
    prompt_mask: Any
    tokens: Any
    mask: Any


_scores_jit = jax.jit(_scores_jit_fn)


def _stopped(tokens: np.ndarray, mask: np.ndarray, eos: Optional[int], stops: Sequence[tuple]) -> np.ndarray:
    """Whether each response ended by EOS or a stop sequence (rather than running out of tokens)."""
    out = np.zeros(tokens.shape[0], bool)
    for i, (row, m) in enumerate(zip(tokens, mask)):
        real = row[m > 0].tolist()
        if not real:
            continue
        out[i] = (eos is not None and real[-1] == eos) or any(tuple(real[-len(q):]) == tuple(q) for q in stops)
    return out


def generate_responses(state, prompt_ids: np.ndarray, prompt_mask: np.ndarray, settings: EvalSettings, *,
                       mesh=None):
    """``(tokens, mask)`` numpy ``[n * k, T]`` for ``n`` prompts, ``k = settings.samples`` each (prompt-major).

    Rows go in chunks of ``settings.batch`` prompts (the last one padded by repeating its last prompt, whose extra
    responses are dropped); row ``r`` of the flattened output is sampled with ``fold_in(key, r)``, so chunking does
    not change it. With a mesh, each chunk is row-sharded over its batch axes (a collective: every process calls
    this with the same arguments)."""
    from ppojax import parallel

    n, k = prompt_ids.shape[0], settings.samples
    chunk = settings.batch
    shards = parallel.batch_shards(mesh) if mesh is not None else 1
    while (chunk * k) % shards:
        chunk += 1
    key = jax.random.key(settings.seed)
    tokens_out, mask_out = [], []
    for start in range(0, n, chunk):
        idx = np.minimum(np.arange(start, start + chunk), n - 1)
        ids = np.repeat(prompt_ids[idx], k, axis=0)
        msk = np.repeat(prompt_mask[idx], k, axis=0)
        rows = np.arange(start * k, (start + chunk) * k, dtype=np.int32)
        args = (ids, msk, key, rows)
        if mesh is not None:
            share = ids.shape[0] // jax.process_count()
            lo = jax.process_index() * share
            ids_g, msk_g, rows_g = parallel.shard_batch(mesh, ids[lo:lo + share], msk[lo:lo + share],
                                                        rows[lo:lo + share])
            with jax.set_mesh(mesh):
                toks, m = _generate_jit(state.setup, state.params, state.frozen, ids_g, msk_g,
                                        key,
                                        rows_g, greedy=settings.greedy, temperature=float(settings.temperature),
                                        max_new_tokens=settings.max_new_tokens)
            toks, m = parallel.to_host((toks, m))
        else:
            toks, m = jax.device_get(_generate_jit(
                state.setup, state.params, state.frozen, *args, greedy=settings.greedy,
                temperature=float(settings.temperature), max_new_tokens=settings.max_new_tokens))
        keep = (min(start + chunk, n) - start) * k
        tokens_out.append(np.asarray(toks)[:keep])
        mask_out.append(np.asarray(m)[:keep])
    return np.concatenate(tokens_out), np.concatenate(mask_out)


def evaluate(state, prompt_ids: np.ndarray, prompt_mask: np.ndarray, settings: EvalSettings, *, tokenizer,
             targets: Optional[Sequence] = None, correct=None, host_reward=None, mesh=None) -> EvalResult:
    """Generate on the held-out prompts and score (the module docstring). ``host_reward``: score on the host (the
    run's host reward); None: the state's jittable reward. ``correct(response, target)`` and ``targets`` (one per
    prompt) for a verifiable task."""
    from ppojax.train.loop import score_on_host

    k = settings.samples
    tokens, mask = generate_responses(state, prompt_ids, prompt_mask, settings, mesh=mesh)
    ids_rep, mask_rep = np.repeat(prompt_ids, k, axis=0), np.repeat(prompt_mask, k, axis=0)
    if host_reward is not None:
        scores = np.asarray(score_on_host(host_reward, tokens, mask, ids_rep, mask_rep), np.float32)
    elif state.reward is not None:  # the state's jittable reward (a reward model, the lexicon, a function)
        arrays = (ids_rep, mask_rep, tokens, mask)
        if mesh is not None:  # global (replicated) inputs beside the laid-out state: multi-process safe
            from ppojax import parallel

            with jax.set_mesh(mesh):
                out = _scores_jit(state, *(parallel.replicate(mesh, x) for x in arrays))
            scores = np.asarray(parallel.to_host(out), np.float32)
        else:
            scores = np.asarray(jax.device_get(_scores_jit(state, *(jnp.asarray(x) for x in arrays))), np.float32)
    else:
        scores = np.full(tokens.shape[0], np.nan, np.float32)
    responses = tokenizer.batch_decode([t[m > 0].tolist() for t, m in zip(tokens, mask)], skip_special_tokens=True)
    lengths = mask.sum(-1)
    cfg = state.setup.ppo
    ended = _stopped(tokens, mask, cfg.eos_token_id, cfg.stop_token_ids)
    metrics = {"eval/score_mean": float(np.mean(scores)), "eval/response_length": float(np.mean(lengths)),
               "eval/ended": float(np.mean(ended))}
    right = None
    if correct is not None and targets is not None:
        right = np.array([bool(correct(r, targets[i // k])) for i, r in enumerate(responses)])
        metrics["eval/accuracy"] = float(np.mean(right))
        if k > 1:
            metrics[f"eval/pass@{k}"] = float(np.mean(right.reshape(-1, k).any(-1)))
            metrics[f"eval/mean@{k}"] = metrics["eval/accuracy"]
    return EvalResult(metrics=metrics, responses=responses, scores=scores, correct=right, lengths=lengths,
                      ended=ended)


def settings_of(cfg) -> EvalSettings:
    """The ``eval:`` section of an experiment config as :class:`EvalSettings`."""
    e, ppo = cfg.eval, cfg.ppo
    return EvalSettings(samples=e.samples_per_prompt, greedy=e.greedy,
                        temperature=e.temperature if e.temperature is not None else ppo.temperature,
                        batch=e.batch_size or max(ppo.batch_size // ppo.samples_per_prompt, 1),
                        max_new_tokens=ppo.response_length, seed=e.seed)


__all__ = ["EvalResult", "EvalSettings", "evaluate", "generate_responses", "settings_of"]
