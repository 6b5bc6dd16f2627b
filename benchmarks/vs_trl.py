"""The same PPO-RLHF job in ppojax and in TRL's PPO (``trl.experimental.ppo``), on the CPU.

Both sides start from the same random GPT-2 weights (a seeded ``transformers.GPT2LMHeadModel``, ``save_pretrained``,
read back with ``ppojax.load_pretrained``), sample with GPT-2's real tokenizer and a distinct pad token
(``ppojax.load_tokenizer``: ``<|pad|>``, id 50257), at temperature 0.7 with no top-k/top-p and no EOS stop, so every
response is exactly ``response`` tokens long. The prompts are consecutive ``query``-token windows of the shipped
prompt file (``configs/prompts/sentiment.txt``), so no prompt is padded.

Models on each side: actor, frozen reference (a copy of the actor), critic (the actor's trunk + a zero scalar head,
a separate model), and a reward model of the same shape: the same random trunk + a seeded random scalar head
(``N(0, 1/(n_embd+1))``, no bias). TRL gets it as a ``GPT2ForSequenceClassification(num_labels=1)``, ppojax as
``rewards.reward_model`` (trunk + head kernel = the torch ``score.weight``): same weights, same last-token read-out.
Hyperparameters matched: lr 1e-5, Adam eps 1e-5, no grad-norm clipping (TRL's PPO loop does not clip), fixed KL
coefficient 0.05 (k1), vf_coef 0.1, clip 0.2/0.2, gamma 1, lambda 0.95, advantage whitening.

Timing: each side runs in its own subprocess (so peak RSS is its own), after measuring a large fp32 matmul in its
framework (the machine's achievable peak). A process's time per iteration is the median over its iterations after
the first; the first iteration (ppojax: XLA compilation; TRL: lazy init) is reported separately.
- ppojax: ``rollout`` (generation + actor/ref log-probs + critic values), scoring (the reward model, jitted) and
  ``update`` (epochs x minibatches), each followed by ``block_until_ready``. Generation alone is timed afterwards
  with ``ppojax.generate`` on the same shapes (the rollout's sampling), so rollout - generation = forwards.
- TRL: ``PPOTrainer.train()`` with a callback at each step end (iteration time); its module-level
  ``batch_generation`` (generation), and its ``forward``/``get_reward`` calls made under no_grad (ref log-probs,
  values, reward) are wrapped with timers; update = iteration - generation - scoring (includes GAE/whitening, small).

Repeats, interleaved (``_interleave.py``): ``--repeats`` rounds, each running every side once in a FRESH process,
in an order rotated every round (ppojax, TRL; TRL, ppojax; ...), so each side goes first equally often over an even
number of rounds and a drift of the machine's speed does not favour one. Fresh processes rather than two warm ones
taking turns, because (1) a repeat then includes the process-level variation that one run shows (memory placement,
thread pools, allocator state: TRL's (b) time moved from 15.3 to 19.2 s between two single runs), so the spread is
honest; (2) peak RSS stays each process's own, and no idle warm process holds its memory (~8 GB per side for job
(a)) while the other side runs; (3) it is the protocol of the committed single-run numbers. The price is one
compilation / initialisation per process, outside the per-process median. Reported per side: the median, min-max
and IQR over repeats of the per-process s/iteration; per other side X against the first side B: ``median(X) /
median(B)`` with the min-max of the paired per-round ratios (TRL/ppojax is the speed-up). Other processes' load is
probed before every round and measured during every run; above ``_env.BUSY_OTHER_CORES`` cores the result is
flagged busy and NOT written unless ``--force`` (the JSON records the busyness either way).

Sides (``--sides``, comma-separated; the first is the baseline of the ratios):

- ``ppojax``: this checkout; ``trl``: TRL's PPO.
- ``ppojax@REV``: the ppojax side of git revision REV, run by THAT revision's own ``benchmarks/vs_trl.py --child
  ppojax`` from an export of it (``git archive`` into a temporary folder, ``PYTHONPATH`` and working directory set
  to it, the import checked before the first round) on the same checkpoint: old revisions used other module paths
  and their own API. An export rather than ``git worktree add``: nothing is registered in the repository (nothing
  to prune if the run is killed) and no lock is taken that others working in the checkout could meet.
  ``--ppojax-rev REV`` is short for ``--sides ppojax,ppojax@REV``.
- ``ppojax+OPTION+...``: this checkout with ``key=value`` options (``reuse_sampler_logprobs`` alone means
  ``=true``): the PPOConfig options ``reuse_sampler_logprobs``, ``critic`` (separate/shared), ``vocab_chunk_size``,
  and two experiments that exist only here: ``vocab_dtype`` (float32/bfloat16: the matmul dtype of the vocabulary
  chunks of the log-probs, rollout and update; the sampler is unchanged) and ``xla=NAME`` (``XLA_FLAGS`` from
  ``xla_cpu_flags.FLAG_SETS``). GFLOP/s use the job's one FLOP count (separate critic) on every side: compare
  options by time, not GFLOP/s.

FLOPs: one job-defined count, the same for both sides (model FLOPs of the algorithm, not of either implementation):
forward of a sequence of S tokens = L * (24 d^2 S + 2 d S (S + 1)) (matmuls + causal attention QK^T/AV) plus the
vocabulary projection 2 d V only where a response log-prob is needed; generation = forward over S - 1 positions (KV
cache) + R projections; rollout = reference (with projection) + critic + reward forwards; training = 3 x forward of
actor (with projection) and critic per episode per epoch. ppojax additionally recomputes the actor's log-probs in
the rollout and TRL projects all S positions onto the vocabulary; neither is counted.

    python benchmarks/vs_trl.py --job b --repeats 6             # job (b) interleaved; --job a / both
    python benchmarks/vs_trl.py --job b --ppojax-rev 47bc523 --out benchmarks/results/revisions_b_cpu.json
    python benchmarks/vs_trl.py --job b --sides ppojax,ppojax+critic=shared --out /tmp/shared.json
    python benchmarks/vs_trl.py --row benchmarks/results/vs_trl_cpu.json     # the README line: ratio and range
    python benchmarks/vs_trl.py --tiny --repeats 2              # smoke run, writes nothing unless --out is given
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

import _env
import _interleave
import _loop

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).parent / "results" / "vs_trl_cpu.json"
PROMPT_FILE = ROOT / "configs" / "prompts" / "sentiment.txt"

JOBS = {
    "a": dict(n_layer=12, n_head=12, n_embd=768, batch=16, query=64, response=24, epochs=4, minibatches=2),
    "b": dict(n_layer=4, n_head=4, n_embd=256, batch=32, query=32, response=24, epochs=4, minibatches=4),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, batch=8, query=16, response=8, epochs=2, minibatches=1),
}
TARGETS = {"a": 1.5, "b": 3.0}  # wanted speed-up of ppojax over TRL on this CPU (issue 17)
VOCAB = 50257
LR, ADAM_EPS, KL_COEF, VF_COEF, CLIP, TEMPERATURE = 1e-5, 1e-5, 0.05, 0.1, 0.2, 0.7


DEFAULT_SIDES = "ppojax,trl"
REPEATS = 6  # even: each side goes first equally often


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=("a", "b", "both"), default="b")
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations per process (default: a 3, b 6)")
    p.add_argument("--repeats", type=int, default=REPEATS,
                   help=f"rounds; each runs every side once, in a fresh process (default {REPEATS})")
    p.add_argument("--tiny", action="store_true", help="smoke run on a tiny model; writes only if --out is given")
    p.add_argument("--out", type=Path, default=None,
                   help=f"result JSON (default {DEFAULT_OUT} for the default sides; none with --tiny)")
    p.add_argument("--sides", default=None, help=f"comma-separated sides, the first the baseline (default "
                   f"{DEFAULT_SIDES}): ppojax, trl, ppojax@REV, ppojax+key=value+... (see above)")
    p.add_argument("--ppojax-rev", metavar="REV", help="short for --sides ppojax,ppojax@REV")
    p.add_argument("--force", action="store_true", help="write the result even if the machine was busy")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each round, wait up to S seconds for other processes to go quiet (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default): TRL with use_cpu=True, fp32; cuda: TRL on the GPU (use_cpu=False, bf16 "
                        "autocast, tf32) and ppojax on jax's default backend (must be a GPU) with bf16 compute")
    p.add_argument("--table", type=Path, metavar="JSON", help="print the README table from a result JSON and exit")
    p.add_argument("--row", type=Path, metavar="JSON", help="print the README line of each job (ratio and range) "
                   "from a result JSON and exit")
    p.add_argument("--child", choices=("ppojax", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--ppo-option", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--vocab-dtype", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.ppojax_rev is not None:
        if args.sides is not None:
            p.error("--ppojax-rev REV is short for --sides ppojax,ppojax@REV: give one or the other")
        args.sides = f"ppojax,ppojax@{args.ppojax_rev}"
    custom = args.sides is not None and args.sides != DEFAULT_SIDES
    args.sides = args.sides or DEFAULT_SIDES
    try:
        args.side_specs = [parse_side(x) for x in args.sides.split(",")]
    except ValueError as e:
        p.error(str(e))
    if len({s.name for s in args.side_specs}) != len(args.side_specs):
        p.error(f"--sides lists a side twice: {args.sides}")
    if args.out is None and not args.tiny and args.table is None and args.row is None:
        if custom:
            p.error("give --out for sides other than the default ppojax,trl (the default file holds those)")
        args.out = DEFAULT_OUT if args.device == "cpu" else DEFAULT_OUT.with_name(f"vs_trl_{args.device}.json")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Sides


PPO_OPTIONS = {"reuse_sampler_logprobs": bool, "critic": ("separate", "shared"), "vocab_chunk_size": int}
"""PPOConfig fields a ``ppojax+key=value`` side may set."""
BENCH_OPTIONS = {"vocab_dtype": ("float32", "bfloat16"), "xla": "a name of xla_cpu_flags.FLAG_SETS"}
"""Experiments of this script only (not library options)."""


class Side(NamedTuple):
    """One side: ``framework`` 'ppojax' or 'trl'; ``rev`` a git revision (ppojax only); ``options`` ((key, value),
    ...) for this checkout's ppojax."""

    name: str
    framework: str
    rev: Optional[str] = None
    options: tuple = ()


