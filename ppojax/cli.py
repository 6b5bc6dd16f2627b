"""The command lines: argument parsing and the repository's default paths, nothing else. The work is done by the
library (``ppojax.train.run.build_run`` and ``Run.train``; ``ppojax.train.sweep_job.run_sweep``).

    python experiments/ppo_gpt2.py [--config configs/NAME.yaml] [--run-dir DIR] [--iterations N] [--seed S]
                                   [--set a.b=value ...] [--import MODULE ...]
    python experiments/sweep.py --config CONFIG [--seeds N | --seeds 3,7,11] [--grid a.b=v1,v2,...]...

Without ``--config``, ``ppo_gpt2.py`` runs the default, ``configs/smollm2_sentiment.yaml`` (SmolLM2-135M-Instruct
with LoRA made more positive against VADER, offline), and ``sweep.py`` ``configs/offline.yaml``. ``--import
MODULE`` (repeatable) imports a module before the config is resolved, as the config's ``imports:`` list does, so
that what it registers (a reward, an estimator, a loss, a model family) can be named in the YAML and in ``--set``.
Every input problem is one line on stderr and exit code 2.

Signals: SIGINT or SIGTERM during start-up (imports, checks, loading, compiling; before the training loop installs
its own handler) end the job with one line, the run directory's lock released and a directory the job created
removed; during training the loop finishes its iteration and saves (exit 0, rerun to resume); a second SIGINT, or a
signal after the loop (the export), ends the job with one line, keeping the checkpoints already saved. The exit
code of an interrupted job is the shell's: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]  # ppojax/cli.py -> the checkout
DEFAULT_CONFIG = REPO_ROOT / "configs" / "smollm2_sentiment.yaml"
"""The run of ``experiments/ppo_gpt2.py`` without ``--config`` (README.md's main command)."""
DEFAULT_SWEEP_CONFIG = REPO_ROOT / "configs" / "offline.yaml"
"""The config of ``experiments/sweep.py`` without ``--config``."""


def _format_warning(message, category, filename, lineno, line=None):
    return f"[ppojax] {category.__name__}: {message}\n"


def _not_torch_missing(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found")


def quiet_third_party() -> None:
    """One readable ``[ppojax]`` line per Python warning, and no transformers "PyTorch was not found" notice
    (printed at import; ppojax never needs torch, so it is noise for every offline start). Call before importing
    transformers."""
    import warnings

    warnings.formatwarning = _format_warning
    log = logging.getLogger("transformers")
    if _not_torch_missing not in log.filters:
        log.addFilter(_not_torch_missing)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM outside the training loop's own handler (start-up, the export): raised on the main thread,
    so that ``build_run`` and ``Run.close`` release what they hold on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_pending: dict = {}
"""The signal being acted on (``signum``), until the job's way out has begun."""


def _unwinding() -> bool:
    """An interruption is already on its way out (some frame is handling it: an ``except``/``finally``/``__exit__``
    releasing the lock): a further signal must not cut that short."""
    return isinstance(sys.exc_info()[1], KeyboardInterrupt)


def _raise_interrupted(signum, frame):
    if _unwinding():
        return
    _pending.setdefault("signum", signum)
    # A raise inside a gc or weakref callback is swallowed ("Exception ignored"): raise again from a timer until
    # one gets through (``interrupted_exit`` and leaving ``interrupts_raise`` stop it).
    signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
    raise Interrupted(_pending["signum"])


def _raise_pending(signum, frame):
    if "signum" in _pending and not _unwinding():
        raise Interrupted(_pending["signum"])


def _stop_retrying() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    _pending.clear()


def _quiet_unraisable(previous):
    def hook(unraisable):
        if not isinstance(unraisable.exc_value, Interrupted):  # ours is retried: no "Exception ignored" notice
            previous(unraisable)
    return hook


@contextlib.contextmanager
def interrupts_raise():
    """SIGINT and SIGTERM raise :class:`Interrupted` for the block's duration (main thread only; the previous
    handlers come back afterwards). The training loop's ``StopSignal`` takes over while it runs. A signal whose
    handler is ``SIG_IGN`` when the block starts (a background job of a shell) stays ignored."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    for s in (signal.SIGINT, signal.SIGTERM):
        if previous[s] is not signal.SIG_IGN:
            signal.signal(s, _raise_interrupted)
    signal.signal(signal.SIGALRM, _raise_pending)
    previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable(sys.unraisablehook)
    try:
        yield
    finally:
        _stop_retrying()
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h)


def interrupted_exit(prog: str, signum: int, started: bool) -> int:
    """One line for a job ended by a signal; the shell's exit code for it (128 + the signal's number)."""
    _stop_retrying()
    name = signal.Signals(signum).name
    if started:
        print(f"{prog}: error: interrupted by {name}; the checkpoints already saved are kept (a save in progress "
              "is lost); rerun the same command to resume", file=sys.stderr, flush=True)
    else:
        print(f"{prog}: error: interrupted by {name} during start-up; nothing was written", file=sys.stderr,
              flush=True)
    return 128 + signum


def _add_config_flags(p: argparse.ArgumentParser, default: Path) -> None:
    p.add_argument("--config", type=str, default=None, help=f"YAML config (default: configs/{default.name})")
    p.add_argument("--iterations", type=int, default=None,
                   help="total PPO iterations of the run, counting those done before a resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=value",
                   help="override a config field by dotted path (repeatable)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE before resolving the config, so that what it registers can be named in it "
                        "(repeatable; added to the config's `imports:`)")


# ----------------------------------------------------------------------------------------------------------------
# experiments/ppo_gpt2.py


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ppo_gpt2.py",
        description="PPO-RLHF of a language model. Without --config, the default: "
                    f"configs/{DEFAULT_CONFIG.name} (SmolLM2-135M-Instruct + LoRA, offline).",
    )
    _add_config_flags(p, DEFAULT_CONFIG)
    p.add_argument("--run-dir", type=str, default=None, help="where the run writes (default: runs/<config name>)")
    p.add_argument("--seed", type=int, default=None, help="seed of sampling, shuffling and data order")
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


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.iterations is not None:
        overrides.append(f"iterations={args.iterations}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    return overrides


def build_config(args: argparse.Namespace):
    """``(ExperimentConfig, config_dir)`` from the flags (``ppojax.train.run.resolve_config``)."""
    from ppojax.train.run import RunError, resolve_config

    path = Path(args.config) if args.config else DEFAULT_CONFIG
    if not path.exists():
        raise RunError(f"config file {path} does not exist")
    return resolve_config(path, overrides=_overrides(args), imports=args.imports)


def _start_processes(args: argparse.Namespace) -> None:
    """Join the multi-process run, if any (fails fast, before anything compiles)."""
    from ppojax.parallel import distributed
    from ppojax.train.run import RunError

    try:
        distributed.initialize(distributed.DistributedConfig.from_env(
            args.coordinator, args.num_processes, args.process_id, args.distributed_timeout))
    except distributed.DistributedError as e:
        raise RunError(str(e)) from None


def run(args: argparse.Namespace, progress: Optional[dict] = None) -> int:
    """The job of ``ppo_gpt2.py``; ``progress['started']`` becomes True once the run is built (its lock held, its
    state restored), which tells an interruption during start-up from one during the run."""
    import jax

    from ppojax.train import run as runs

    progress = {} if progress is None else progress

    cfg, config_dir = build_config(args)
    name = Path(args.config).stem if args.config else DEFAULT_CONFIG.stem
    run_dir = (Path(args.run_dir) if args.run_dir else REPO_ROOT / "runs" / name).expanduser().resolve()
    _start_processes(args)
    if args.export_checkpoint is not None:
        mesh = runs.run_mesh(cfg, args.mesh)
        return runs.export_checkpoint(args.export_checkpoint, cfg, config_dir, run_dir, mesh,
                                      jax.process_index() == 0)
    with runs.build_run(cfg, run_dir, config_dir=config_dir, mesh=args.mesh) as run_:
        progress["started"] = True
        return run_.train().exit_code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``experiments/ppo_gpt2.py``."""
    progress = {"started": False}
    with interrupts_raise():
        try:
            quiet_third_party()
            args = parse_args(argv)
            from ppojax.parallel import supervisor

            if supervisor.wanted(args.coordinator, args.num_processes):  # a parent that outlives JAX's aborts
                return supervisor.run(list(sys.argv[1:] if argv is None else argv))
            if args.help_config:
                from ppojax.io import configlib
                from ppojax.train.config import ExperimentConfig

                print(configlib.describe(ExperimentConfig))
                return 0
            from ppojax.train.run import RunError

            from ppojax.parallel import distributed

            code = 2
            try:
                code = run(args, progress)
                return code
            except RunError as e:
                distributed.before_error()  # a peer that died is said by the lifelines, in one line
                print(f"ppo_gpt2.py: error: {e}", file=sys.stderr)
                return 2
            finally:
                distributed.leave(code)  # the other processes of a multi-process run: this one is done
        except KeyboardInterrupt as e:  # a signal outside the loop, or the loop's second SIGINT
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            return interrupted_exit("ppo_gpt2.py", signum, progress["started"])


# ----------------------------------------------------------------------------------------------------------------
# experiments/evaluate.py


def parse_evaluate_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="evaluate.py", description="Evaluate a model on a task's held-out prompts: accuracy (verifiable "
        "tasks) and mean score, with every prompt, response and target in the JSON.")
    p.add_argument("--model", required=True, help="an export directory, a hub id or a .gguf file")
    p.add_argument("--task", required=True, help="a registered task (arithmetic, gsm8k, sentiment, file, or one "
                   "from --import)")
    p.add_argument("--num", type=int, default=None, help="held-out prompts (default: the config's eval.num_prompts)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed when --samples > 1 (eval.seed)")
    p.add_argument("--samples", type=int, default=None,
                   help="responses per prompt, k (k > 1 samples at --temperature and reports pass@k; default 1: "
                        "greedy)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature for --samples > 1")
    p.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    p.add_argument("--config", type=str, default=None,
                   help="take the prompt rendering, task kwargs and generation settings from this config (e.g. a "
                        "run's config.yaml), so that the numbers match the run's own eval/ rows")
    p.add_argument("--chat", choices=("auto", "yes", "no"), default="auto",
                   help="render prompts through the chat template (auto: when the config does not say, if the "
                        "tokenizer has one)")
    p.add_argument("--show", type=int, default=8, help="rows of the printed table")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=value",
                   help="override a config field (repeatable)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module that registers a task or reward (repeatable)")
    return p.parse_args(argv)


