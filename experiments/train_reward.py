#!/usr/bin/env python
"""Train a GPT-2 reward model on preference comparisons, normalise it, and export it for PPO.

    python experiments/train_reward.py --data labels.jsonl --init gpt2 --out runs/rm \\
        [--format auto|ppojax|trl|hh|tldr] \\
        [--epochs 1] [--lr 5e-5] [--batch-size 32] [--val-fraction 0.1] [--seed 0] \\
        [--query-length 64] [--response-length 24] \\
        [--normalize reference|dataset|none] [--reference SPEC] [--normalize-samples 256] \\
        [--temperature 1.0] [--top-k 0] [--top-p 1.0] [--stop-at-eos] \\
        [--lora-rank 0] [--lora-alpha 16] [--lora-targets q_proj,v_proj]
    python experiments/ppo_gpt2.py --set reward.kind=reward_model --set reward.reward_model_path=runs/rm

``--data`` is a JSONL file of comparisons, or ``hf:NAME[:SPLIT]`` (a Hugging Face dataset, split ``train`` by default:
needs the ``datasets`` package and a reachable hub, and says so in one line otherwise). ``--format`` names its schema
(``ppojax.rl.preference_formats``), ``auto`` (the default) detects it from the first row's keys and the log says which:

- ``ppojax``: ``{"query", "responses": [k texts], "choice"}`` (``ppojax.rl.preferences``; k >= 2).
- ``trl``: TRL's preference schema, ``{"prompt", "chosen", "rejected"}``, all strings or all chat-message lists
  (``[{"role", "content"}]``: the prompt's messages, then the assistant turn(s)); without ``prompt`` (TRL's implicit
  prompt), ``chosen``/``rejected`` are whole conversations and their shared prefix is the prompt.
- ``hh``: Anthropic HH-RLHF, ``{"chosen", "rejected"}`` full dialogues (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``): the
  prompt is the shared prefix through the last ``"\\n\\nAssistant:"`` both share, the responses the remainders.
- ``tldr``: OpenAI summarize-from-feedback comparisons, ``{"info": {"post", "title", "subreddit"}, "summaries":
  [{"text"}, {"text"}], "choice"}``: the prompt is lm-human-preferences' ``SUBREDDIT: r/...\\nTITLE: ...\\nPOST:
  ...\\nTL;DR:``, the responses the summaries with a leading space.

The new formats give pairs (k = 2), choice the chosen one. A prompt given as chat messages is tokenized by the
tokenizer's chat template with the generation prompt (``role: content`` lines then ``assistant:`` without one), a
response given as messages is its assistant content text.

``--init`` is the language model the reward model starts from (an export dir, a local transformers GPT-2 dir, a hub
id, or ``random`` with ``--n-layer --n-head --n-embd --n-positions --vocab-size --init-seed``): its trunk plus a
scalar head of init std ``1/sqrt(width + 1)``. The loss is the softmax cross-entropy of the labeled choice among
the k responses (Bradley-Terry for pairs; ``ppojax.reward_training.preference_loss``). A seeded ``--val-fraction``
of the comparisons is held out and its accuracy reported after every epoch (chance is 1/k); ``train_report.json``
records it with the seed, the split (``val_fraction``, ``val_comparisons``) and the data's format.

``--lora-rank R`` (> 0) trains LoRA adapters of rank R on the trunk (``--lora-targets``: the family's projection names,
comma-separated; default all of them) and the head, with the ``--init`` model frozen: the output directory then holds
the adapter in PEFT's format and the head (no copy of the trunk), and a PPO run whose policy starts from that same
model scores with it on its own frozen base (``ppojax.rewards.LoraRewardModel``).

Normalisation (lm-human-preferences): after training, gain and bias are set so that the scores of
``--normalize-samples`` responses have mean 0 and std 1. ``reference`` (the default) samples them from the
reference policy (``--reference``, default: the ``--init`` model, which in RLHF is the initial policy) on the
training queries, with the sampling settings PPO will use (``--temperature --top-k --top-p --stop-at-eos``: give
the PPO run's); ``dataset`` uses the training comparisons' own responses (no sampling: for when the reference policy
is not at hand); ``none`` keeps gain 1 and bias 0.

Writes under ``--out``: the reward model (``config.json``, ``model.safetensors``, ``reward_head.json``: the directory
``reward.reward_model_path`` takes), the tokenizer, ``metrics.jsonl`` (one line per epoch: train/val loss, accuracy,
margin), ``train_report.json`` and ``checkpoints/`` (orbax, one per epoch), each file atomically. Rerunning the same
command resumes after the last finished epoch; ``--epochs`` may grow. One job per ``--out``: the job holds
``<out>/ppojax.lock`` (``ppojax.io.lock``) and a second one exits naming it. A bad input prints one error line and
exits with code 2, leaving ``--out`` as it found it. SIGINT or SIGTERM end the job with one line (exit 130 or
143), the lock released and the epochs already checkpointed kept (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sample_for_labels: the shared model flags
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sample_for_labels import UsageError, add_model_args, load_model, load_tokenizer_for  # noqa: E402

# Settings that must not change when a run resumes (the data split and the model depend on them).
_RESUME_KEYS = ("data", "init", "lr", "batch_size", "val_fraction", "seed", "query_length", "response_length",
                "head_init_std", "lora_rank", "lora_alpha", "lora_targets")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_reward.py", description="Train a GPT-2 reward model on comparisons.")
    p.add_argument("--data", required=True, help="preference JSONL, every row labeled, or hf:NAME[:SPLIT] (a hub "
                   "dataset; needs `datasets` and the hub)")
    p.add_argument("--format", choices=("auto", "ppojax", "trl", "hh", "tldr"), default="auto",
                   help="the data's schema (default: detected from the first row's keys)")
    add_model_args(p, "init", "the language model the reward model starts from")
    p.add_argument("--out", required=True, help="output directory (the reward model for reward.reward_model_path)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32, help="comparisons per update")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction (seeded split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the head init, shuffling and sampling")
    p.add_argument("--query-length", type=int, default=64, help="query tokens (left-padded / left-truncated)")
    p.add_argument("--response-length", type=int, default=24, help="response tokens (right-padded / truncated)")
    p.add_argument("--head-init-std", type=float, default=None, help="default 1/sqrt(n_embd + 1)")
    g = p.add_argument_group("LoRA (adapters over the frozen --init model)")
    g.add_argument("--lora-rank", type=int, default=0, help="adapter rank; 0 (default) trains every weight")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    g.add_argument("--lora-targets", default="", help="comma-separated projection names (default: all of the "
                   "family's)")
    g = p.add_argument_group("normalisation")
    g.add_argument("--normalize", choices=("reference", "dataset", "none"), default="reference")
    g.add_argument("--reference", default=None, help="reference policy to sample (default: the --init model)")
    g.add_argument("--normalize-samples", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0, help="reference sampling temperature (PPO's)")
    g.add_argument("--top-k", type=int, default=0, help="reference sampling top-k (PPO's)")
    g.add_argument("--top-p", type=float, default=1.0, help="reference sampling top-p (PPO's)")
    g.add_argument("--stop-at-eos", action="store_true", help="reference samples stop at EOS (PPO's eos_token_id)")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "query_length", "response_length", "normalize_samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.lora_rank < 0:
        raise UsageError(f"--lora-rank must be >= 0 (0: no LoRA), got {args.lora_rank}")


def _lora_spec(args: argparse.Namespace, config, lm_params):
    """The adapters' ``LoraSpec`` (None without ``--lora-rank``), checked against the model before compiling."""
    from ppojax.models import lora
    from ppojax.rl.roles import roles_from_config
    from ppojax.train.config import LoraConfig

    if args.lora_rank == 0:
        return None
    try:
        roles = roles_from_config(LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha,
                                             targets=args.lora_targets or ()), config)  # (): all
        spec = roles.spec()
        spec.check(config, lm_params)
    except (lora.LoraError, ValueError) as e:
        raise UsageError(f"--lora-*: {e}") from None
    return spec