def option_value(key: str, text: str):
    """The typed value of a side option (one clear error for an unknown key or a bad value)."""
    kind = {**PPO_OPTIONS, **BENCH_OPTIONS}.get(key)
    if kind is None:
        raise ValueError(f"unknown ppojax side option {key!r}; options: {', '.join([*PPO_OPTIONS, *BENCH_OPTIONS])}")
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"option {key} takes true or false, got {text!r}")
        return text.lower() == "true"
    if kind is int:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"option {key} takes a positive int, got {text!r}")
        return int(text)
    if key == "xla":
        import _xla_flag_sets as xla_cpu_flags

        if text not in xla_cpu_flags.FLAG_SETS:
            raise ValueError(f"option xla={text!r}: not a flag set of xla_cpu_flags.FLAG_SETS "
                             f"({', '.join(xla_cpu_flags.FLAG_SETS)})")
        return text
    if text not in kind:
        raise ValueError(f"option {key} takes one of {', '.join(kind)}, got {text!r}")
    return text


def parse_side(text: str) -> Side:
    """``ppojax``, ``trl``, ``ppojax@REV`` or ``ppojax+key=value+key`` (a bare key means ``=true``)."""
    text = text.strip()
    if text == "trl":
        return Side(text, "trl")
    m = re.fullmatch(r"ppojax(?:@([\w./~^-]+))?((?:\+[\w]+(?:=[\w.-]+)?)*)", text)
    if not m:
        raise ValueError(f"side {text!r}: expected trl, ppojax, ppojax@REV or ppojax+key=value+...")
    rev, opts = m.group(1), [o for o in m.group(2).split("+") if o]
    if rev and opts:
        raise ValueError(f"side {text!r}: options apply to this checkout's ppojax only, not to another revision "
                         "(which runs its own code)")
    options = []
    for o in opts:
        key, _, value = o.partition("=")
        options.append((key, option_value(key, value or "true")))
    if len({k for k, _ in options}) != len(options):
        raise ValueError(f"side {text!r} sets an option twice")
    return Side(text, "ppojax", rev, tuple(options))


