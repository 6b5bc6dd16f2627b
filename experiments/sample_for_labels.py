#!/usr/bin/env python
"""Sample k responses per query from a policy and write them as unlabeled comparisons (``choice: null``).

    python experiments/sample_for_labels.py --policy runs/offline/export --prompts configs/prompts/sentiment.txt \\
        --k 4 --out labels.jsonl [--num-queries N] [--query-length 16] [--response-length 16] [--temperature 1.0] \\
        [--top-k 0] [--top-p 1.0] [--stop-at-eos] [--seed 0] [--label-with vader[:T] | lexicon[:T]]

``--policy`` is a run's ``export/`` directory, a local transformers GPT-2 directory, a hub id, or ``random`` (a random
init of the shape given by ``--n-layer --n-head --n-embd --n-positions --vocab-size --init-seed``). The tokenizer is
the policy directory's own when it has one, else ``--tokenizer`` (default ``gpt2``, available offline).

The output is the preference format of ``ppojax.preferences`` (one ``{"query", "responses", "choice"}`` per line),
for people to label: fill each ``choice`` with the index of the best response. Queries are the prompt file's lines
in a seeded random order, cycled when ``--num-queries`` exceeds them.

``--label-with`` labels the rows at once with a synthetic labeler instead, for offline work with no humans:
``vader`` (VADER compound of the response text) or ``lexicon`` (mean VADER-lexicon valence of its tokens), with an
optional Boltzmann noise temperature after a colon: the choice is ``argmax_j (score_j / T + Gumbel)``, so
``P(choice = j) = softmax(score / T)_j`` (``vader:0.1``); no temperature means the best response. The labeler's
scores are kept in each row's ``"scores"`` field.

A bad input (missing prompt file, unknown policy, bad flag value) prints one error line and exits with code 2. The
output is written atomically, by one job at a time: the job holds ``<out>.lock`` (``ppojax.io.lock``) while it
samples, and a second job on the same ``--out`` exits naming it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


class UsageError(Exception):
    """A bad input: one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Model and tokenizer flags, shared with train_reward.py and rlhf_pipeline.py