def _calibration(args, rm, train, config, params, tokenizer):
    """``(query_ids, query_mask, tokens, mask)`` rows to normalise on, or None."""
    import jax
    import numpy as np

    n = args.normalize_samples
    rng = np.random.default_rng([args.seed, 1])
    if args.normalize == "dataset":
        q_ids = np.repeat(np.asarray(train.query_ids), train.k, axis=0)  # every response of every comparison
        q_mask = np.repeat(np.asarray(train.query_mask), train.k, axis=0)
        tokens = np.asarray(train.tokens).reshape(-1, train.tokens.shape[-1])
        mask = np.asarray(train.mask).reshape(-1, train.mask.shape[-1])
        pick = rng.permutation(tokens.shape[0])[:n]
        return q_ids[pick], q_mask[pick], tokens[pick], mask[pick]
    # reference: samples of the reference policy on the training queries (cycled to n rows).
    from ppojax.generate.sampling import generate

    if args.reference is not None and args.reference != args.init:
        config, params = load_model(args.reference, args)
        if config.vocab_size != rm.config.vocab_size:
            raise UsageError(f"--reference has a vocabulary of {config.vocab_size}, the reward model "
                             f"{rm.config.vocab_size}: they must share the tokenizer")
    pick = rng.choice(train.n, size=n, replace=n > train.n)
    q_ids, q_mask = np.asarray(train.query_ids)[pick], np.asarray(train.query_mask)[pick]
    # Queries need a real last token to be sampled from (left padding): an empty query cannot be continued.
    if not np.all(q_mask[:, -1] > 0):
        raise UsageError("--normalize reference needs non-empty queries; use --normalize dataset")
    eos = tokenizer.eos_token_id if args.stop_at_eos else None
    try:
        out = generate(config, params, q_ids, q_mask, jax.random.key(args.seed), max_new_tokens=args.response_length,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=eos,
                       pad_token_id=tokenizer.pad_token_id)
    except ValueError as e:
        raise UsageError(f"sampling the reference policy: {e}") from None
    return q_ids, q_mask, np.asarray(out.tokens), np.asarray(out.mask)