def export_revision(rev: str, into: Path) -> tuple[str, Path]:
    """``(commit, folder)``: the tree of ``rev`` written into a new folder under ``into`` by ``git archive``."""
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode:
        raise SystemExit(f"--sides ppojax@{rev}: {rev!r} is not a commit of the repository at {ROOT}")
    sha = found.stdout.strip()
    dest = Path(into) / f"rev_{sha[:12]}"
    dest.mkdir(parents=True)
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", sha], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as t:
        t.extractall(dest, filter="data")
    if not (dest / "benchmarks" / "vs_trl.py").exists():
        raise SystemExit(f"--sides ppojax@{rev}: commit {sha[:12]} has no benchmarks/vs_trl.py to run its side")
    return sha, dest


def side_variant(side: Side, job: str, iterations: int, ckpt: str, args, rev_dirs: dict) -> _interleave.Variant:
    """The child command of one side (without ``--child-out``, which each run adds)."""
    root = rev_dirs[side.rev] if side.rev else ROOT
    argv = [sys.executable, str(root / "benchmarks" / "vs_trl.py"), "--child", side.framework, "--job", job,
            "--iterations", str(iterations), "--ckpt", ckpt] + (["--tiny"] if args.tiny else []) \
        + (["--device", args.device] if args.device != "cpu" else [])
    # This folder first on the path: the side imports ppojax from its own tree, not from an installed copy.
    env = {"PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for key, value in side.options:
        if key in PPO_OPTIONS:
            argv += ["--ppo-option", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
        elif key == "vocab_dtype":
            argv += ["--vocab-dtype", value]
        elif key == "xla":
            import _xla_flag_sets as xla_cpu_flags

            env["XLA_FLAGS"] = xla_cpu_flags.FLAG_SETS[value]["flags"]
    return _interleave.Variant(side.name, tuple(argv), env, str(root))


def check_import(variant: _interleave.Variant) -> str:
    """Where the variant's processes import ppojax from; it must be its own folder's."""
    code = "import os, ppojax; print(os.path.realpath(os.path.dirname(ppojax.__file__)))"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **variant.env}, cwd=variant.cwd,
                       capture_output=True, text=True)
    got = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else r.stderr.strip()[-300:]
    want = os.path.realpath(os.path.join(variant.cwd, "ppojax"))
    if got != want:
        raise SystemExit(f"side {variant.name}: ppojax imports from {got!r}, not from {want!r}")
    return got


def _portable_import(path: str) -> str:
    """Where a side imported ppojax from, without this machine's paths: the checkout's own ``ppojax``, or
    ``<rev worktree>/ppojax`` for an ``@REV`` side's temporary worktree."""
    if "/rev_" in path:
        return "<rev worktree>/" + path.split("/rev_", 1)[1].split("/", 1)[1]
    return _env.portable_path(path)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def job_flops(j: dict) -> dict:
    L, d, V = j["n_layer"], j["n_embd"], VOCAB
    B, P, R = j["batch"], j["query"], j["response"]
    S = P + R

    def trunk(s):
        return L * (24 * d * d * s + 2 * d * s * (s + 1))

    gen = B * (trunk(S - 1) + R * 2 * d * V)
    ref = B * (trunk(S) + R * 2 * d * V)
    value = B * (trunk(S) + R * 2 * d)
    reward = B * (trunk(S) + 2 * d)
    train = j["epochs"] * 3 * (ref + value)  # actor fwd (with projection) + critic fwd, x3 for fwd+bwd
    return {"generation": gen, "scoring": ref + value + reward, "update": train,
            "total": gen + ref + value + reward + train,
            "ppojax_extra_actor_recompute": ref, "params_per_layer_matmul": 12 * d * d}


