"""The PPO update on responses of very different lengths: padded (``ppo.length_buckets: 0``) against bucketed
(``ppo.length_buckets: N``, each minibatch at the narrowest of N widths that holds its longest response).

One process, one batch: a hand-built rollout (``ppojax.rl.iteration.Rollout``) of random tokens where half of the
rows (``--short-share``) end in the first quarter of the response budget (uniformly in [1, response / 4]) and the
others use all of it, with random log-probs, values and scores. The same model params and optimizer state go into
both sides' jitted ``ppojax.update`` (a separate critic, GAE, the whole PPO update: ``epochs x minibatches``
optimizer steps), and the state is not advanced, so every call does the same work. Each side is compiled and run
once first (the compile is reported on its own), then ``--repeats`` rounds time ``--calls`` calls of each side, the
side that goes first rotating (``_interleave.run_interleaved``), with the load of other processes probed before each
round and measured during each run. Reported: seconds per update (median, spread) per side and the ratio padded /
bucketed, paired by round; and the work each side does (``work_padded_over_bucketed``: sequence positions, prompt
included, and response positions, which alone meet the vocabulary), the bound on the speed-up that per-step costs
(the optimizer step over every parameter) lower further.

    python benchmarks/bucketed_update.py --force   # writes benchmarks/results/bucketed_update_cpu.json (~5 min)
    python benchmarks/bucketed_update.py --force --short-share 0.75 --out benchmarks/results/bucketed_update_3q_cpu.json
    python benchmarks/bucketed_update.py --tiny --repeats 2 --out /tmp/b.json   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import _env
import _interleave

DEFAULT_OUT = Path(__file__).parent / "results" / "bucketed_update_cpu.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax")
SIDES = ("padded", "bucketed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=50257, help="GPT-2's vocabulary by default")
    p.add_argument("--batch", type=int, default=32, help="responses per update")
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--short-share", type=float, default=0.5,
                   help="share of the rows that end in the first quarter of the budget (the others use all of it)")
    p.add_argument("--buckets", type=int, default=8, help="ppo.length_buckets of the bucketed side")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--calls", type=int, default=2, help="timed updates per side per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--force", action="store_true", help="write the result even if the machine was busy")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.width, args.heads, args.vocab, args.response_len = 2, 32, 4, 64, 16
        if args.out == DEFAULT_OUT:
            args.out = None
    return args


def spread_batch(args):
    """The rollout, scores and the shared params: half of the rows end in the first quarter of the budget."""
    import jax
    import jax.numpy as jnp

    import ppojax
    from ppojax.rl.iteration import Rollout

    rng = np.random.RandomState(args.seed)
    B, P, R = args.batch, args.prompt_len, args.response_len
    lengths = np.full(B, R)
    short = rng.permutation(B)[: int(round(B * args.short_share))]
    lengths[short] = rng.randint(1, R // 4 + 1, len(short))
    mask = (np.arange(R)[None, :] < lengths[:, None]).astype(np.int32)
    model = ppojax.GPT2Config(vocab_size=args.vocab, n_positions=P + R, n_embd=args.width, n_layer=args.layers,
                              n_head=args.heads)
    pad = args.vocab
    tokens = np.where(mask > 0, rng.randint(0, args.vocab, (B, R)), pad).astype(np.int32)
    real = lambda x: jnp.asarray(np.where(mask > 0, x, 0.0).astype(np.float32))
    logprobs = -rng.exponential(3.0, (B, R))
    rollout = Rollout(
        prompt_ids=jnp.asarray(rng.randint(0, args.vocab, (B, P)).astype(np.int32)),
        prompt_mask=jnp.ones((B, P), jnp.int32), tokens=jnp.asarray(tokens), mask=jnp.asarray(mask),
        logprobs=real(logprobs), ref_logprobs=real(logprobs + 0.05 * rng.randn(B, R)),
        values=real(0.1 * rng.randn(B, R)), entropy=real(np.full((B, R), 3.0)), found_stop=jnp.ones((B,), bool))
    scores = jnp.asarray(rng.randn(B).astype(np.float32))
    params = ppojax.init_params(model, jax.random.key(args.seed))
    return model, params, rollout, scores, lengths


def make_state(args, model, params, buckets):
    import jax

    import ppojax
    from ppojax.rl.config import OptimizerConfig, PPOConfig
    from ppojax.rl.kl import KLControlConfig

    ppo = PPOConfig(batch_size=args.batch, minibatch_size=args.minibatch, ppo_epochs=args.epochs,
                    response_length=args.response_len, kl=KLControlConfig(kind="fixed", init_coef=0.05),
                    length_buckets=buckets)
    return ppojax.create_train_state(model, params, ppo=ppo, reward=None, key=jax.random.key(args.seed),
                                     optimizer=OptimizerConfig(learning_rate=1e-5))


def main(argv=None):
    args = parse_args(argv)
    load_before = _env.load_sample()
    _env.warn_if_busy(load_before)
    others = _env.OtherLoad()
    import jax

    import ppojax

    model, params, rollout, scores, lengths = spread_batch(args)
    states = {"padded": make_state(args, model, params, 0), "bucketed": make_state(args, model, params, args.buckets)}
    padding_share = 1.0 - lengths.sum() / lengths.size / args.response_len

    def call(side):
        return jax.block_until_ready(ppojax.update(states[side], rollout, scores))

    first_call_s = {}
    for side in SIDES:
        t0 = time.perf_counter()
        call(side)
        first_call_s[side] = time.perf_counter() - t0
        print(f"{side}: first call (compile + run) {first_call_s[side]:.1f} s", flush=True)

    def run_one(variant, repeat):
        probe = _env.OtherLoad()
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            call(variant.name)
            times.append(time.perf_counter() - t0)
        s = float(np.median(times))
        print(f"   {variant.name}: {s:.3f} s/update", flush=True)
        return {"s_per_update": s, "calls": times, "other_processes_cores": probe.cores()}

    measured = _interleave.run_interleaved([_interleave.Variant(s, ()) for s in SIDES], args.repeats, run_one)
    per_side = {s: _interleave.values_of(measured["runs"], s, "s_per_update") for s in SIDES}
    ratio = _interleave.paired_ratio(per_side["padded"], per_side["bucketed"])
    cfg = make_state(args, model, params, args.buckets).setup.ppo
    # The work each side does, in sequence positions per epoch: the minibatches are runs of the sorted lengths, each
    # at the narrowest bucket width that holds its longest response (the prompt is computed whole either way).
    n_mb = args.batch // args.minibatch
    longest = np.sort(lengths).reshape(n_mb, args.minibatch).max(-1)
    widths = np.asarray(cfg.bucket_widths)[np.searchsorted(cfg.bucket_widths, longest)]
    work = {"response_positions_ratio": float(n_mb * args.response_len / widths.sum()),
            "positions_ratio": float(n_mb * (args.prompt_len + args.response_len)
                                     / (n_mb * args.prompt_len + widths.sum())),
            "minibatch_widths": sorted(widths.tolist())}
    result = {
        "benchmark": "bucketed_update",
        "date": _env.now_utc(),
        "tiny": args.tiny,
        "setup": {
            "model": {"family": "gpt2", "n_layer": args.layers, "n_embd": args.width, "n_head": args.heads,
                      "vocab_size": args.vocab, "weights": "random"},
            "batch": args.batch, "minibatch": args.minibatch, "epochs": args.epochs,
            "prompt_len": args.prompt_len, "response_len": args.response_len,
            "estimator": "gae", "critic": "separate",
            "length_buckets": args.buckets, "bucket_widths": list(cfg.bucket_widths),
            "lengths": f"{args.short_share:.0%} of the rows end uniformly in [1, response_len / 4], the others use "
                       "all of it",
            "short_share": args.short_share,
            "response_lengths": lengths.tolist(),
            "response_padding_share": float(padding_share),
            "padding_share": float(padding_share * args.response_len / (args.prompt_len + args.response_len)),
            "calls_per_round": args.calls,
        },
        "work_padded_over_bucketed": work,
        "first_call_s": first_call_s,
        "sides": {s: {"s_per_update": _interleave.spread(per_side[s])} for s in SIDES},
        "speedup_padded_over_bucketed": ratio,
        "order": measured["order"],
        "runs": measured["runs"],
        "probes": measured["probes"],
        "busy": measured["busy"],
        **_env.run_record(load_before, others.cores(), PACKAGES),
    }
    print(f"bucketed update: {ratio['of_medians']:.2f}x the padded one (paired {ratio['min']:.2f}-"
          f"{ratio['max']:.2f}), {padding_share:.0%} of the response tokens are padding")
    _interleave.write_result(args.out, result, force=args.force)
    return result


if __name__ == "__main__":
    main()
