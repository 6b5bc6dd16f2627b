"""Where one PPO iteration of a ``vs_trl.py`` job spends its time, per XLA op, on this machine.

Builds the job's ppojax side (random GPT-2 weights of the job's shape, GPT-2's vocabulary, the same PPO settings as
``vs_trl.py``), runs two warm-up iterations, then traces one ``rollout`` and one ``update`` with the jax profiler
(``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`` makes XLA:CPU emit one trace event per executed op) and dumps
the optimised HLO to map every op to its source (``op_name`` metadata). Ops are grouped:

- ``vocab matmul``: the three matmuls of the tied LM head (logits, d hidden, d embedding);
- ``vocab elementwise``: the rest of the vocabulary-sized work (log-sum-exp chunks, softmax gradients);
- ``optimizer``: Adam on the parameters (``optimizer_step``'s scope; in older traces, the elementwise updates
  outside the gradient);
- ``actor trunk`` / ``critic trunk`` (``fwd`` / ``bwd``): the transformer blocks, matmuls and elementwise apart;
- ``sampling``: the decode loop's sampler; ``other``: everything else.

Caveat: XLA:CPU may run independent ops concurrently (the actor's and the critic's backward passes), so the sum of
op durations can exceed the wall time; the JSON reports both. Matmul GFLOP/s per group are not computed from these
durations for the same reason.

    python benchmarks/profile_iteration.py --job b     # writes benchmarks/results/profile_b_cpu.json
    python benchmarks/profile_iteration.py --job a --epochs 1   # job (a), one epoch traced (8 -> 2 steps)
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=("a", "b", "tiny"), default="b")
    p.add_argument("--epochs", type=int, default=None, help="PPO epochs (default: the job's)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default results/profile_<job>_cpu.json)")
    p.add_argument("--top", type=int, default=25, help="ops listed individually")
    args = p.parse_args(argv)
    if args.out is None and args.job != "tiny":
        args.out = HERE / "results" / f"profile_{args.job}_cpu.json"
    return args


def categorize(name: str, shape: str, op_name: str, vocab: int) -> str:
    """The group of one optimised-HLO op from its name, result shape and ``op_name`` metadata."""
    bwd = "transpose(" in op_name
    last = op_name.rsplit("/", 1)[-1]
    if any(e in op_name for e in ("nd,vd->nv", "nv,vd->nd", "nv,nd->vd")):
        return "vocab matmul"
    if "optimizer_step" in op_name:  # the fused Adam update's scope (ppojax.rl.optimizer.optimizer_step)
        return "optimizer"
    if "while/body" not in op_name and ("sample" in op_name or "_inverse_cdf" in op_name):
        return "sampling"
    is_vocab = str(vocab) in shape or "token_logprobs" in op_name
    if is_vocab and not bwd and last in ("add", "integer_pow", "sqrt", "div", "mul", "sub") \
            and "jvp(" not in op_name:
        return "optimizer"
    if is_vocab:
        return "vocab elementwise"
    model = "critic trunk" if "ScalarHead" in op_name else "actor trunk" if "GPT2Trunk" in op_name else None
    if model:
        kind = "matmul" if last == "dot_general" or name.startswith("dot") else "elementwise"
        return f"{model} {'bwd' if bwd else 'fwd'} {kind}"
    if "jvp(" not in op_name and "transpose(" not in op_name and last in ("add", "integer_pow", "sqrt", "div",
                                                                          "mul", "sub", "select_n"):
        return "optimizer"
    return "other"


def hlo_ops(hlo_text: str) -> dict:
    """``{op name: (result shape, op_name metadata)}`` of an optimised HLO module."""
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m and m.group(1) not in ops:
            o = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (m.group(2), o.group(1) if o else "")
    return ops


def op_durations(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    files = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    if not files:
        raise RuntimeError(f"no trace written under {trace_dir}")
    data = json.load(gzip.open(files[0]))
    total, count = collections.Counter(), collections.Counter()
    for e in data["traceEvents"]:
        if e.get("ph") == "X" and not e["name"].startswith(("$", "Thunk", "Slinky", "Pjit", "Parse", "Python")):
            total[e["name"]] += e["dur"] / 1e3  # ms
            count[e["name"]] += 1
    return total, count


def summarize(total, count, ops, vocab, wall_ms, steps, top):
    groups = collections.Counter()
    for name, ms in total.items():
        shape, op_name = ops.get(name, ("?", ""))
        groups[categorize(name, shape, op_name, vocab)] += ms
    busy = sum(groups.values())
    return {
        "wall_ms": wall_ms,
        "sum_of_op_ms": busy,
        "steps": steps,
        "groups_ms": {k: round(v, 2) for k, v in groups.most_common()},
        "groups_share_of_op_time": {k: round(v / busy, 4) for k, v in groups.most_common()},
        "top_ops": [{"op": k, "ms": round(v, 2), "calls": count[k], "shape": ops.get(k, ("?", ""))[0],
                     "group": categorize(k, *ops.get(k, ("?", "")), vocab), "source": ops.get(k, ("?", ""))[1][-120:]}
                    for k, v in total.most_common(top)],
    }


def main(argv=None):
    args = parse_args(argv)
    dump = tempfile.mkdtemp(prefix="ppojax_hlo_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
                               f" --xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*inner.*")
    import _env
    import jax
    import jax.numpy as jnp
    import numpy as np

    import _loop
    import ppojax
    import vs_trl
    from ppojax.train import loop

    j = dict(vs_trl.JOBS[args.job])
    if args.epochs:
        j["epochs"] = args.epochs
    load_before = _env.load_sample()
    _env.warn_if_busy(load_before)
    config = ppojax.GPT2Config(vocab_size=vs_trl.VOCAB, n_positions=1024, n_embd=j["n_embd"], n_layer=j["n_layer"],
                               n_head=j["n_head"])
    params = ppojax.init_params(config, jax.random.key(0))
    rm = ppojax.init_value_params(config, params, head_init_std=(j["n_embd"] + 1) ** -0.5, key=jax.random.key(1))
    ppo, opt = vs_trl.ppojax_configs(j)
    state = ppojax.create_train_state(config, params, ppo=ppo, reward=ppojax.rewards.reward_model(config, rm),
                                      key=jax.random.key(0), optimizer=opt, total_iterations=10)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(0, vs_trl.VOCAB, (j["batch"], j["query"])), jnp.int32)
    mask = jnp.ones_like(prompts)

    # Warm-up: two iterations of the library's loop, rollout, scoring and update as the separate programs (each
    # waited for) that are traced below.
    state = loop.train(state, _loop.Prompts(prompts, mask), iterations=2, donate=True, timing=True).state
    # One more iteration's phases, not a loop: the rollout traced on its own, its scores, then the update traced.
    with tempfile.TemporaryDirectory() as rollout_trace, tempfile.TemporaryDirectory() as update_trace:
        jax.profiler.start_trace(rollout_trace)
        t0 = time.perf_counter()
        state, r = ppojax.rollout(state, prompts, mask)
        jax.block_until_ready(r)
        rollout_ms = (time.perf_counter() - t0) * 1e3
        jax.profiler.stop_trace()
        rollout_ops = op_durations(rollout_trace)
        scores = jax.block_until_ready(ppojax.score_rollout(state, r))
        t0 = time.perf_counter()  # before the trace starts, as this benchmark has always timed the update
        jax.profiler.start_trace(update_trace)
        jax.block_until_ready(ppojax.update(state, r, scores, donate=True))
        update_s = time.perf_counter() - t0
        jax.profiler.stop_trace()
        update_ops = op_durations(update_trace)

    modules = {}
    for path in glob.glob(os.path.join(dump, "*jit_inner*.cpu_after_optimizations.txt")):
        text = open(path).read()
        modules["update" if "transpose(jvp" in text else "rollout"] = hlo_ops(text)
    steps = j["epochs"] * j["minibatches"]
    result = {
        "benchmark": "profile_iteration",
        "date": _env.now_utc(),
        "job": args.job,
        "shape": j,
        "machine": _env.machine_info(),
        "versions": _env.versions(_env.DEFAULT_PACKAGES),
        "load_before": load_before,
        "note": "op durations from XLA:CPU trace events; independent ops may overlap on the cores, so sum_of_op_ms "
                "can exceed wall_ms. The traced calls run with the profiler on (slower than untraced).",
        "rollout": summarize(*rollout_ops, modules.get("rollout", {}), vs_trl.VOCAB, rollout_ms, 1, args.top),
        "update": summarize(*update_ops, modules.get("update", {}), vs_trl.VOCAB, update_s * 1e3, steps, args.top),
        "load_after": _env.load_sample(),
    }
    for phase in ("rollout", "update"):
        r = result[phase]
        print(f"{phase}: wall {r['wall_ms']:.0f} ms, op time {r['sum_of_op_ms']:.0f} ms")
        for k, v in r["groups_ms"].items():
            print(f"  {v:9.1f} ms  {100 * r['groups_share_of_op_time'][k]:5.1f}%  {k}")
    if args.out is not None:
        print(f"wrote {_env.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