# ----------------------------------------------------------------------------------------------------------------
# Shared setup


def build_checkpoint(j: dict, directory: str) -> None:
    """Random policy weights (seed 0) in transformers format + the reward head (seed 1) as a .npy."""
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=j["n_embd"], n_layer=j["n_layer"],
                                  n_head=j["n_head"], bos_token_id=50256, eos_token_id=50256)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(directory)
    rng = np.random.default_rng(1)
    head = (rng.standard_normal((1, j["n_embd"])) / np.sqrt(j["n_embd"] + 1)).astype(np.float32)
    np.save(os.path.join(directory, "reward_head.npy"), head)


def make_prompts(tok, n: int, length: int):
    """``n`` prompts of exactly ``length`` real tokens: consecutive windows of the prompt file's token stream."""
    import numpy as np

    text = PROMPT_FILE.read_text()
    ids = tok(text)["input_ids"]
    while len(ids) < n * length:
        ids = ids + ids
    return np.asarray(ids[: n * length], np.int64).reshape(n, length)


def matmul_peak_jax(n=2048, reps=5, dtype=None) -> float:
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / min(ts)


def matmul_peak_torch(n=2048, reps=5, device="cpu", dtype=None) -> float:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / min(ts)


def summarize(iter_s: list, phases: dict, j: dict) -> dict:
    steady = iter_s[1:] if len(iter_s) > 1 else iter_s
    med = statistics.median(steady)
    out = {"first_iteration_s": iter_s[0], "iteration_median_s": med, "iterations_s": iter_s,
           "generated_tokens_per_s": j["batch"] * j["response"] / med}
    for name, ts in phases.items():
        st = ts[1:] if len(ts) > 1 else ts
        out[f"{name}_median_s"] = statistics.median(st) if st else None
        out[f"{name}_s"] = ts
    return out


# ----------------------------------------------------------------------------------------------------------------
# ppojax side


def ppojax_configs(j: dict, grad_accum_steps: int = 1, **ppo_options):
    """ppojax's ``(PPOConfig, OptimizerConfig)`` for job ``j`` with the hyperparameters matched to TRL's (the module
    docstring lists them); shared by this script, ``gpu.py`` and ``profile_iteration.py``. ``ppo_options``: further
    PPOConfig fields (a ``ppojax+key=value`` side: ``reuse_sampler_logprobs``, ``critic``, ``vocab_chunk_size``)."""
    import ppojax
    from ppojax.rl.kl import KLControlConfig

    ppo = ppojax.PPOConfig(batch_size=j["batch"], minibatch_size=j["batch"] // j["minibatches"],
                           ppo_epochs=j["epochs"], response_length=j["response"], temperature=TEMPERATURE,
                           eos_token_id=None, vf_coef=VF_COEF, clip_eps=CLIP, value_clip_eps=CLIP,
                           gamma=1.0, lam=0.95, kl=KLControlConfig(kind="fixed", init_coef=KL_COEF), **ppo_options)
    opt = ppojax.OptimizerConfig(learning_rate=LR, eps=ADAM_EPS, max_grad_norm=None,
                                 grad_accum_steps=grad_accum_steps)
    return ppo, opt


def _vocab_dtype_experiment(dtype: str) -> None:
    """Benchmark-only experiment: the iteration's vocabulary chunks (``token_logprobs`` of the rollout and the
    update) multiply in ``dtype``, accumulating in f32; the rest of the model and the sampler are unchanged. The
    iteration module's ``token_logprobs`` is looked up at trace time, so wrapping it before the first call is
    enough; the library has no such option."""
    import jax.numpy as jnp

    from ppojax.rl import iteration

    inner = iteration.token_logprobs

    @functools.wraps(inner)
    def token_logprobs(*a, **k):
        return inner(*a, **{**k, "compute_dtype": jnp.dtype(dtype)})

    iteration.token_logprobs = token_logprobs


