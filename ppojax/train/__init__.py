"""Building and driving runs.

    build_run(config, run_dir=None) -> Run     everything a run needs, checked before anything compiles (run.py)
    Run.train()                                the run through the one training loop, with its files
    loop.train / loop.train_step               the one loop and one PPO iteration (loop.py)
    sweep.sweep / sweep_job.run_sweep          seeds x grids in one compiled program per group
    config.ExperimentConfig                    the typed experiment config (config.py)
"""

from ppojax.train.run import Run, RunError, RunOutcome, build_run, resolve_config

_LAZY = {"train": "ppojax.train.loop", "train_step": "ppojax.train.loop"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ppojax.train' has no attribute {name!r}")


__all__ = ["Run", "RunError", "RunOutcome", "build_run", "resolve_config", "train", "train_step"]
