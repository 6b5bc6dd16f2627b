#!/usr/bin/env python
"""The whole RLHF pipeline offline, in one command: samples -> synthetic labels -> reward model -> PPO -> report.

    python experiments/rlhf_pipeline.py --out runs/pipeline              # ~1.5 min on 2 CPU cores
    python experiments/rlhf_pipeline.py --out runs/pipeline_gpt2 --vocab gpt2   # GPT-2's tokenizer: ~8 min, see below
    python experiments/rlhf_pipeline.py --out /tmp/p --fast               # ~45 s: the end-to-end test's setting
    python experiments/rlhf_pipeline.py --out runs/p --policy runs/offline/export   # start from a given policy
    [--labeler vader[:T] | lexicon[:T]] [--num-queries N] [--k K] [--iterations N] [--seed S]

Stages (each one a command of its own, called here in-process):

1. ``policy/``: the initial policy and its tokenizer: a randomly initialised GPT-2 of the offline default's shape
   (configs/offline.yaml; configs/tiny.yaml's with ``--fast``) over a word-level English vocabulary (``--vocab
   words``, the default, below) or GPT-2's tokenizer (``--vocab gpt2``); or ``--policy``, an export dir / HF dir /
   hub id.
2. ``labels.jsonl``: ``sample_for_labels.py``: k = 4 samples per query from the policy, labeled by the synthetic
   labeler (``--labeler vader``: VADER's compound polarity of the response text, the best of k; ``vader:T`` adds
   Boltzmann noise of temperature T). The labeler's scoring function is this experiment's TRUE score.
3. ``reward_model/``: ``train_reward.py``: the policy's trunk + a scalar head trained on the labels (a seeded 20 %
   held out), normalised to mean 0 / std 1 on reference-policy samples drawn with PPO's sampling settings.
4. ``ppo/``: ``ppo_gpt2.py --config configs/offline.yaml --set reward.kind=reward_model --set
   reward.reward_model_path=<out>/reward_model``, plus this pipeline's policy, tokenizer and sizes.
5. ``report.json`` (also printed): the reward model's held-out accuracy (chance 1/k), and the TRUE score's and the
   reward model's mean on fresh policy samples before and after PPO (the same queries and sampling keys for both
   policies: a paired comparison), with standard errors and each stage's time.

Why a word vocabulary by default. A randomly initialised GPT-2 over GPT-2's 50,257 tokens samples near-uniform
gibberish; VADER finds a sentiment word in about half of 16-token top-k samples, but a random trunk has to learn the
valence of thousands of tokens it has seen once or never, so a few hundred comparisons leave the reward model at
chance, and every step that touches the vocabulary is slow on a CPU (the top-k filter that PPO from a uniform policy
needs, configs/offline.yaml, costs ~0.4 s per 32 rows per token). Measured on 2 shared cores with ``--vocab gpt2``
(256 comparisons): 7.7 min, held-out accuracy 0.27 (chance 0.25), and PPO then exploits the reward model (its score
+0.04 -> +2.4, KL 60 nats) while the true VADER score does not move (-0.11 -> -0.12): reward hacking, shown honestly.
``--vocab words`` keeps every stage and only swaps the tokenizer for a word-level one over ~560 real English words:
the prompt file's words, punctuation, and 128 positive and 128 negative words of VADER's lexicon (|valence| >= 1.5).
Responses are English words that VADER scores as it would any text, random samples differ clearly in sentiment, and
each stage takes seconds. Measured (default sizes, 2048 comparisons): held-out accuracy 0.77, true VADER score
+0.04 -> +0.97 after 60 PPO iterations (KL 12 nats), 92 s in all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import sample_for_labels  # noqa: E402
import train_reward  # noqa: E402

PROMPTS = REPO / "configs" / "prompts" / "sentiment.txt"
OFFLINE = REPO / "configs" / "offline.yaml"

# Sizes. "default" (--vocab words): the offline default's model shape (configs/offline.yaml) and PPO settings.
# "gpt2" (--vocab gpt2 or --policy): the same over GPT-2's tokenizer, as many comparisons as fit in ~8 minutes.
# "fast" (--fast, for tests): configs/tiny.yaml's model.
PRESETS = {
    "default": dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, query_length=16, response_length=16,
                    num_queries=2048, k=4, rm_epochs=4, rm_lr=1e-3, rm_batch=32, normalize_samples=256,
                    iterations=60, batch_size=32, minibatch_size=8, ppo_epochs=4, eval_queries=256),
    "gpt2": dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, query_length=16, response_length=16,
                 num_queries=256, k=4, rm_epochs=4, rm_lr=1e-3, rm_batch=32, normalize_samples=128,
                 iterations=20, batch_size=32, minibatch_size=8, ppo_epochs=4, eval_queries=64),
    "fast": dict(n_layer=1, n_head=2, n_embd=32, n_positions=32, query_length=8, response_length=8,
                 num_queries=1024, k=4, rm_epochs=4, rm_lr=3e-3, rm_batch=32, normalize_samples=128,
                 iterations=32, batch_size=32, minibatch_size=8, ppo_epochs=4, eval_queries=128),
}
TRUE_SCORES = {"vader": "vader: VADER compound polarity of the response text",
               "lexicon": "lexicon: mean VADER-lexicon valence of the response tokens"}
_LARGE_VOCAB = 5000  # above this, sample with top-k 50 and use the "gpt2" sizes
_SPECIALS = ("<|endoftext|>", "<|unk|>")
_PUNCTUATION = (".", ",", "!", "?", "'")


class PipelineError(Exception):
    """A stage failed on its input: one line, exit code 2."""


def build_word_tokenizer(out_dir: Path, prompts: Path, *, n_sentiment: int = 128, seed: int = 0) -> Path:
    """A word-level tokenizer over the prompt file's words, punctuation, and ``n_sentiment`` positive and
    ``n_sentiment`` negative VADER-lexicon words (|valence| >= 1.5, drawn with ``seed``), saved to ``out_dir``.

    Lowercased, split on words and punctuation, decoded with spaces. Ids: ``<|endoftext|>`` 0 (EOS), ``<|unk|>``
    1, then the words; the pad ``<|pad|>`` is the last id, outside the model's vocabulary (ppojax's convention).
    """
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ppojax.rl.rewards import vader_lexicon

    text = prompts.read_text(encoding="utf-8").lower()
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", text)) - set(_PUNCTUATION))
    lexicon = vader_lexicon()
    rng = np.random.default_rng(seed)
    vocab = list(_SPECIALS) + list(_PUNCTUATION) + words
    for sign in (1, -1):
        pool = sorted(w for w, v in lexicon.items() if w.isalpha() and sign * v >= 1.5 and w not in vocab)
        vocab += [pool[i] for i in sorted(rng.choice(len(pool), n_sentiment, replace=False))]
    vocab.append("<|pad|>")
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<|unk|>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|unk|>", pad_token="<|pad|>")
    tok.save_pretrained(out_dir)
    return out_dir


def _initial_policy(args, preset, out: Path) -> tuple[str, int]:
    """The policy spec for every stage, and its vocabulary size."""
    import jax

    import ppojax

    if args.policy == "random":
        raise PipelineError("--policy random: leave --policy out for a random policy (--vocab picks its tokenizer)")
    if args.policy is not None:
        ns = argparse.Namespace(n_layer=1, n_head=1, n_embd=1, n_positions=1, vocab_size=1, init_seed=0)
        config, _ = sample_for_labels.load_model(args.policy, ns)
        return args.policy, config.vocab_size
    policy_dir = out / "policy"
    if args.vocab == "words":
        build_word_tokenizer(policy_dir, PROMPTS, seed=args.seed)
        tokenizer = ppojax.load_tokenizer(policy_dir)
        vocab_size = tokenizer.pad_token_id  # the pad is the last id, outside the model
    else:
        tokenizer = ppojax.load_tokenizer("gpt2")
        vocab_size = 50257
    config = ppojax.GPT2Config(vocab_size=vocab_size, n_positions=preset["n_positions"], n_embd=preset["n_embd"],
                               n_layer=preset["n_layer"], n_head=preset["n_head"])
    ppojax.save_pretrained(policy_dir, config, ppojax.init_params(config, jax.random.key(args.seed)))
    tokenizer.save_pretrained(policy_dir)
    if args.vocab == "words":  # save_pretrained writes GPT-2's special ids; this vocabulary's EOS is 0
        hf_config = json.loads((policy_dir / "config.json").read_text())
        hf_config.update(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        (policy_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return str(policy_dir), vocab_size


@contextlib.contextmanager
def _own_signal_handlers():
    """The PPO runner installs SIGTERM/SIGINT handlers for checkpoint-on-preemption; restore ours afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _evaluate(policy: str, reward_dir: Path, scorer, queries, preset, sampling, seed: int) -> dict:
    """Fresh samples of ``policy``: the TRUE score and the reward model's normalised score, mean and std error."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ppojax.rl import preferences, reward_training

    ns = argparse.Namespace(n_layer=1, n_head=1, n_embd=1, n_positions=1, vocab_size=1, init_seed=0)
    config, params = sample_for_labels.load_model(policy, ns)
    tokenizer = sample_for_labels.load_tokenizer_for(policy, None, config.vocab_size)
    rows = preferences.sample_comparisons(
        config, params, tokenizer, queries, k=2, query_length=preset["query_length"],
        response_length=preset["response_length"], key=jax.random.key(seed), batch_size=64, **sampling)
    true = np.asarray(scorer([r for row in rows for r in row.responses]), np.float64)
    rm = reward_training.load_reward_model(reward_dir)
    batch = preferences.tokenize_preferences(tokenizer, rows, query_length=preset["query_length"],
                                             response_length=preset["response_length"], source=policy)
    raw = np.asarray(reward_training.comparison_scores(rm.config, rm.params, jax.tree.map(jnp.asarray, batch)))
    rm_score = (float(rm.gain) * raw + float(rm.bias)).reshape(-1).astype(np.float64)

    def stat(x):
        return {"mean": float(x.mean()), "stderr": float(x.std() / np.sqrt(len(x)))}

    examples = [{"query": row.query, "response": row.responses[0]} for row in rows[:4]]
    return {"samples": int(true.size), "true_score": stat(true), "rm_score": stat(rm_score), "examples": examples}


def run(args: argparse.Namespace) -> dict:
    from ppojax.rl import preferences
    from ppojax.train import runner
    from ppojax.io.data import read_prompts

    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        labeler, _ = preferences.parse_labeler(args.labeler)
    except ValueError as e:
        raise PipelineError(f"--labeler: {e}") from None
    timings = {}
    t = time.time()
    policy, vocab_size = _initial_policy(args, PRESETS["fast" if args.fast else "default"], out)
    timings["policy_s"] = time.time() - t

    large_vocab = vocab_size > _LARGE_VOCAB
    preset = dict(PRESETS["fast" if args.fast else "gpt2" if large_vocab else "default"])
    for name in ("num_queries", "iterations", "k"):
        if getattr(args, name) is not None:
            preset[name] = getattr(args, name)
    # Sampling as in configs/offline.yaml: temperature 1, and top-k 50 over a large vocabulary such as GPT-2's (see
    # its comment). The word vocabulary is small enough to sample from in full.
    top_k = 50 if large_vocab else 0
    sampling = dict(temperature=1.0, top_k=top_k)

    def stage(name, module, argv):
        t0 = time.time()
        command = "ppo_gpt2" if module is runner else module.__name__
        print(f"[pipeline] {name}: {command}.py {' '.join(argv)}", file=sys.stderr, flush=True)
        code = module.main(argv)
        timings[f"{name}_s"] = round(time.time() - t0, 2)
        if code != 0:
            raise PipelineError(f"stage {name} failed (exit {code}); see the error above")

    labels = out / "labels.jsonl"
    stage("labels", sample_for_labels, [
        "--policy", policy, "--prompts", str(PROMPTS), "--out", str(labels), "--k", str(preset["k"]),
        "--num-queries", str(preset["num_queries"]), "--query-length", str(preset["query_length"]),
        "--response-length", str(preset["response_length"]), "--temperature", "1.0", "--top-k", str(top_k),
        "--seed", str(args.seed), "--label-with", args.labeler])

    reward_dir = out / "reward_model"
    stage("reward_model", train_reward, [
        "--data", str(labels), "--init", policy, "--out", str(reward_dir), "--epochs", str(preset["rm_epochs"]),
        "--lr", str(preset["rm_lr"]), "--batch-size", str(preset["rm_batch"]), "--val-fraction", "0.2",
        "--seed", str(args.seed), "--query-length", str(preset["query_length"]),
        "--response-length", str(preset["response_length"]), "--normalize", "reference",
        "--normalize-samples", str(preset["normalize_samples"]), "--temperature", "1.0", "--top-k", str(top_k)])
    rm_report = json.loads((reward_dir / "train_report.json").read_text())

    ppo_dir = out / "ppo"
    overrides = {
        "model.name_or_path": policy, "tokenizer": sample_for_labels.tokenizer_name(policy),
        "prompts.path": str(PROMPTS), "prompts.max_prompt_tokens": preset["query_length"],
        "reward.kind": "reward_model", "reward.reward_model_path": str(reward_dir),
        "ppo.response_length": preset["response_length"], "ppo.temperature": 1.0, "ppo.top_k": top_k,
        "ppo.batch_size": preset["batch_size"], "ppo.minibatch_size": preset["minibatch_size"],
        "ppo.ppo_epochs": preset["ppo_epochs"], "checkpoint.every": preset["iterations"],
        "logging.samples_every": max(preset["iterations"] // 2, 1), "logging.tensorboard": False,
    }
    argv = ["--config", str(OFFLINE), "--run-dir", str(ppo_dir), "--iterations", str(preset["iterations"]),
            "--seed", str(args.seed)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    with _own_signal_handlers():
        stage("ppo", runner, argv)

    t = time.time()
    scorer = preferences.text_scorer(labeler, sample_for_labels.load_tokenizer_for(policy, None, vocab_size),
                                     vocab_size=vocab_size)
    queries = sample_for_labels.pick_queries(read_prompts(PROMPTS), preset["eval_queries"], args.seed + 1)
    eval_seed = args.seed + 1000  # the same sampling keys for both policies: a paired comparison
    before = _evaluate(policy, reward_dir, scorer, queries, preset, sampling, eval_seed)
    after = _evaluate(str(ppo_dir / "export"), reward_dir, scorer, queries, preset, sampling, eval_seed)
    timings["evaluate_s"] = round(time.time() - t, 2)
    metrics = [json.loads(line) for line in (ppo_dir / "metrics.jsonl").read_text().splitlines()]

    report = {
        "vocab": "given policy" if args.policy else args.vocab,
        "policy": policy,
        "labeler": args.labeler,
        "true_score": TRUE_SCORES[labeler],
        "k": preset["k"],
        "comparisons": rm_report["train_comparisons"] + rm_report["val_comparisons"],
        "rm_val_accuracy": rm_report["val_accuracy"],
        "rm_chance": rm_report["chance"],
        "ppo_iterations": len(metrics),
        "ppo_final_kl": metrics[-1]["kl"],
        "before": before,
        "after": after,
        "true_score_gain": after["true_score"]["mean"] - before["true_score"]["mean"],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "sizes": preset,
        "seed": args.seed,
    }
    report["timings_s"]["total_s"] = round(sum(report["timings_s"].values()), 2)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    b, a = before["true_score"], after["true_score"]
    print(
        f"[pipeline] reward model held-out accuracy {report['rm_val_accuracy']:.3f} (chance {report['rm_chance']:.2f}, "
        f"{report['comparisons']} comparisons of k={preset['k']})\n"
        f"[pipeline] true score ({labeler}) on {before['samples']} policy samples: before PPO {b['mean']:+.4f} "
        f"± {b['stderr']:.4f}, after {preset['iterations']} PPO iterations {a['mean']:+.4f} ± {a['stderr']:.4f}\n"
        f"[pipeline] reward-model score: before {before['rm_score']['mean']:+.3f}, after "
        f"{after['rm_score']['mean']:+.3f}; PPO final KL {report['ppo_final_kl']:.2f} nats\n"
        f"[pipeline] {report['timings_s']['total_s']:.0f} s in all; report: {out / 'report.json'}",
        flush=True)
    return report


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf_pipeline.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for every stage's output and report.json")
    p.add_argument("--fast", action="store_true", help="tiny sizes (configs/tiny.yaml's model): for tests")
    p.add_argument("--vocab", choices=("words", "gpt2"), default="words",
                   help="the random policy's tokenizer: a ~560-word English vocabulary (default; minutes), or GPT-2's "
                   "(slow on CPU: see the module docstring)")
    p.add_argument("--policy", default=None, help="start from this policy (export dir / HF dir / hub id) instead")
    p.add_argument("--labeler", default="vader", help="synthetic labeler = the true score: vader[:T] or lexicon[:T]")
    p.add_argument("--num-queries", type=int, default=None, help="comparisons to sample and label")
    p.add_argument("--k", type=int, default=None, help="responses per comparison (default 4)")
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (PipelineError, sample_for_labels.UsageError) as e:
        print(f"rlhf_pipeline.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