def run_ppojax(j: dict, ckpt: str, iterations: int, device: str = "cpu", ppo_options: Optional[dict] = None,
               vocab_dtype: Optional[str] = None) -> dict:
    import numpy as np
    import jax
    import jax.numpy as jnp

    import ppojax
    from ppojax.train import loop

    if vocab_dtype is not None:
        _vocab_dtype_experiment(vocab_dtype)

    if device == "cuda" and jax.default_backend() != "gpu":
        raise RuntimeError(f"--device cuda: jax's default backend is {jax.default_backend()!r}, not 'gpu' "
                           "(install jax[cuda12] on a machine with an NVIDIA GPU)")
    # On the GPU: bf16 compute with f32 params (as TRL's bf16 autocast), against a bf16 matmul peak.
    peak = matmul_peak_jax() if device == "cpu" else matmul_peak_jax(8192, dtype=jnp.bfloat16)
    tok = ppojax.load_tokenizer("gpt2")
    config, params = ppojax.load_pretrained(ckpt)
    if device == "cuda":
        config = config.replace(dtype="bfloat16")
    head = np.load(os.path.join(ckpt, "reward_head.npy"))  # [1, d], torch score.weight
    rm_params = ppojax.init_value_params(config, params)
    rm_params = {"transformer": rm_params["transformer"],
                 "head": {"kernel": jnp.asarray(head.T), "bias": jnp.zeros((1,), jnp.float32)}}
    reward = ppojax.rewards.reward_model(config, rm_params)
    ppo, opt = ppojax_configs(j, **(ppo_options or {}))
    assert ppo.pad_token_id is None and tok.pad_token_id == config.vocab_size  # distinct pad = 50257
    state = ppojax.create_train_state(config, params, ppo=ppo, reward=reward, key=jax.random.key(0), optimizer=opt,
                                      total_iterations=iterations)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    state_bytes = {"params": nbytes(state.params), "frozen": nbytes(state.frozen), "opt_state": nbytes(state.opt_state)}
    prompts = make_prompts(tok, j["batch"] * iterations, j["query"]).astype(np.int32)

    iter_s, phases = [], {"rollout": [], "scoring": [], "update": []}

    def record(info):
        m = info.metrics
        assert m["response_length"] == j["response"], "ppojax stopped early"
        t = {"rollout": m["time/rollout_s"], "scoring": m["time/score_s"], "update": m["time/update_s"]}
        for k, v in t.items():
            phases[k].append(v)
        iter_s.append(sum(t.values()))  # the three phases, each waited for
        print(f"[ppojax] iteration {info.done - 1}: {iter_s[-1]:.2f} s (rollout {t['rollout']:.2f}, score "
              f"{t['scoring']:.2f}, update {t['update']:.2f}); score {m['score_mean']:.3f} kl {m['kl']:.3f}",
              flush=True)

    # The library's loop, in place (donated) as the runner does, each phase a separate program timed on its own.
    state = loop.train(state, _loop.Prompts(prompts.reshape(iterations, j["batch"], j["query"])),
                       iterations=iterations, donate=True, timing=True, callbacks=[record], check=None).state

    # Generation alone: the rollout's sampling on the same shapes (not part of the timed iterations).
    p, m = jnp.asarray(prompts[: j["batch"]]), jnp.ones((j["batch"], j["query"]), jnp.int32)
    gen = lambda k: jax.block_until_ready(ppojax.generate(config, state.actor_params, p, m, jax.random.key(k),
                                                          max_new_tokens=j["response"], temperature=TEMPERATURE))
    gen(0)
    gts = []
    for k in range(3):
        t0 = time.perf_counter()
        gen(k + 1)
        gts.append(time.perf_counter() - t0)
    out = summarize(iter_s, phases, j)
    out["generation_median_s"] = statistics.median(gts)
    out["rollout_forwards_median_s"] = out["rollout_median_s"] - out["generation_median_s"]
    out["matmul_peak_flops"] = peak
    out["devices"] = [str(d) for d in jax.devices()]
    out["state_bytes"] = state_bytes  # logical bytes (the critic's trunk shares the actor's buffers until updated)
    out["ppojax_path"] = _env.portable_path(os.path.dirname(ppojax.__file__))
    out["options"] = {**(ppo_options or {}), **({"vocab_dtype": vocab_dtype} if vocab_dtype else {})}
    out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    if device != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        out.update(device=device, device_kind=jax.devices()[0].device_kind,
                   precision="bf16 compute, f32 params; matmul peak: bf16 8192^3",
                   peak_device_mib=stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None)
    return out


# ----------------------------------------------------------------------------------------------------------------
# TRL side