def _evaluate_config(args: argparse.Namespace):
    """The experiment config an evaluation runs under: the --config's (or the defaults), with the model, task and
    evaluation settings of the flags; LoRA off (an export is merged) and nothing trained or written."""
    from ppojax.io import configlib
    from ppojax.train.run import RunError, resolve_config

    data: dict = {}
    config_dir = None
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise RunError(f"config file {path} does not exist")
        try:
            data = configlib.load_yaml(path)
        except configlib.ConfigError as e:
            raise RunError(f"config {path}: {e}") from None
        config_dir = path.resolve().parent
    for name in ("num", "samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise RunError(f"--{name} must be >= 1, got {value}")
    model = args.model
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    overrides = [f"model.name_or_path={model}", f"tokenizer={model}", "lora.rank=0", f"task.name={args.task}",
                 "eval.every=1", "export=false"]
    if args.task != data.get("task", {}).get("name", args.task):
        overrides.append("task.kwargs={}")  # the config's kwargs are another task's
    if args.num is not None:
        overrides.append(f"eval.num_prompts={args.num}")
    if args.samples is not None:
        overrides += [f"eval.samples_per_prompt={args.samples}", f"eval.greedy={str(args.samples == 1).lower()}"]
    if args.seed is not None:
        overrides.append(f"eval.seed={args.seed}")
    if args.temperature is not None:
        overrides.append(f"eval.temperature={args.temperature}")
    if args.chat != "auto":
        overrides.append(f"prompts.chat={str(args.chat == 'yes').lower()}")
    cfg, config_dir = resolve_config(data, overrides=overrides + list(args.overrides), imports=args.imports,
                                     config_dir=config_dir)
    if args.chat == "auto" and not (data.get("prompts") or {}).get("chat"):
        import dataclasses

        import ppojax

        try:
            tokenizer = ppojax.load_tokenizer(cfg.tokenizer)
        except (OSError, ValueError) as e:
            raise RunError(f"--model {args.model}: {e}") from None
        if getattr(tokenizer, "chat_template", None) and "prompts" not in data:
            cfg = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, chat=True))
    return cfg, config_dir


