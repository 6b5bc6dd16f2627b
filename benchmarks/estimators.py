"""Peak memory and s/iteration of each advantage estimator on the same task, at equal sampled tokens.

    python benchmarks/estimators.py                        # configs/grpo_offline.yaml, 5 estimators, 3 repeats
    python benchmarks/estimators.py --iterations 4 --repeats 1 --out /tmp/est.json

Each measurement is one child process (so peak RSS is the estimator's own) running ``--iterations`` iterations of
the config with ``ppo.advantage_estimator`` set, every estimator at ``samples_per_prompt`` 4 and the config's batch
(equal sampled tokens). The estimators run in a rotating order over the repeats (a slow spell hits all of them).
Reported per estimator: the median and range over repeats of the median s/iteration after the first (compiling)
iteration, the peak RSS, and the parameter and optimizer-state bytes of the train state (the critic's share shows
there: GAE keeps a critic and its Adam moments, the others none). JSON under ``benchmarks/results/`` with the
machine and versions; a busy machine is recorded and refuses the write unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
BUSY_CORES = 0.25


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "grpo_offline.yaml"))
    p.add_argument("--estimators", default=",".join(ESTIMATORS))
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--child", metavar="ESTIMATOR", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(config: str, estimator: str, iterations: int) -> dict:
    """One estimator's run in this (fresh) process: per-iteration seconds, peak RSS, state bytes."""
    import resource

    import jax

    from ppojax.io import configlib
    from ppojax.io.data import PromptLoader
    from ppojax.io.tokenizer import load_tokenizer
    from ppojax.train import loop
    from ppojax.train import run as runner
    from ppojax.train.build import create_state
    from ppojax.train.config import ExperimentConfig

    path = Path(config)
    data = configlib.apply_overrides(configlib.load_yaml(path), [f"ppo.advantage_estimator={estimator}",
                                                                "ppo.samples_per_prompt=4",
                                                                f"iterations={iterations}"], ExperimentConfig)
    cfg = configlib.from_dict(ExperimentConfig, data)
    tok = load_tokenizer(cfg.tokenizer)
    _, ids, mask = runner.load_prompts(cfg, path.parent, tok)
    model_config, params = runner.build_model(cfg)
    reward, host = runner.build_reward(cfg, tok, model_config, path.parent)
    state = create_state(cfg, model_config, params, reward)
    nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))
    sizes = {"params_bytes": nbytes(state.params), "opt_state_bytes": nbytes(state.opt_state),
             "frozen_bytes": nbytes(state.frozen)}
    loader = PromptLoader(ids, mask, cfg.ppo.prompts_per_iteration, cfg.seed, cfg.prompts.shuffle)
    seconds, scores = [], []

    def record(info):
        seconds.append(info.metrics["time_s"])  # the loop's wall time of the iteration, metrics on the host
        scores.append(info.metrics["score_mean"])

    loop.train(state, loader, iterations=iterations, host_reward=host, donate=True, callbacks=[record], check=None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"estimator": estimator, "seconds": seconds, "peak_rss_bytes": peak, "scores": scores, **sizes}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def summarise(records: list[dict]) -> dict:
    """Per estimator: median (and range over repeats) of each repeat's median s/iteration after the first."""
    out = {}
    for name in dict.fromkeys(r["estimator"] for r in records):
        mine = [r for r in records if r["estimator"] == name]
        per_repeat = [_median(r["seconds"][1:]) for r in mine if len(r["seconds"]) > 1]
        out[name] = {
            "s_per_iteration_median": _median(per_repeat) if per_repeat else None,
            "s_per_iteration_range": [min(per_repeat), max(per_repeat)] if per_repeat else None,
            "peak_rss_bytes_median": _median([r["peak_rss_bytes"] for r in mine]),
            "params_bytes": mine[0]["params_bytes"], "opt_state_bytes": mine[0]["opt_state_bytes"],
            "frozen_bytes": mine[0]["frozen_bytes"], "repeats": len(mine),
        }
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.config, args.child, args.iterations)))
        return 0
    names = [n.strip() for n in args.estimators.split(",") if n.strip()]
    load = _env.OtherLoad()
    records = []
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no estimator always runs first
        for name in order:
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--config", args.config,
                                   "--iterations", str(args.iterations)], capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
            records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"[repeat {rep}] {name}: median {_median(records[-1]['seconds'][1:]):.2f} s/iteration, peak RSS "
                  f"{records[-1]['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    other = load.cores()
    result = {"benchmark": "estimators", "config": str(Path(args.config).relative_to(REPO))
              if Path(args.config).is_relative_to(REPO) else args.config, "iterations": args.iterations,
              "machine": _env.machine_info(), "versions": _env.versions(), "date": _env.now_utc(),
              "other_processes_cores": other, "busy": other > BUSY_CORES, "summary": summarise(records),
              "records": records}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "estimators_cpu.json"
    print(json.dumps(result["summary"], indent=1))
    if result["busy"] and not args.force:
        print(f"not writing {out}: other processes kept {other} cores busy (--force writes anyway)", file=sys.stderr)
        return 1
    _env.write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