def run_trl(j: dict, ckpt: str, iterations: int, device: str = "cpu") -> dict:
    if device == "cuda":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # ppojax (the tokenizer) imports jax: keep it off the GPU
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"  # PPOTrainer builds its own Accelerator(), which reads this
    import numpy as np
    import torch
    import transformers
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as pt

    import ppojax

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    peak = matmul_peak_torch() if device == "cpu" else matmul_peak_torch(8192, device="cuda", dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # CUDA kernels run asynchronously
    tok = ppojax.load_tokenizer("gpt2")  # GPT2TokenizerFast from the BPE files, pad <|pad|> = 50257, left padding
    policy = transformers.GPT2LMHeadModel.from_pretrained(ckpt)
    ref = transformers.GPT2LMHeadModel.from_pretrained(ckpt)
    for m in (policy, ref):
        m.generation_config.eos_token_id = None  # no EOS stop: every response is `response` tokens
        m.generation_config.pad_token_id = tok.pad_token_id
    value = transformers.GPT2ForSequenceClassification.from_pretrained(ckpt, num_labels=1)
    rm = transformers.GPT2ForSequenceClassification.from_pretrained(ckpt, num_labels=1)
    head = torch.from_numpy(np.load(os.path.join(ckpt, "reward_head.npy")))
    with torch.no_grad():
        value.score.weight.zero_()  # ppojax's critic head starts at zero
        rm.score.weight.copy_(head)
    for m in (value, rm):
        m.config.pad_token_id = tok.pad_token_id

    prompts = make_prompts(tok, j["batch"] * iterations, j["query"])
    ds = Dataset.from_dict({"input_ids": prompts.tolist()})
    tmp = tempfile.mkdtemp()
    cfg = PPOConfig(
        output_dir=tmp, use_cpu=device == "cpu", bf16=device == "cuda", report_to="none", save_strategy="no",
        logging_steps=1000,
        # TRL 1.12: rollout batch = per_device_train_batch_size x gradient_accumulation_steps; each of the
        # num_mini_batches minibatches (batch / num_mini_batches episodes) is one optimizer step.
        per_device_train_batch_size=j["batch"], gradient_accumulation_steps=1,
        num_mini_batches=j["minibatches"], total_episodes=j["batch"] * iterations, num_ppo_epochs=j["epochs"],
        response_length=j["response"], temperature=TEMPERATURE, stop_token=None, missing_eos_penalty=None,
        local_rollout_forward_batch_size=j["batch"], num_sample_generations=0, learning_rate=LR,
        adam_epsilon=ADAM_EPS, kl_coef=KL_COEF, kl_estimator="k1", vf_coef=VF_COEF, cliprange=CLIP,
        cliprange_value=CLIP, gamma=1.0, lam=0.95, seed=0, dataloader_drop_last=True,
        **({"tf32": True} if device == "cuda" else {}),
    )

    timers = {"generation": 0.0, "scoring": 0.0}

    def timed(fn, name=None):
        def wrapper(*a, **k):
            key = name or ("scoring" if not torch.is_grad_enabled() else None)
            if key:
                sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if key:
                sync()
                timers[key] += time.perf_counter() - t0
            return out
        return wrapper

    pt.batch_generation = timed(pt.batch_generation, "generation")
    pt.forward = timed(pt.forward)
    pt.get_reward = timed(pt.get_reward)

    marks = []
    phases = {"generation": [], "scoring": [], "update": []}

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync()
            now = time.perf_counter()
            it = now - marks[-1]
            marks.append(now)
            phases["generation"].append(timers["generation"])
            phases["scoring"].append(timers["scoring"])
            phases["update"].append(it - timers["generation"] - timers["scoring"])
            print(f"[trl] iteration {len(marks) - 2}: {it:.2f} s (generation {timers['generation']:.2f}, "
                  f"score {timers['scoring']:.2f}, update {phases['update'][-1]:.2f})", flush=True)
            timers["generation"] = timers["scoring"] = 0.0

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=ds, value_model=value, eval_dataset=None, callbacks=[Clock()])
    trainer.train()
    iter_s = [b - a for a, b in zip(marks, marks[1:])]
    assert len(iter_s) == iterations, (len(iter_s), iterations)
    out = summarize(iter_s, phases, j)
    out["matmul_peak_flops"] = peak
    out["num_threads"] = torch.get_num_threads()
    if device != "cpu":
        out.update(device=device, device_name=torch.cuda.get_device_name(),
                   mixed_precision=str(trainer.accelerator.mixed_precision),
                   tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                   precision="bf16 autocast (accelerate) on the prepared policy+value wrapper, i.e. the training "
                             "forward; generation and the no-grad ref/value/reward forwards call the unwrapped "
                             "modules (fp32 with tf32 matmuls); matmul peak: bf16 8192^3",
                   peak_device_mib=torch.cuda.max_memory_allocated() / 2**20)
    out["phase_note"] = ("generation = batch_generation; scoring = ref forward + value and reward get_reward under "
                         "no_grad; update = iteration - both (includes rewards/GAE/whitening, small)")
    return out


def child_main(args) -> None:
    j = JOBS["tiny" if args.tiny else args.job]
    others = _env.OtherLoad()
    t0 = time.time()
    kw = {} if args.device == "cpu" else {"device": args.device}
    if args.child == "ppojax":
        options = dict(o.partition("=")[::2] for o in args.ppo_option)
        kw.update(ppo_options={k: option_value(k, v) for k, v in options.items()}, vocab_dtype=args.vocab_dtype)
        res = run_ppojax(j, args.ckpt, args.iterations, **kw)
    else:
        res = run_trl(j, args.ckpt, args.iterations, **kw)
    res["wall_s"] = time.time() - t0
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    res["other_processes_cores"] = others.cores()
    Path(args.child_out).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------------------------------
# Parent: every side of a job in fresh subprocesses, interleaved over repeats


def run_child(variant: _interleave.Variant, repeat: int, tmp: str) -> dict:
    """One fresh process of one side; its result dict."""
    slug = re.sub(r"[^\w.-]", "_", variant.name)
    out = os.path.join(tmp, f"{slug}_{repeat}.json")
    print(f"== {variant.name} (round {repeat + 1})", flush=True)
    subprocess.run([*variant.argv, "--child-out", out], check=True, env={**os.environ, **variant.env},
                   cwd=variant.cwd)
    return json.loads(Path(out).read_text())


SPREAD_KEYS = ("first_iteration_s", "generation_median_s", "rollout_median_s", "rollout_forwards_median_s",
               "scoring_median_s", "update_median_s", "peak_rss_mib", "matmul_peak_flops")