def evaluate_run(args: argparse.Namespace) -> dict:
    """Build the model and task, evaluate, print a table; returns the JSON record."""
    from ppojax.io import configlib
    from ppojax.train import evaluation
    from ppojax.train.run import build_run

    cfg, config_dir = _evaluate_config(args)
    with build_run(cfg, None, config_dir=config_dir) as run_:
        cfg = run_.config
        settings = evaluation.settings_of(cfg)
        result = run_.evaluate(settings)
        t = run_.task
    if cfg.env.name is not None:
        return _episode_record(args, cfg, settings, result)
    k = settings.samples
    items = []
    for i, prompt in enumerate(t.eval_prompts):
        rows = range(i * k, (i + 1) * k)
        item = {"prompt": prompt, "response": result.responses[i * k], "target": t.eval_targets[i]}
        if result.correct is not None:
            item["correct"] = bool(result.correct[i * k])
        item["score"] = float(result.scores[i * k])
        if k > 1:
            item["responses"] = [result.responses[r] for r in rows]
            item["scores"] = [float(result.scores[r]) for r in rows]
            if result.correct is not None:
                item["corrects"] = [bool(result.correct[r]) for r in rows]
        items.append(item)
    m = result.metrics
    record = {
        "model": args.model, "task": cfg.task.name, "num": len(items), "samples": k, "greedy": settings.greedy,
        "seed": settings.seed,
        "settings": {"task": configlib.to_dict(cfg.task), "prompts": configlib.to_dict(cfg.prompts),
                     "max_new_tokens": settings.max_new_tokens, "temperature": None if settings.greedy else
                     settings.temperature, "eos_token_id": cfg.ppo.eos_token_id,
                     "stop_token_ids": [list(q) for q in cfg.ppo.stop_token_ids],
                     "reward": configlib.to_dict(cfg.reward)},
        "score_mean": m["eval/score_mean"], "response_length": m["eval/response_length"], "ended": m["eval/ended"],
    }
    if "eval/accuracy" in m:
        record["accuracy"] = m["eval/accuracy"]
    for key, value in m.items():
        if key.startswith(("eval/pass@", "eval/mean@")):
            record[key.removeprefix("eval/")] = value
    record["items"] = items
    _print_table(record, args.show)
    return record