def run(args: argparse.Namespace, progress: Optional[dict] = None) -> dict:
    _check_args(args)
    from ppojax.io.lock import DirectoryLock, LockError
    from ppojax.rl import preference_formats, preferences

    t_start = time.time()
    # Inputs first, each checked before anything compiles.
    try:
        rows, args.data_format = preference_formats.load_preferences(args.data, format=args.format,
                                                                     require_choice=True)
    except preferences.PreferenceError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out).expanduser()
    lock = DirectoryLock(out)
    try:
        lock.acquire()
    except LockError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--out {out} is not writable: {e}") from None
    try:
        if progress is not None:
            progress["started"] = True
        return _train(args, rows, out, t_start)
    finally:
        lock.release(remove_created=True)  # removes only what this job created and left empty


def _read_history(path: Path, last_epoch: int) -> list[dict]:
    """The metrics rows of the epochs up to ``last_epoch`` (those a checkpoint covers), skipping unreadable lines."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("epoch", 0) <= last_epoch:
            rows.append(row)
    return rows


def _train(args: argparse.Namespace, rows, out: Path, t_start: float) -> dict:
    """The job, with ``out`` locked: model, data, training (resumed from ``out/checkpoints``), normalisation."""
    import jax

    from ppojax.io.atomic import atomic_write_json, atomic_write_text
    from ppojax.io.checkpoint import Checkpointer, CheckpointCorruptError, CheckpointMismatchError
    from ppojax.rl import preferences, reward_training

    config, lm_params = load_model(args.init, args)
    tokenizer = load_tokenizer_for(args.init, args.tokenizer, config.vocab_size)
    if args.query_length + args.response_length > config.max_positions:
        raise UsageError(f"--query-length {args.query_length} + --response-length {args.response_length} exceeds the "
                         f"model's context of {config.max_positions} tokens")
    try:
        data = preferences.tokenize_preferences(tokenizer, rows, query_length=args.query_length,
                                                response_length=args.response_length, source=args.data)
        train, val = preferences.split_preferences(data, args.val_fraction, args.seed)
    except preferences.PreferenceError as e:
        raise UsageError(str(e)) from None
    too_big = [int(x) for x in (data.query_ids[data.query_mask > 0].max(initial=0), data.tokens[data.mask > 0].max())
               if x >= config.vocab_size]
    if too_big:
        raise UsageError(f"{args.data}: token id {too_big[0]} is outside the model's vocabulary of {config.vocab_size}")
    try:
        cfg = reward_training.RewardTrainConfig(epochs=args.epochs, batch_size=min(args.batch_size, train.n),
                                                learning_rate=args.lr, head_init_std=args.head_init_std)
    except ValueError as e:
        raise UsageError(str(e)) from None

    spec = _lora_spec(args, config, lm_params)
    state = reward_training.create_reward_train_state(config, lm_params, cfg, key=jax.random.key(args.seed),
                                                      lora=spec)
    settings = {k: getattr(args, k) for k in _RESUME_KEYS}
    settings["data"] = args.data if args.data.startswith("hf:") else str(Path(args.data).resolve())
    if args.data_format != "ppojax":  # absent for ppojax data, so runs from before formats existed still resume
        settings["format"] = args.data_format
    try:
        ckpt = Checkpointer(out / "checkpoints", keep=2)
    except OSError as e:
        raise UsageError(f"--out {out} is not writable: {e}") from None
    start_epoch = 0
    if ckpt.latest_step() is not None:
        arrays = {"params": state.params, "opt_state": state.opt_state, "key": state.key, "step": state.step}
        try:
            _, restored, meta = ckpt.restore(arrays)
        except (CheckpointCorruptError, CheckpointMismatchError) as e:
            ckpt.close()
            raise UsageError(f"{str(e).splitlines()[0]}; use the same arguments to resume, or move {out} aside "
                             "(or pass a new --out) to start over") from None
        if meta.get("settings") != json.loads(json.dumps(settings)):
            ckpt.close()
            raise UsageError(f"{out} holds a reward-model run with other settings ({meta.get('settings')}); use the "
                             "same arguments to resume, or a new --out")
        state = state.replace(**restored)
        start_epoch = int(meta["epoch"])
        print(f"[train_reward] resuming {out} after epoch {start_epoch}", file=sys.stderr, flush=True)

    metrics_path = out / "metrics.jsonl"
    history = _read_history(metrics_path, start_epoch)  # drop epochs not checkpointed
    atomic_write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in history))
    chance = 1.0 / data.k
    how = "detected" if args.format == "auto" else "--format"
    print(f"[train_reward] {train.n} training / {0 if val is None else val.n} held-out comparisons of k={data.k} "
          f"(chance {chance:.2f}), format {args.data_format} ({how}); {config.n_layer} layers, width {config.width}",
          file=sys.stderr, flush=True)

    def on_epoch(epoch, st, row):
        row = {**row, "time_s": round(time.time() - t_start, 2)}
        history.append(row)
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        arrays = {"params": st.params, "opt_state": st.opt_state, "key": st.key, "step": st.step}
        ckpt.save(epoch, arrays, {"epoch": epoch, "settings": settings})
        ckpt.wait()
        shown = " | ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith(("loss", "accuracy")))
        print(f"[train_reward] epoch {epoch}/{cfg.epochs} | {shown}", file=sys.stderr, flush=True)

    try:
        state, _ = reward_training.fit(state, train, cfg, val=val, start_epoch=start_epoch, on_epoch=on_epoch)
    finally:
        ckpt.close()
    train_s = time.time() - t_start

    rm = reward_training.trained_reward_model(state)  # under LoRA: adapters and head only
    normalization = {"kind": args.normalize}
    if args.normalize != "none":
        calib = _calibration(args, rm, train, config, lm_params, tokenizer)
        rm = reward_training.normalize_reward_model(rm, *calib, base=lm_params if spec is not None else None)
        normalization.update(samples=int(calib[0].shape[0]), gain=float(rm.gain), bias=float(rm.bias))
    reward_training.save_reward_model(out, rm)
    tokenizer.save_pretrained(out)

    final = history[-1] if history else {}
    report = {
        "data": settings["data"], "format": args.data_format, "init": args.init, "k": data.k, "chance": chance,
        "seed": args.seed, "val_fraction": args.val_fraction,
        "train_comparisons": train.n, "val_comparisons": 0 if val is None else val.n,
        "epochs": cfg.epochs, "lora": None if spec is None else {"rank": spec.rank, "alpha": spec.alpha,
                                                                  "targets": list(spec.targets)},
        "val_accuracy": final.get("val/accuracy"), "val_loss": final.get("val/loss"),
        "train_accuracy": final.get("train/accuracy"), "normalization": normalization,
        "train_s": round(train_s, 2), "total_s": round(time.time() - t_start, 2), "reward_model": str(out),
    }
    atomic_write_json(out / "train_report.json", report)
    acc = report["val_accuracy"]
    print(f"[train_reward] held-out accuracy {'n/a' if acc is None else f'{acc:.3f}'} (chance {chance:.2f}); "
          f"wrote the reward model to {out}", file=sys.stderr, flush=True)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ppojax.cli import interrupted_exit, interrupts_raise, quiet_third_party

    quiet_third_party()  # one [ppojax] line per warning, as the other command lines print them

    progress = {"started": False}
    with interrupts_raise():  # SIGINT/SIGTERM: one line, the lock released, the saved epochs kept
        try:
            args = parse_args(argv)
            try:
                run(args, progress)
            except UsageError as e:
                print(f"train_reward.py: error: {e}", file=sys.stderr)
                return 2
        except KeyboardInterrupt as e:
            return interrupted_exit("train_reward.py", getattr(e, "signum", 2), progress["started"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