def summarize_job(name: str, j: dict, iterations: int, sides: list, run: dict) -> dict:
    """Per side the spread over repeats of its per-process numbers, and each side's time against the first's."""
    flops = job_flops(j)
    res = {"job": name, "shape": j, "iterations": iterations, "flops_per_iteration": flops,
           "repeats": len(run["order"]), **run, "sides": {}}
    runs = run["runs"]
    for side in sides:
        it = _interleave.values_of(runs, side, "iteration_median_s")
        s = {"iteration_s": _interleave.spread(it)}
        for key in SPREAD_KEYS:
            vals = [v for v in (r.get(key) for r in runs if r["variant"] == side) if v is not None]
            if vals:
                s[key] = _interleave.spread(vals)
        s["other_processes_cores_max"] = max(r.get("other_processes_cores", 0.0) for r in runs
                                             if r["variant"] == side)
        s["achieved_flops"] = flops["total"] / s["iteration_s"]["median"]
        if "matmul_peak_flops" in s:
            s["fraction_of_matmul_peak"] = s["achieved_flops"] / s["matmul_peak_flops"]["median"]
        res["sides"][side] = s
    base = sides[0]
    res["ratios"] = {f"{x}/{base}": _interleave.paired_ratio(_interleave.values_of(runs, x, "iteration_median_s"),
                                                             _interleave.values_of(runs, base, "iteration_median_s"))
                     for x in sides[1:]}
    if sides[:2] == ["ppojax", "trl"]:
        res["target_speedup"] = TARGETS.get(name)
    return res


def overall_busy(jobs: dict) -> dict:
    """The result file's busy record: busy if any job's measurement was."""
    flags = [r["busy"] for r in jobs.values() if "busy" in r]
    return {"busy": any(f["busy"] for f in flags), "threshold_cores": _env.BUSY_OTHER_CORES,
            "max_other_cores_between_runs": max((f["max_other_cores_between_runs"] for f in flags), default=0.0),
            "max_other_cores_during_runs": max((f["max_other_cores_during_runs"] for f in flags), default=0.0)}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return None
    if args.row is not None:
        print("\n".join(readme_rows(json.loads(args.row.read_text()))))
        return None
    sides = [s.name for s in args.side_specs]
    names = ["b", "a"] if args.job == "both" else [args.job]
    if args.tiny:
        names = names[:1]
    load_before = _env.load_sample()
    _env.warn_if_busy(load_before)
    result = {"benchmark": "vs_trl", "format": 2, "date": _env.now_utc(), "tiny": args.tiny, "repeats": args.repeats,
              "sides": sides, "revisions": {}, "jobs": {}, "machine": _env.machine_info(),
              "versions": _env.versions(_env.DEFAULT_PACKAGES + ("trl", "accelerate")),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_before": load_before,
              "method": __doc__.split("\n\n", 1)[1].split("    python")[0].strip()}
    if args.out is not None and args.out.exists():  # keep the other job's results when running one job
        try:
            old = json.loads(args.out.read_text())
            if old.get("format") == 2 and old.get("sides") == sides:
                result["jobs"].update({k: v for k, v in old.get("jobs", {}).items() if k not in names})
        except (json.JSONDecodeError, OSError):
            pass
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        rev_dirs = {}
        for spec in args.side_specs:
            if spec.rev and spec.rev not in rev_dirs:
                sha, rev_dirs[spec.rev] = export_revision(spec.rev, Path(tmp))
                result["revisions"][spec.rev] = sha
        for name in names:
            j = JOBS["tiny" if args.tiny else name]
            iterations = args.iterations or (2 if args.tiny else {"a": 3, "b": 6}[name])
            ckpt = os.path.join(tmp, f"ckpt_{name}")
            build_checkpoint(j, ckpt)
            variants = [side_variant(spec, name, iterations, ckpt, args, rev_dirs) for spec in args.side_specs]
            imports = {v.name: _portable_import(check_import(v)) for v, spec in zip(variants, args.side_specs)
                       if spec.framework == "ppojax"}
            print(f"== job {name}: {', '.join(sides)}; {args.repeats} rounds x {iterations} iterations", flush=True)
            run = _interleave.run_interleaved(variants, args.repeats, lambda v, r: run_child(v, r, tmp),
                                              wait_quiet_s=args.wait_quiet)
            result["jobs"][name] = {**summarize_job(name, j, iterations, sides, run), "ppojax_imports": imports}
            print_summary(result["jobs"][name])
            result["load_after"] = _env.load_sample()
            result["busy"] = overall_busy(result["jobs"])
            written = _interleave.write_result(args.out, result, force=args.force)
            if written:
                print(f"wrote {written}")
    return result


def print_summary(r: dict) -> None:
    for side, s in r["sides"].items():
        it = s["iteration_s"]
        print(f"{r['job']} {side:12} median {it['median']:.2f} s/it (IQR {it['q1']:.2f}-{it['q3']:.2f}, range "
              f"{it['min']:.2f}-{it['max']:.2f}, n={it['n']}), {s['achieved_flops'] / 1e9:.1f} GFLOP/s, peak RSS "
              f"{s['peak_rss_mib']['median']:.0f} MiB, others <= {s['other_processes_cores_max']:.2f} cores")
    for line in job_rows(r):
        print(line)