def add_model_args(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    """``--<flag>`` (export dir / local HF dir / hub id / 'random') plus the random-init shape flags."""
    p.add_argument(f"--{flag}", required=True, help=f"{what}: an export dir, a local HF GPT-2 dir, a hub id, or "
                   "'random' (shape from --n-layer ...)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer hub id, dir or .gguf (default: the model's own, from its dir, GGUF file or "
                        "hub id; 'gpt2' for random)")
    g = p.add_argument_group("random init (with 'random')")
    g.add_argument("--n-layer", type=int, default=2)
    g.add_argument("--n-head", type=int, default=4)
    g.add_argument("--n-embd", type=int, default=64)
    g.add_argument("--n-positions", type=int, default=64)
    g.add_argument("--vocab-size", type=int, default=50257)
    g.add_argument("--init-seed", type=int, default=0)


def load_model(spec: str, args: argparse.Namespace):
    """``(GPT2Config, params)`` for a model spec; raises UsageError with one line."""
    import types

    from ppojax.train.config import ModelConfig
    from ppojax.train.run import RunError, build_model

    try:
        model = ModelConfig(name_or_path=spec, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                            n_positions=args.n_positions, vocab_size=args.vocab_size, init_seed=args.init_seed)
        return build_model(types.SimpleNamespace(model=model))
    except (RunError, ValueError, OSError) as e:
        message = str(e)
        prefix = f"model.name_or_path={spec!r}: "  # the runner names its config field; here the model is a flag
        raise UsageError(f"model {spec!r}: {message.removeprefix(prefix)}") from None


def tokenizer_name(spec: str, explicit: Optional[str] = None) -> str:
    """``explicit``; else the model's own: a directory that holds a tokenizer (exports do), a ``.gguf`` file (its
    metadata carries one) or a hub id; else (``random``, a directory without one) ``gpt2``."""
    if explicit is not None:
        return explicit
    path = Path(spec).expanduser()
    if path.is_dir():
        has_own = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        return str(path) if has_own else "gpt2"
    return "gpt2" if spec == "random" else spec


def load_tokenizer_for(spec: str, explicit: Optional[str], vocab_size: int):
    """The tokenizer (:func:`tokenizer_name`), checked against the model's vocabulary."""
    import ppojax

    name = tokenizer_name(spec, explicit)
    try:
        tokenizer = ppojax.load_tokenizer(name)
    except (OSError, ValueError) as e:
        raise UsageError(f"tokenizer {name!r}: {e}") from None
    special = set(tokenizer.all_special_ids)
    if len(tokenizer) > vocab_size and any(i not in special for i in range(vocab_size, len(tokenizer))):
        raise UsageError(f"tokenizer {name!r} has {len(tokenizer)} tokens, more than the model's vocabulary of "
                         f"{vocab_size}")
    return tokenizer


def pick_queries(prompts: Sequence[str], n: Optional[int], seed: int) -> list[str]:
    """``n`` queries: the prompts in a seeded random order, cycled (a fresh order each pass)."""
    import numpy as np

    n = len(prompts) if n is None else n
    out: list[str] = []
    epoch = 0
    while len(out) < n:
        order = np.random.default_rng([seed, epoch]).permutation(len(prompts))
        out += [prompts[i] for i in order[: n - len(out)]]
        epoch += 1
    return out


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample_for_labels.py",
                                description="Write k policy samples per query as comparisons to label (JSONL).")
    add_model_args(p, "policy", "the policy to sample")
    p.add_argument("--prompts", required=True, help="prompt file: .txt (one per line) or .jsonl ('prompt' field)")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--k", type=int, default=4, help="responses per query (default 4, as lm-human-preferences)")
    p.add_argument("--num-queries", type=int, default=None, help="queries (default: one per prompt)")
    p.add_argument("--query-length", type=int, default=16, help="query tokens: prompts are left-truncated to it")
    p.add_argument("--response-length", type=int, default=16, help="tokens sampled per response")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--stop-at-eos", action="store_true", help="end a response at the tokenizer's EOS")
    p.add_argument("--seed", type=int, default=0, help="seed of the query order and the sampling")
    p.add_argument("--batch-size", type=int, default=64, help="rows per sampler call")
    p.add_argument("--label-with", default=None, metavar="vader[:T]|lexicon[:T]",
                   help="fill the choices with a synthetic labeler (optional noise temperature T)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from ppojax.rl import preferences
    from ppojax.io.data import PromptError, read_prompts

    if args.k < 2:
        raise UsageError(f"--k must be >= 2, got {args.k}")
    if args.num_queries is not None and args.num_queries < 1:
        raise UsageError(f"--num-queries must be >= 1, got {args.num_queries}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    labeler = None
    if args.label_with:
        try:
            labeler = preferences.parse_labeler(args.label_with)
        except ValueError as e:
            raise UsageError(f"--label-with: {e}") from None
    try:
        prompts = read_prompts(args.prompts)
    except PromptError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a .jsonl file path")

    from ppojax.io.lock import DirectoryLock, LockError

    lock = DirectoryLock(out, is_file=True)
    try:
        lock.acquire()
    except LockError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e})") from None
    try:
        return _sample(args, prompts, labeler, out)
    finally:
        lock.release(remove_created=True)  # removes only the directories this job created and left empty


def _sample(args: argparse.Namespace, prompts: list[str], labeler, out: Path) -> dict:
    """The job, with ``out`` locked: load the policy, sample, label, write."""
    import jax

    from ppojax.generate.sampling import check_sampling_args
    from ppojax.io.data import PromptError
    from ppojax.rl import preferences

    config, params = load_model(args.policy, args)
    tokenizer = load_tokenizer_for(args.policy, args.tokenizer, config.vocab_size)
    eos = tokenizer.eos_token_id if args.stop_at_eos else None
    try:
        check_sampling_args(config, (1, args.query_length), max_new_tokens=args.response_length,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=eos)
    except ValueError as e:
        raise UsageError(str(e)) from None

    t0 = time.time()
    queries = pick_queries(prompts, args.num_queries, args.seed)
    try:
        rows = preferences.sample_comparisons(
            config, params, tokenizer, queries, k=args.k, query_length=args.query_length,
            response_length=args.response_length, key=jax.random.key(args.seed), temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, eos_token_id=eos, batch_size=args.batch_size)
    except PromptError as e:
        raise UsageError(str(e)) from None
    sample_s = time.time() - t0
    if labeler is not None:
        name, temperature = labeler
        scorer = preferences.text_scorer(name, tokenizer, vocab_size=config.vocab_size)
        rows = preferences.label_comparisons(rows, scorer, temperature=temperature, seed=args.seed)
    preferences.write_preferences(out, rows)
    what = f"labeled with {args.label_with}" if labeler else "choice: null, to label"
    print(f"[sample_for_labels] wrote {len(rows)} comparisons of k={args.k} to {out} ({what}; sampling "
          f"{sample_s:.1f} s)", file=sys.stderr, flush=True)
    return {"comparisons": len(rows), "k": args.k, "sample_s": sample_s, "path": str(out)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ppojax.cli import quiet_third_party

    quiet_third_party()  # one [ppojax] line per warning, as the other command lines print them
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"sample_for_labels.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
