"""The PPO-RLHF training job behind ``experiments/ppo_gpt2.py``.

    python experiments/ppo_gpt2.py [--config configs/NAME.yaml] [--run-dir DIR] [--iterations N] [--seed S]
                                   [--set a.b=value ...]

Without ``--config`` it runs the offline default (``configs/offline.yaml``). Everything goes under the run directory:
``config.yaml`` (resolved), ``metrics.jsonl``, ``samples.jsonl``, ``tensorboard/``, ``checkpoints/``,
``curves.png`` and ``export/`` (the final policy in Hugging Face format). Running the same command on an existing run
directory resumes from its latest checkpoint; the resumed run's metrics equal an uninterrupted run's.

Order of work: every input is checked (config, run directory, prompts, model, tokenizer, reward) before anything
compiles, so a bad input costs a second and one error line.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "offline.yaml"


class RunError(Exception):
    """An input problem: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments and config


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ppo_gpt2.py",
        description="PPO-RLHF of a GPT-2 policy. Without --config, the offline default (configs/offline.yaml).",
    )
    p.add_argument("--config", type=str, default=None, help="YAML config (default: configs/offline.yaml)")
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


# ----------------------------------------------------------------------------------------------------------------
# Building the pieces (host side, before compiling)


def prepare_run_dir(run_dir: Path, cfg, is_main: bool) -> bool:
    """Create / check the run directory. Returns True when it holds a previous run to resume."""
    from ppojax.io import configlib
    from ppojax.io.checkpoint import check_writable

    try:
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        check_writable(run_dir)
    except Exception as e:
        raise RunError(f"run directory {run_dir} is not writable: {e}") from None
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return False
    previous = configlib.load_yaml(saved)
    now = configlib.to_dict(cfg)
    # The run length and the mesh may change on resume; nothing else may.
    diff = [d for d in _config_diff(previous, now) if not d.startswith(("iterations:", "mesh:"))]
    if diff:
        raise RunError(
            f"run directory {run_dir} holds a run with a different config ({'; '.join(diff[:5])}); "
            "resume with the same config, or pass a new --run-dir"
        )
    return True


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
    name = Path(args.config).stem if args.config else "offline"
    run_dir = Path(args.run_dir) if args.run_dir else REPO_ROOT / "runs" / name
    run_dir = run_dir.expanduser().resolve()

    import jax

    from ppojax import parallel
    from ppojax.parallel import distributed

    # Multi-host start-up and the mesh come first: both fail fast, before anything compiles.
    try:
        distributed.initialize(distributed.DistributedConfig.from_env(
            args.coordinator, args.num_processes, args.process_id, args.distributed_timeout))
        mesh = parallel.make_mesh(args.mesh or parallel.env_mesh() or cfg.mesh)
        parallel.check_batch(cfg.ppo, cfg.optimizer, mesh)
    except (distributed.DistributedError, parallel.MeshError) as e:
        raise RunError(str(e)) from None
    is_main = jax.process_index() == 0
    resuming = prepare_run_dir(run_dir, cfg, is_main)

    # Host-side inputs, all checked before compiling.
    import ppojax

    try:
        tokenizer = ppojax.load_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise RunError(f"tokenizer={cfg.tokenizer!r}: {e}") from None
    texts, prompt_ids, prompt_mask = load_prompts(cfg, config_dir, tokenizer)
    model_config, actor_params = build_model(cfg)
    total = cfg.prompts.max_prompt_tokens + cfg.ppo.response_length
    if total > model_config.max_positions:
        raise RunError(
            f"prompts.max_prompt_tokens={cfg.prompts.max_prompt_tokens} + ppo.response_length="
            f"{cfg.ppo.response_length} = {total} exceeds the model's context of {model_config.max_positions} tokens"
        )
    if ((prompt_mask > 0) & (prompt_ids >= model_config.vocab_size)).any():
        raise RunError(f"tokenizer {cfg.tokenizer!r} produces ids beyond the model's vocabulary of "
                       f"{model_config.vocab_size}")
    reward, host_reward = build_reward(cfg, tokenizer, model_config, config_dir)

    from ppojax.rl import iteration as ppo
    from ppojax.io import configlib
    from ppojax.io.checkpoint import Checkpointer
    from ppojax.io.data import PromptLoader
    from ppojax.io.logger import RunLogger
    from ppojax.rl.state import create_train_state
    from ppojax.train.loop import train

    ppo_cfg = cfg.ppo
    state = create_train_state(model_config, actor_params, ppo=ppo_cfg, reward=reward,
                               key=jax.random.key(cfg.seed), optimizer=cfg.optimizer,
                               total_iterations=cfg.iterations)
    state = parallel.shard_state(state, mesh)  # params over `fsdp`, replicated over `data`
    loader = PromptLoader(prompt_ids, prompt_mask, ppo_cfg.prompts_per_iteration, cfg.seed, cfg.prompts.shuffle,
                          jax.process_index(), jax.process_count())
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep)
    start = 0
    if resuming and ckpt.latest_step() is not None:
        step, restored, meta = ckpt.restore(_arrays(state))
        state = _with_arrays(state, restored)
        start = int(meta.get("iteration", step))
        print(f"[ppojax] resuming {run_dir} from iteration {start}", file=sys.stderr, flush=True)
    if is_main:
        configlib.save_yaml(run_dir / "config.yaml", cfg)
    if args.export_checkpoint is not None:
        return _export_checkpoint(args.export_checkpoint, ckpt, state, run_dir, tokenizer, is_main)
    if start >= cfg.iterations:
        print(f"[ppojax] {run_dir} already has {start} of {cfg.iterations} iterations; nothing to do",
              file=sys.stderr)
        ckpt.close()
        return 0

    logger = RunLogger(run_dir, is_main_process=is_main, tensorboard=cfg.logging.tensorboard,
                       wandb={"project": cfg.logging.wandb_project, "name": run_dir.name,
                              "config": configlib.to_dict(cfg)} if cfg.logging.wandb_project else None,
                       progress_total=cfg.iterations, resume_from_iteration=start,
                       console_every=cfg.logging.console_every)
    stop = _Stop()
    stop.install()
    outcome = {"last_saved": start, "exit_code": 0}

    def on_iteration(done, state, metrics, prompts):
        try:
            ppo.check_metrics(metrics, done)
        except FloatingPointError as e:
            logger.log_metrics(done, metrics)
            print(f"[ppojax] error: {e}. The last good checkpoint (iteration {outcome['last_saved']}) is intact in "
                  f"{run_dir / 'checkpoints'}.", file=sys.stderr, flush=True)
            outcome["exit_code"] = 1
            return True
        logger.log_metrics(done, metrics)
        if cfg.logging.samples_every and (done % cfg.logging.samples_every == 0 or done == 1):
            logger.log_samples(done, _sample_rows(state, *prompts, tokenizer, cfg, host_reward, mesh))
        if done % cfg.checkpoint.every == 0 or done == cfg.iterations or stop.signal is not None:
            ckpt.save(done, _arrays(state), {"iteration": done, "data_position": done * ppo_cfg.prompts_per_iteration,
                                             "time": time.time()})
            ckpt.wait()
            outcome["last_saved"] = done
        if stop.signal is not None:
            print(f"[ppojax] received signal {stop.signal}: checkpoint saved at iteration {done}; rerun the "
                  "same command to resume", file=sys.stderr, flush=True)
            return True
        return False

    try:
        state = train(state, loader, iterations=cfg.iterations, start=start, mesh=mesh, host_reward=host_reward,
                      donate=True, on_iteration=on_iteration)
    finally:
        logger.close()
        ckpt.close()
    exit_code = outcome["exit_code"]
    if exit_code == 0 and stop.signal is None and cfg.export:
        actor = parallel.to_host(state.actor_params)  # collective: every process gathers, process 0 writes
        if is_main:
            out = ppojax.save_pretrained(run_dir / "export", model_config, actor)
            tokenizer.save_pretrained(out)
            print(f"[ppojax] exported the policy to {out}", file=sys.stderr, flush=True)
    return exit_code


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


def _export_checkpoint(step, ckpt, state, run_dir, tokenizer, is_main=True) -> int:
    import ppojax
    from ppojax import parallel

    if step not in ckpt.all_steps():
        raise RunError(f"{run_dir / 'checkpoints'} has no checkpoint {step}; available: {ckpt.all_steps()}")
    _, restored, _ = ckpt.restore(_arrays(state), step=step)
    actor = parallel.to_host(state.setup.roles.actor(restored["params"], restored["frozen"]))
    if is_main:
        out = ppojax.save_pretrained(run_dir / f"export-{step}", state.setup.model, actor)
        tokenizer.save_pretrained(out)
        print(f"[ppojax] exported checkpoint {step} to {out}", file=sys.stderr)
    ckpt.close()
    return 0


def _format_warning(message, category, filename, lineno, line=None):
    return f"[ppojax] {category.__name__}: {message}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    warnings.formatwarning = _format_warning  # one readable line per warning in a job's log
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