def _episode_record(args, cfg, settings, result) -> dict:
    """``evaluate_run`` of a multi-turn config: one item per held-out episode (its turns, score, success)."""
    from ppojax.io import configlib
    from ppojax.train.multiturn import sample_rows

    items = []
    for ep, n in result.episodes:
        items += sample_rows(ep, n)[:n]
    m = result.metrics
    record = {"model": args.model, "task": cfg.task.name, "env": configlib.to_dict(cfg.env), "num": len(items),
              "greedy": settings.greedy, "seed": settings.seed, "success": m["eval/success"],
              "accuracy": m["eval/accuracy"], "score_mean": m["eval/score_mean"], "turns": m["eval/turns"],
              "truncated": m["eval/truncated"], "items": items}
    print(f"{cfg.task.name} episodes with env {cfg.env.name!r} on {args.model}: {len(items)} held-out episodes, "
          + ("greedy" if settings.greedy else "sampled"))
    for item in items[:args.show]:
        turns = " | ".join(f"{t['role']}: {' '.join(str(t['content']).split())[:30]}" for t in item["turns"])
        print(f"  {'ok ' if item['success'] else 'no '}{item['score']:+.2f} {turns[:100]}")
    print(f"  success {record['success']:.3f} | score_mean {record['score_mean']:.3f} | turns {record['turns']:.2f} | "
          f"truncated {record['truncated']:.3f}")
    return record


