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
