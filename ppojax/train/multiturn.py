"""Multi-turn episodes against an environment, token-in/token-out (docs/multi_turn.md).

One episode per row of the batch. Turn after turn:

    prompt = the environment's first observation (reset(row, seed)), rendered and tokenized once
    repeat up to env.max_turns:
      sample the assistant's turn (jitted, continuing the episode's KV cache: nothing is encoded twice)
      decode the turn's tokens -> env.step(text) on the host -> (observation or None, reward, done)
      render the observation as the next turn (the chat template's tool / user turn, then the assistant's
      generation prompt) and append ITS tokens to the cache

The ids the policy sampled are the ids trained on: an earlier turn is never re-tokenized from text. A row's response
region (``ppo.response_length`` slots) holds, in cache order, its turns and the observations between them, with
masked holes where other rows of the batch were still sampling: ``mask`` is 1 on the policy's own tokens (the
loss), ``context_mask`` on every real token (what the models attend to), so one forward pass over the episode gives
the log-probs the sampler recorded (``ppojax.rl.iteration.predicting_slots``). Rewards sit at the last token of the
turn that earned them (``env.credit: turn``) or all at the episode's last token (``episode``); the scores of the
update are their sums, which is what the group estimators (GRPO, RLOO) compare.

Seeds: the ``k`` samples of a prompt share the episode seed ``(run seed, iteration, group)``, so a group plays the
same game; a resumed run rebuilds every episode from its seed (nothing of an environment is checkpointed). The
sampling keys of turn ``t`` are the rollout's key folded with ``t`` (turn 0: the single-turn rollout's own key, so an
environment that ends every episode after one turn reproduces the single-turn rollout exactly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ppojax.envs import EnvError, check_observation, check_step, make_episode
from ppojax.generate.sampling import decode, row_keys
from ppojax.models import init_cache
from ppojax.train.loop import HostCallError, call_on_host

_SENTINEL = "\u2063PPOJAX\u2063TURN\u2063"


@dataclasses.dataclass(frozen=True)
class EpisodeSettings:
    """What shapes and drives the episodes (from the config's ``env:``, ``prompts:`` and ``ppo:``)."""

    name: str
    kwargs: dict
    max_turns: int
    timeout_s: Optional[float]
    turn_tokens: int
    observation_tokens: int
    credit: str
    prompt_len: int
    """P: the first observation's tokens at most (``prompts.max_prompt_tokens``), left-padded to it."""
    budget: int
    """R: the response region's slots (``ppo.response_length``)."""
    chat: bool
    system: Optional[str]
    seed: int

    @classmethod
    def of(cls, cfg) -> "EpisodeSettings":
        e = cfg.env
        return cls(name=e.name, kwargs=dict(e.kwargs), max_turns=e.max_turns, timeout_s=e.timeout_s or None,
                   turn_tokens=e.turn_tokens, observation_tokens=e.observation_tokens, credit=e.credit,
                   prompt_len=cfg.prompts.max_prompt_tokens, budget=cfg.ppo.response_length, chat=cfg.prompts.chat,
                   system=cfg.prompts.system, seed=cfg.seed)


def episode_seed(seed: int, iteration: int, group: int, stream: int = 0) -> int:
    """The seed of every episode of prompt group ``group`` at ``iteration`` (a 31-bit int); ``stream`` 0 is
    training, 1 held-out evaluation (episode ``group`` of the held-out rows)."""
    return int(np.random.SeedSequence([seed, iteration, group, stream, 0x6D74]).generate_state(1)[0] & 0x7FFFFFFF)


# ----------------------------------------------------------------------------------------------------------------
# Rendering observations as tokens


class Renderer:
    """Token ids of an episode's first observation and of each observation that follows a turn.

    With ``chat``, an observation after a turn is the text the chat template puts after the assistant's message:
    its end-of-turn marker (unless the policy already sampled it: its EOS), the observation's turn (``role``:
    ``tool``, ``user``, ...) and the assistant's generation prompt; rendered once as text and tokenized on its own,
    never together with what the policy wrote. Without ``chat`` the observation's text is appended as it is."""

    def __init__(self, tokenizer, *, chat: bool, system: Optional[str], eos_token_id: Optional[int]):
        self.tokenizer, self.chat, self.system = tokenizer, chat, system
        self.eos_text = tokenizer.decode([eos_token_id]) if eos_token_id is not None else None

    def first(self, observation) -> list:
        from ppojax.train.prompting import encode

        return encode(self.tokenizer, observation, chat=self.chat, system=self.system, where="env: reset()")

    def messages(self, observation, role: str) -> list:
        return [{"role": role, "content": observation}] if isinstance(observation, str) else list(observation)

    def after_turn(self, observation, role: str, ended: bool) -> list:
        """Ids of ``observation`` appended after a turn (``ended``: the turn's last token was EOS)."""
        if not self.chat:
            text = observation if isinstance(observation, str) else "\n".join(m["content"] for m in observation)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        text = self.tokenizer.apply_chat_template(base + self.messages(observation, role), tokenize=False,
                                                  add_generation_prompt=True)
        tail = text[text.index(_SENTINEL) + len(_SENTINEL):]
        if ended and self.eos_text and tail.startswith(self.eos_text):
            tail = tail[len(self.eos_text):]
        return list(self.tokenizer(tail, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------------------------
# The jitted turn


def _turn(setup, params, frozen, hparams, cache, chunk_ids, chunk_mask, key, example_ids, finished, temperature, *,
          turn_tokens: int, greedy: bool, cache_len: int):
    """One assistant turn: ``chunk`` appended to the episode's cache (a fresh one when ``cache`` is None: the
    prompt's prefill), then up to ``turn_tokens`` sampled tokens per row: ``(SampleOutput, cache, steps)``."""
    from ppojax.rl.iteration import sampling_top_p

    cfg = setup.ppo
    actor = setup.roles.actor(params, frozen)
    if cache is None:
        cache = init_cache(setup.model, chunk_ids.shape[0], cache_len)
    keys = row_keys(key, chunk_ids.shape[0], example_ids)
    return decode(setup.model, actor, cache, chunk_ids, chunk_mask, keys, max_new_tokens=turn_tokens,
                  temperature=0.0 if greedy else temperature, top_k=0 if greedy else cfg.top_k,
                  top_p=1.0 if greedy else sampling_top_p(setup, hparams), eos_token_id=cfg.eos_token_id,
                  pad_token_id=setup.pad_token_id, stop_sequences=cfg.stop_token_ids, finished=finished)


_turn_jit = jax.jit(_turn, static_argnums=0, static_argnames=("turn_tokens", "greedy", "cache_len"),
                    donate_argnames=("cache",))


# ----------------------------------------------------------------------------------------------------------------
# Episodes


@dataclasses.dataclass
class Episodes:
    """A batch of finished episodes on the host, ``[batch, ...]`` numpy arrays (see the module docstring)."""

    prompt_ids: np.ndarray  # [B, P]
    prompt_mask: np.ndarray  # [B, P]
    tokens: np.ndarray  # [B, R]
    mask: np.ndarray  # [B, R] the policy's tokens
    context_mask: np.ndarray  # [B, R] every real token
    logprobs: np.ndarray  # [B, R] the sampler's
    turn_rewards: np.ndarray  # [B, R]
    turns: np.ndarray  # [B] assistant turns played
    success: np.ndarray  # [B] bool
    truncated: np.ndarray  # [B] bool: ended by the budget (context, observation size), not by the environment
    transcripts: list  # per row: [(role, text), ...]
    env_seconds: float = 0.0

    @property
    def scores(self) -> np.ndarray:
        return self.turn_rewards.sum(-1).astype(np.float32)

    def metrics(self, prefix: str = "env/") -> dict:
        ctx = self.context_mask.sum(-1)
        return {f"{prefix}turns": float(self.turns.mean()), f"{prefix}success": float(self.success.mean()),
                f"{prefix}truncated": float(self.truncated.mean()),
                f"{prefix}episode_tokens": float(ctx.mean()),
                f"{prefix}observation_tokens": float((ctx - self.mask.sum(-1)).mean())}


def _label(settings: EpisodeSettings, index: int, seed: int) -> str:
    return f"env {settings.name!r} episode {index} (seed {seed})"


def _left_pad(ids: Sequence[int], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    out, mask = np.full((width,), pad, np.int32), np.zeros((width,), np.int32)
    if ids:
        out[width - len(ids):], mask[width - len(ids):] = ids, 1
    return out, mask


def run_episodes(state, rows: Sequence[Any], seeds: Sequence[int], settings: EpisodeSettings, renderer: Renderer,
                 key, *, mesh=None, greedy: bool = False, temperature=None, first_index: int = 0) -> Episodes:
    """Play one episode per row (``rows[i]`` with ``seeds[i]``) with the state's actor, sampling turn ``t`` from
    ``key`` folded with ``t`` (turn 0: ``key`` itself). :class:`ppojax.train.loop.HostCallError` names the
    environment and the episode when a reset or step raises, breaks its contract or outlives ``env.timeout_s``."""
    setup = state.setup
    B, P, R = len(rows), settings.prompt_len, settings.budget
    pad = int(setup.pad_token_id)
    eos = setup.ppo.eos_token_id
    temperature = state.hparams.temperature if temperature is None else jnp.float32(temperature)
    labels = [_label(settings, first_index + i, s) for i, s in enumerate(seeds)]
    env_s = 0.0

    def host(fn, *args, label):
        nonlocal env_s
        t0 = time.perf_counter()
        try:
            return call_on_host(fn, *args, label=label, timeout_s=settings.timeout_s, timeout_key="env.timeout_s")
        finally:
            env_s += time.perf_counter() - t0

    episodes, prompt_ids, prompt_mask, transcripts = [], np.zeros((B, P), np.int32), np.zeros((B, P), np.int32), []
    for i, (row, seed) in enumerate(zip(rows, seeds)):
        ep = host(lambda: make_episode(settings.name, settings.kwargs), label=labels[i])
        obs = host(ep.reset, row, int(seed), label=labels[i])
        problem = check_observation(obs, allow_none=False)
        if problem is not None:
            raise HostCallError(labels[i], "failed", f"reset() returned a bad observation: {problem}")
        ids = renderer.first(obs)
        if len(ids) > P:
            raise HostCallError(labels[i], "failed", f"reset()'s observation is {len(ids)} tokens; "
                                                     f"prompts.max_prompt_tokens is {P}: raise it")
        prompt_ids[i], prompt_mask[i] = _left_pad(ids, P, pad)
        episodes.append(ep)
        transcripts.append([("user" if isinstance(obs, str) else "messages",
                             obs if isinstance(obs, str) else [dict(m) for m in obs])])

    tokens = np.full((B, R), pad, np.int32)
    mask, context = np.zeros((B, R), np.int32), np.zeros((B, R), np.int32)
    logprobs, rewards = np.zeros((B, R), np.float32), np.zeros((B, R), np.float32)
    turns, alive = np.zeros((B,), np.int32), np.ones((B,), bool)
    truncated = np.zeros((B,), bool)
    last_policy = np.full((B,), -1, np.int64)  # region index of each row's last policy token

    def put(*arrays):
        if mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        from ppojax.parallel import shard_batch

        with jax.set_mesh(mesh):
            out = shard_batch(mesh, *arrays)
        return out if isinstance(out, tuple) else (out,)

    example_ids = np.arange(B, dtype=np.int32)
    chunk_ids, chunk_mask = prompt_ids, prompt_mask
    cache, start = None, P  # start: the absolute slot of the turn's first sampled token
    C = 1 + settings.observation_tokens
    for t in range(settings.max_turns):
        turn_key = key if t == 0 else jax.random.fold_in(key, t)
        ids_d, mask_d, ex_d, fin_d = put(chunk_ids, chunk_mask, example_ids, ~alive)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            out, cache, steps = _turn_jit(setup, state.params, state.frozen, state.hparams, cache, ids_d, mask_d,
                                          turn_key, ex_d, fin_d, temperature, turn_tokens=settings.turn_tokens,
                                          greedy=greedy, cache_len=P + R)
        tok, msk, lp, steps = jax.device_get((out.tokens, out.mask, out.logprobs, steps))
        steps = int(steps)
        base = start - P  # region index of this turn's token 0
        pending = [None] * B
        for b in np.flatnonzero(alive):
            n = int(msk[b].sum())
            if n == 0:
                alive[b] = False
                continue
            sl = slice(base, base + n)
            tokens[b, sl], mask[b, sl], context[b, sl], logprobs[b, sl] = tok[b, :n], 1, 1, lp[b, :n]
            last_policy[b] = base + n - 1
            text = renderer.tokenizer.decode(tok[b, :n], skip_special_tokens=True)
            transcripts[b].append(("assistant", text))
            turns[b] += 1
            try:
                obs, reward, done = check_step(host(episodes[b].step, text, label=labels[b]))
            except ValueError as e:
                raise HostCallError(labels[b], "failed", str(e)) from None
            rewards[b, base + n - 1] += reward  # the turn's last token (env.credit: episode moves it below)
            if done or t == settings.max_turns - 1:
                alive[b] = False
                continue
            ended = eos is not None and int(tok[b, n - 1]) == eos
            delta = renderer.after_turn(obs, getattr(episodes[b], "observation_role", "user"), ended)
            if not delta or len(delta) > settings.observation_tokens:
                alive[b], truncated[b] = False, bool(delta)
                continue
            pending[b] = (delta, obs)
        nxt = start + steps - 1  # the slot of the last sampled column, not yet in the cache
        if alive.any() and nxt + C + settings.turn_tokens > P + R:  # the next turn does not fit the budget
            truncated |= alive
            alive[:] = False
        if not alive.any():
            break
        chunk_ids = np.full((B, C), pad, np.int32)
        chunk_mask = np.zeros((B, C), np.int32)
        for b in np.flatnonzero(alive):
            delta, obs = pending[b]
            chunk_ids[b, 0], chunk_mask[b, 0] = tok[b, steps - 1], msk[b, steps - 1]
            chunk_ids[b, C - len(delta):], chunk_mask[b, C - len(delta):] = delta, 1
            o = nxt - P + C - len(delta)
            tokens[b, o:o + len(delta)], context[b, o:o + len(delta)] = delta, 1
            transcripts[b].append((getattr(episodes[b], "observation_role", "user"),
                                   obs if isinstance(obs, str) else [dict(m) for m in obs]))
        start = nxt + C
    if settings.credit == "episode":  # every reward at the episode's last policy token
        total = rewards.sum(-1)
        rewards[:] = 0.0
        has = last_policy >= 0
        rewards[np.flatnonzero(has), last_policy[has]] = total[has]
    success = np.array([bool(getattr(ep, "success", r > 0)) for ep, r in zip(episodes, rewards.sum(-1))])
    return Episodes(prompt_ids, prompt_mask, tokens, mask, context, logprobs, rewards, turns, success, truncated,
                    transcripts, env_s)


# ----------------------------------------------------------------------------------------------------------------
# The training step and evaluation


def episode_rollout(state, ep: Episodes, mesh=None):
    """The :class:`ppojax.rl.iteration.Rollout` of played episodes (the actor's, reference's and critic's forward
    passes over each whole episode), jitted; over ``mesh`` when given."""
    from ppojax.rl import iteration

    args = (ep.prompt_ids, ep.prompt_mask, ep.tokens, ep.mask, ep.context_mask, ep.logprobs, ep.turn_rewards)
    if mesh is None:
        return iteration.episode_rollout(state, *map(jnp.asarray, args))
    from ppojax.parallel import shard_batch
    from ppojax.train import mesh_step

    with jax.set_mesh(mesh):
        arrays = shard_batch(mesh, *args)
    return mesh_step.episode_rollout(state, *arrays, mesh=mesh)


@dataclasses.dataclass
class EpisodeEval:
    """``Run.evaluate()`` of a multi-turn run: the ``eval/...`` metrics and the played ``(Episodes, n)`` batches."""

    metrics: dict
    episodes: list


class EpisodeSamples(tuple):
    """What a multi-turn step hands its callbacks as the iteration's "prompts": ``(ids, mask)`` plus the
    iteration's own episodes (``episodes``), which the sample table shows turn by turn."""

    episodes: Optional[Episodes] = None


def sample_rows(ep: Episodes, n: int, k: int = 1) -> list:
    """``n`` rows of the sample table, one episode each (the first sample of each prompt first): every turn with
    who said it, the episode's score, turns and success."""
    order = [i for j in range(k) for i in range(j, len(ep.transcripts), k)]
    scores = ep.scores
    rows = []
    for i in order[:n]:
        turns = [{"role": role, "content": text} for role, text in ep.transcripts[i]]
        rows.append({"prompt": turns[0]["content"], "turns": turns[1:], "response": " | ".join(
                         f"{t['role']}: {t['content']}" for t in turns[1:] if isinstance(t["content"], str)),
                     "score": float(scores[i]), "num_turns": int(ep.turns[i]), "success": bool(ep.success[i])})
    return rows


def make_step(source, rows: Sequence[Any], settings: EpisodeSettings, renderer: Renderer, *, k: int, mesh=None,
              donate: bool = True, timing: bool = False):
    """The loop's step for multi-turn runs: ``step(state, it) -> (state, metrics, EpisodeSamples)``. ``source``
    is the run's ``PromptLoader`` (its ``indices(it)`` pick the iteration's rows of ``rows``), every prompt played
    ``k`` times with one seed per prompt."""
    from ppojax.rl import iteration
    from ppojax.train.loop import metrics_to_host

    def step(state, it: int):
        t0 = time.perf_counter()
        picked = [rows[int(i)] for i in source.indices(it)[:source.batch_size]]
        batch_rows = [r for r in picked for _ in range(k)]
        seeds = [episode_seed(settings.seed, it, g) for g in range(len(picked)) for _ in range(k)]
        key, turn_key = jax.random.split(state.key)
        ep = run_episodes(state, batch_rows, seeds, settings, renderer, turn_key, mesh=mesh)
        state = state.replace(key=key)
        rollout = episode_rollout(state, ep, mesh)
        if timing:
            jax.block_until_ready(rollout)
        t1 = time.perf_counter()
        if mesh is None:
            state, metrics = iteration.update(state, rollout, ep.scores, donate=donate)
        else:
            from ppojax.train import mesh_step

            state, metrics = mesh_step.update(state, rollout, ep.scores, mesh, donate=donate)
        metrics = {**metrics_to_host(metrics), **ep.metrics()}
        if timing:
            metrics.update({"time/rollout_s": t1 - t0 - ep.env_seconds, "time/env_s": ep.env_seconds,
                            "time/update_s": time.perf_counter() - t1})
        samples = EpisodeSamples((ep.prompt_ids, ep.prompt_mask))
        samples.episodes = ep
        return state, metrics, samples

    return step


def evaluate(state, rows: Sequence[Any], settings: EpisodeSettings, renderer: Renderer, *, seed: int = 0,
             greedy: bool = True, temperature: Optional[float] = None, batch: int = 8, mesh=None) -> tuple:
    """The policy's episodes on held-out rows (episode ``i`` seeded by ``(eval seed, i)``; greedy by default):
    ``(metrics, Episodes per batch)`` with ``eval/success`` (the success rate), ``eval/accuracy`` (the same),
    ``eval/score_mean``, ``eval/turns`` and ``eval/truncated``."""
    played = []
    key = jax.random.key(seed)
    for lo in range(0, len(rows), batch):
        chunk = list(rows[lo:lo + batch])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch - n)  # one compiled shape
        seeds = [episode_seed(seed, 0, lo + i, stream=1) for i in range(batch)]
        ep = run_episodes(state, chunk, seeds, settings, renderer, jax.random.fold_in(key, lo), mesh=mesh,
                          greedy=greedy, temperature=temperature, first_index=lo)
        played.append((ep, n))
    scores = np.concatenate([ep.scores[:n] for ep, n in played])
    success = np.concatenate([ep.success[:n] for ep, n in played])
    turns = np.concatenate([ep.turns[:n] for ep, n in played])
    truncated = np.concatenate([ep.truncated[:n] for ep, n in played])
    metrics = {"eval/success": float(success.mean()), "eval/accuracy": float(success.mean()),
               "eval/score_mean": float(scores.mean()), "eval/turns": float(turns.mean()),
               "eval/truncated": float(truncated.mean())}
    return metrics, played


def check_env(rows: Sequence[Any], settings: EpisodeSettings, renderer: Renderer) -> None:
    """Before anything compiles: the environment builds, resets on the first rows, and its step answers a turn
    with a well-formed ``(observation or None, reward, done)``, each within ``env.timeout_s``. EnvError (one line
    naming the environment and the episode) otherwise."""
    for i, row in enumerate(list(rows)[:4]):
        label = _label(settings, i, episode_seed(settings.seed, 0, i))
        try:
            ep = call_on_host(lambda: make_episode(settings.name, settings.kwargs), label=label,
                              timeout_s=settings.timeout_s, timeout_key="env.timeout_s")
            obs = call_on_host(ep.reset, row, episode_seed(settings.seed, 0, i), label=label,
                               timeout_s=settings.timeout_s, timeout_key="env.timeout_s")
            problem = check_observation(obs, allow_none=False)
            if problem is not None:
                raise EnvError(f"{label}: reset() returned a bad observation: {problem}")
            ids = renderer.first(obs)
            if len(ids) > settings.prompt_len:
                raise EnvError(f"{label}: reset()'s observation is {len(ids)} tokens; prompts.max_prompt_tokens "
                               f"is {settings.prompt_len}: raise it")
            try:
                check_step(call_on_host(ep.step, "1", label=label, timeout_s=settings.timeout_s,
                                        timeout_key="env.timeout_s"))
            except ValueError as e:
                raise EnvError(f"{label}: {e}") from None
        except HostCallError as e:
            raise EnvError(e.line()) from None


__all__ = ["EpisodeEval", "EpisodeSamples", "EpisodeSettings", "Episodes", "Renderer", "check_env", "episode_rollout",
           "episode_seed", "evaluate", "make_step", "run_episodes", "sample_rows"]