def job_rows(r: dict, busy_note: bool = True) -> list:
    """One README line per ratio of a job: the ratio of medians and the min-max of the paired per-round ratios."""
    lines = []
    for key, q in r["ratios"].items():
        num, den = key.split("/", 1)
        target = f"; target >= {r['target_speedup']}x" if r.get("target_speedup") and key == "trl/ppojax" else ""
        s_num, s_den = r["sides"][num]["iteration_s"], r["sides"][den]["iteration_s"]
        lines.append(
            f"- job ({r['job']}), {r['repeats']} interleaved rounds x {r['iterations']} iterations: {key} time per "
            f"iteration **{q['of_medians']:.2f}** (paired rounds {q['min']:.2f}-{q['max']:.2f}{target}); "
            f"{den} {s_den['median']:.2f} s (IQR {s_den['q1']:.2f}-{s_den['q3']:.2f}), {num} {s_num['median']:.2f} s "
            f"(IQR {s_num['q1']:.2f}-{s_num['q3']:.2f})"
            + ("; **busy machine**" if busy_note and r.get("busy", {}).get("busy") else "") + ".")
    return lines


def readme_rows(res: dict) -> list:
    """The README lines of a result file (jobs b then a)."""
    if res.get("format") != 2:
        raise SystemExit("--row reads result files of the interleaved format (format 2); older files: --table")
    rows = []
    for name in ("b", "a", "tiny"):
        if name in res["jobs"]:
            rows += job_rows(res["jobs"][name])
    if res.get("revisions"):
        rows.append("  revisions: " + ", ".join(f"{k} = {v[:12]}" for k, v in res["revisions"].items()))
    return rows


def markdown_table(res: dict) -> str:
    """The README table of a result file: per job and side the median, IQR and range over rounds, then the ratios."""
    if res.get("format") != 2:
        return markdown_table_single_run(res)
    m = res["machine"]
    lines = [f"{m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB; {res['date']}; "
             f"trl {res['versions'].get('trl')}, torch {res['versions'].get('torch')}, jax {res['versions'].get('jax')}"
             + ("; **busy machine (written with --force)**" if res.get("busy", {}).get("busy") else ""),
             "",
             "| job | side | s/iteration (median) | IQR | min-max | first iteration s | generation s | scoring s | "
             "update s | GFLOP/s (% matmul peak) | peak RSS MiB | other load (cores, max) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    med = lambda s, k: f"{s[k]['median']:.2f}" if k in s else "-"
    for name in ("b", "a", "tiny"):
        r = res["jobs"].get(name)
        for side, s in (r["sides"].items() if r else ()):
            it = s["iteration_s"]
            score = med(s, "scoring_median_s")
            if "rollout_forwards_median_s" in s:
                score = f"{med(s, 'rollout_forwards_median_s')} + {score}"
            peak = f" ({100 * s['fraction_of_matmul_peak']:.0f}%)" if "fraction_of_matmul_peak" in s else ""
            lines.append(
                f"| {name} | {side} | {it['median']:.2f} | {it['q1']:.2f}-{it['q3']:.2f} | {it['min']:.2f}-"
                f"{it['max']:.2f} | {med(s, 'first_iteration_s')} | {med(s, 'generation_median_s')} | {score} | "
                f"{med(s, 'update_median_s')} | {s['achieved_flops'] / 1e9:.1f}{peak} | "
                f"{s['peak_rss_mib']['median']:.0f} | {s['other_processes_cores_max']:.2f} |")
    lines.append("")
    lines += readme_rows(res)
    return "\n".join(lines)


def markdown_table_single_run(res: dict) -> str:
    """The README table of a result file from before the interleaved repeats (one run per side)."""
    m = res["machine"]
    lines = [f"{m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB; {res['date']}; "
             f"trl {res['versions'].get('trl')}, torch {res['versions'].get('torch')}, jax {res['versions'].get('jax')}",
             "",
             "| job | side | s/iteration (median) | first iteration s | generation s | scoring s | update s | "
             "tokens/s | GFLOP/s (% matmul peak) | peak RSS MiB | other load (cores) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("b", "a"):
        r = res["jobs"].get(name)
        if not r:
            continue
        for side in ("ppojax", "trl"):
            s = r.get(side)
            if not s:
                continue
            gen = s.get("generation_median_s")
            score = s.get("scoring_median_s")
            if side == "ppojax":
                score_txt = f"{s['rollout_forwards_median_s']:.2f} + {score:.2f}"
            else:
                score_txt = f"{score:.2f}"
            lines.append(
                f"| {name} | {side} | {s['iteration_median_s']:.2f} | {s['first_iteration_s']:.1f} | {gen:.2f} | "
                f"{score_txt} | {s['update_median_s']:.2f} | {s['generated_tokens_per_s']:.1f} | "
                f"{s['achieved_flops'] / 1e9:.1f} ({100 * s['fraction_of_matmul_peak']:.0f}%) | "
                f"{s['peak_rss_mib']:.0f} | {s['other_processes_cores']:.2f}"
                + ("" if s["trustworthy"] else " (busy)") + " |")
    lines.append("")
    for name in ("b", "a"):
        r = res["jobs"].get(name)
        if r and "speedup_ppojax_over_trl" in r:
            q = r["ratio_ppojax_over_trl"]
            lines.append(f"- job ({name}), {r['iterations']} iterations: ppojax/TRL time per iteration "
                         f"**{q['iteration_time']:.2f}** (speed-up {r['speedup_ppojax_over_trl']:.2f}x, target "
                         f">= {r['target_speedup']}x), tokens/s {q['tokens_per_s']:.2f}, peak RSS {q['peak_rss']:.2f}, "
                         f"update time {q['update_time']:.2f}"
                         + ("" if r["trustworthy"] else "; **busy machine: not trustworthy**") + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