def _print_table(record: dict, show: int) -> None:
    def cut(text, n):
        text = " ".join(str(text).split())
        return text if len(text) <= n else text[:n - 1] + "…"

    head = f"{record['task']} on {record['model']}: {record['num']} held-out prompts, " + (
        "greedy" if record["greedy"] else f"{record['samples']} samples each")
    print(head)
    for item in record["items"][:show]:
        mark = ("ok " if item["correct"] else "no ") if "correct" in item else f"{item['score']:+.2f} "
        prompt = item["prompt"].rsplit("user\n", 1)[-1] if "<|im_start|>" in item["prompt"] else item["prompt"]
        print(f"  {mark}{cut(prompt.replace('<|im_end|>', '').replace('<|im_start|>assistant', ''), 40):40s} -> "
              f"{cut(item['response'], 50):50s}" + (f" (target {item['target']})" if item["target"] is not None
                                                     else ""))
    parts = [f"score_mean {record['score_mean']:.3f}"]
    if "accuracy" in record:
        parts.insert(0, f"accuracy {record['accuracy']:.3f}")
    parts += [f"{k} {v:.3f}" for k, v in record.items() if k.startswith(("pass@", "mean@"))]
    parts.append(f"mean length {record['response_length']:.1f} tokens, {record['ended'] * 100:.0f}% ended")
    print("  " + " | ".join(parts))


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    """``experiments/evaluate.py``."""
    with interrupts_raise():
        try:
            quiet_third_party()
            args = parse_evaluate_args(argv)
            from ppojax.train.run import RunError

            try:
                record = evaluate_run(args)
            except RunError as e:
                print(f"evaluate.py: error: {e}", file=sys.stderr)
                return 2
            if args.out:
                from ppojax.io.atomic import atomic_write_text

                out = Path(args.out)
                try:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(out, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
                except OSError as e:
                    print(f"evaluate.py: error: could not write {out}: {e.strerror or e}", file=sys.stderr)
                    return 1
                print(f"wrote {out}")
            return 0
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            return interrupted_exit("evaluate.py", signum, False)


# ----------------------------------------------------------------------------------------------------------------
# experiments/sweep.py


def parse_sweep_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sweep.py", description="Seeds x hyperparameter grids, one compiled program per "
                                "group of runs that differ only in array hyperparameters.")
    _add_config_flags(p, DEFAULT_SWEEP_CONFIG)
    p.add_argument("--seeds", type=str, default=None, help="N (seeds 0..N-1) or a list 3,7,11 (default: the config's)")
    p.add_argument("--grid", action="append", default=[], metavar="a.b=v1,v2,...",
                   help="a field and its values; several --grid flags make a Cartesian product")
    p.add_argument("--run-dir", type=str, default=None, help="where the sweep writes (default runs/sweep-<config>)")
    p.add_argument("--vmap-width", type=str, default="auto", metavar="auto|all|N",
                   help="runs batched per vmap on a device: all of them, N, or auto (1 on CPUs, where batching gains "
                        "little and width 1 keeps every run bit-identical to the single run; all elsewhere)")
    return p.parse_args(argv)


def sweep_main(argv: Optional[Sequence[str]] = None) -> int:
    """``experiments/sweep.py``."""
    quiet_third_party()
    args = parse_sweep_args(argv)
    from ppojax.train.sweep_job import SweepRunError, run_sweep

    path = Path(args.config) if args.config else DEFAULT_SWEEP_CONFIG
    run_dir = (Path(args.run_dir) if args.run_dir else REPO_ROOT / "runs" / f"sweep-{path.stem}")
    try:
        return run_sweep(path, seeds=args.seeds, grid=args.grid, run_dir=run_dir, overrides=_overrides(args),
                         imports=args.imports, vmap_width=args.vmap_width)
    except SweepRunError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2


__all__ = ["DEFAULT_CONFIG", "DEFAULT_SWEEP_CONFIG", "REPO_ROOT", "Interrupted", "build_config", "interrupted_exit",
           "interrupts_raise", "main", "parse_args", "parse_sweep_args", "quiet_third_party", "sweep_main"]
