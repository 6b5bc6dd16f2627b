"""The cost of a turn: a multi-turn episode against a single-turn rollout of the same total length.

One process, one model (random GPT-2 weights, GPT-2's real tokenizer, so the host decodes and encodes real text):

- ``single``: ``ppojax.generate`` of ``turns x turn_tokens`` new tokens per row (the sampling half of a rollout),
  no EOS stop, so every row samples the whole budget;
- ``episode``: ``ppojax.train.multiturn.run_episodes`` with an environment that answers every turn with a fixed
  observation (``--observation``, a few tokens) until ``turns`` turns are played: ``turns`` jitted turn calls of
  ``turn_tokens`` tokens each, continuing the KV cache, and between them the host round trip (pull the turn's
  tokens, decode them, the environment's step, render and tokenize the observation, push the next chunk: the
  observation's tokens run through the model as a prefill).

Both sample the same number of policy tokens per row; the episode also encodes the observations. Each side is run
once first (compilation reported on its own), then ``--repeats`` interleaved rounds of ``--calls`` calls (the
side that goes first rotating, the load of other processes probed). Reported: seconds per call (median, spread) per
side, the ratio episode / single paired by round, the time an episode spends in the environment's calls
(``env_s``), and the cost of one extra turn, ``(episode - single) / (turns - 1)``: the host round trip plus the
observation's prefill and the longer cache the turns attend over.

    python benchmarks/multiturn.py --force       # writes benchmarks/results/multiturn_cpu.json (a few minutes)
    python benchmarks/multiturn.py --tiny --repeats 2 --out /tmp/m.json   # smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import _env
import _interleave

DEFAULT_OUT = Path(__file__).parent / "results" / "multiturn_cpu.json"
PACKAGES = ("jax", "jaxlib", "flax", "transformers")
SIDES = ("single", "episode")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="episodes (rows) per call")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--turn-tokens", type=int, default=16)
    p.add_argument("--observation", default="The tool says: 42.", help="the environment's answer to every turn")
    p.add_argument("--observation-tokens", type=int, default=16, help="env.observation_tokens (chunk width)")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--force", action="store_true", help="write the result even if the machine was busy")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.width, args.heads, args.batch, args.turn_tokens = 1, 32, 2, 8, 4
        if args.out == DEFAULT_OUT:
            args.out = None
    return args


class FixedAnswer:
    """Answers every turn with the same text until ``turns`` turns are played."""

    observation_role = "user"

    def __init__(self, *, text: str = "ok", turns: int = 4):
        self.text, self.turns, self.played = text, turns, 0

    def reset(self, row, seed):
        return row.prompt

    def step(self, text):
        self.played += 1
        done = self.played >= self.turns
        return (None if done else self.text), 0.0, done


def main(argv=None):
    args = parse_args(argv)
    load_before = _env.load_sample()
    _env.warn_if_busy(load_before)
    others = _env.OtherLoad()
    import jax
    import jax.numpy as jnp

    import ppojax
    from ppojax.rl.config import PPOConfig
    from ppojax.tasks import Row
    from ppojax.train import multiturn

    ppojax.register_env("bench_fixed_answer", replace=True)(FixedAnswer)
    tok = ppojax.load_tokenizer("gpt2")
    R = args.turns * (args.turn_tokens + 1 + args.observation_tokens)
    model = ppojax.GPT2Config(vocab_size=50257, n_positions=args.prompt_len + R, n_embd=args.width,
                              n_layer=args.layers, n_head=args.heads)
    params = ppojax.init_params(model, jax.random.key(args.seed))
    ppo = PPOConfig(batch_size=args.batch, minibatch_size=args.batch, response_length=R, eos_token_id=None,
                    pad_token_id=tok.pad_token_id, temperature=1.0)
    state = ppojax.create_train_state(model, params, ppo=ppo, reward=None, key=jax.random.key(args.seed))
    words = open(Path(__file__).resolve().parents[1] / "configs" / "prompts" / "sentiment.txt").read().split()
    rng = np.random.RandomState(args.seed)
    rows = [Row(" ".join(rng.choice(words, 12))) for _ in range(args.batch)]
    settings = multiturn.EpisodeSettings(
        name="bench_fixed_answer", kwargs={"text": args.observation, "turns": args.turns}, max_turns=args.turns,
        timeout_s=None, turn_tokens=args.turn_tokens, observation_tokens=args.observation_tokens, credit="turn",
        prompt_len=args.prompt_len, budget=R, chat=False, system=None, seed=args.seed)
    renderer = multiturn.Renderer(tok, chat=False, system=None, eos_token_id=None)
    prompt_ids, prompt_mask = np.zeros((args.batch, args.prompt_len), np.int32), np.zeros((args.batch,
                                                                                          args.prompt_len), np.int32)
    for i, row in enumerate(rows):
        ids = renderer.first(row.prompt)[-args.prompt_len:]
        prompt_ids[i, -len(ids):], prompt_mask[i, -len(ids):] = ids, 1
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    key = jax.random.key(args.seed + 1)
    seeds = list(range(args.batch))

    def single():
        out = ppojax.generate(model, params, prompt_ids, prompt_mask, key, max_new_tokens=args.turns * args.turn_tokens,
                              temperature=1.0, pad_token_id=tok.pad_token_id)
        return jax.block_until_ready(out.tokens)

    def episode():
        ep = multiturn.run_episodes(state, rows, seeds, settings, renderer, key)
        assert (ep.turns == args.turns).all() and int(ep.mask.sum()) == args.batch * args.turns * args.turn_tokens
        return ep

    calls = {"single": single, "episode": episode}
    first_call_s = {}
    for side in SIDES:
        t0 = time.perf_counter()
        calls[side]()
        first_call_s[side] = time.perf_counter() - t0
        print(f"{side}: first call (compile + run) {first_call_s[side]:.1f} s", flush=True)

    def run_one(variant, repeat):
        probe = _env.OtherLoad()
        times, env_s = [], []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            out = calls[variant.name]()
            times.append(time.perf_counter() - t0)
            if variant.name == "episode":
                env_s.append(out.env_seconds)
        s = float(np.median(times))
        print(f"   {variant.name}: {s:.3f} s/call", flush=True)
        rec = {"s_per_call": s, "calls": times, "other_processes_cores": probe.cores()}
        if env_s:
            rec["env_s"] = float(np.median(env_s))
        return rec

    measured = _interleave.run_interleaved([_interleave.Variant(s, ()) for s in SIDES], args.repeats, run_one)
    per_side = {s: _interleave.values_of(measured["runs"], s, "s_per_call") for s in SIDES}
    ratio = _interleave.paired_ratio(per_side["episode"], per_side["single"])
    extra = [(e - s) / max(args.turns - 1, 1) for e, s in zip(per_side["episode"], per_side["single"])]
    env_s = _interleave.values_of(measured["runs"], "episode", "env_s")
    obs_tokens = len(renderer.after_turn(args.observation, "user", False))
    result = {
        "benchmark": "multiturn",
        "date": _env.now_utc(),
        "tiny": args.tiny,
        "setup": {
            "model": {"family": "gpt2", "n_layer": args.layers, "n_embd": args.width, "n_head": args.heads,
                      "vocab_size": 50257, "weights": "random"},
            "batch": args.batch, "prompt_len": args.prompt_len, "turns": args.turns, "turn_tokens": args.turn_tokens,
            "policy_tokens_per_row": args.turns * args.turn_tokens, "observation": args.observation,
            "observation_tokens_each": obs_tokens, "observation_chunk": 1 + args.observation_tokens,
            "response_region": R, "calls_per_round": args.calls,
        },
        "first_call_s": first_call_s,
        "sides": {s: {"s_per_call": _interleave.spread(per_side[s])} for s in SIDES},
        "episode_over_single": ratio,
        "extra_turn_s": _interleave.spread(extra),
        "episode_env_s": _interleave.spread(env_s),
        "order": measured["order"],
        "runs": measured["runs"],
        "probes": measured["probes"],
        "busy": measured["busy"],
        **_env.run_record(load_before, others.cores(), PACKAGES),
    }
    print(f"multiturn: an episode of {args.turns} turns x {args.turn_tokens} tokens costs {ratio['of_medians']:.2f}x "
          f"the single-turn sampling of {args.turns * args.turn_tokens} tokens (paired {ratio['min']:.2f}-"
          f"{ratio['max']:.2f}); one extra turn {np.median(extra) * 1e3:.0f} ms")
    _interleave.write_result(args.out, result, force=args.force)
    return result


if __name__ == "__main__":
    main()
