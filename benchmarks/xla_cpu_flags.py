"""XLA:CPU options and the vocabulary chunks' dtype, compared on the ppojax side of a ``vs_trl.py`` job.

Each variant is the ppojax side of job (a) (default; ``--job b`` to screen faster) in fresh processes, interleaved
over ``--repeats`` rounds with the machinery of ``vs_trl.py`` (``_interleave.py``: rotated order, median, IQR and
min-max per variant, each variant's time over the first variant's with the range of the paired per-round ratios,
the busy gate: nothing is written from a busy machine unless ``--force``). The first variant is the baseline
(``default``: no flags). A variant is ``xla=NAME`` (``XLA_FLAGS`` = :data:`FLAG_SETS` ``[NAME]``) or
``vocab_dtype=bfloat16`` (the vocabulary chunks of the log-probs multiply in bf16 with f32 accumulation, a
benchmark-only experiment: see ``vs_trl._vocab_dtype_experiment``).

The flag names are the ones this jaxlib knows (``strings jaxlib/libjax_common.so | grep xla_cpu_``; XLA aborts on
an unknown flag). A flag that parses may still change nothing (deprecated, or not used by this program):
``--check`` compiles a small stand-in of the iteration (a causal attention block forward and backward, a
vocabulary-chunk matmul, an Adam-like elementwise update) under every set and reports whether its optimised HLO
differs from the default's and which library calls it makes (YNNPACK / XNNPACK / oneDNN fusions, custom calls).
It measures no time: run it first and drop sets that change nothing. Sets marked ``codegen`` act below the HLO
(LLVM code generation), where an unchanged HLO proves nothing; ``fast_math`` changes results beyond the order of
float sums. With jaxlib 0.10.2 on a 2-core AMD EPYC (``--check``, 2026-12-01) only ``ynn_all``, ``ynn_off`` and
``no_fusion_emitters`` changed the stand-in's program; the oneDNN and XNNPACK sets parsed and changed nothing.

    python benchmarks/xla_cpu_flags.py --check                                  # seconds; nothing timed
    python benchmarks/xla_cpu_flags.py --job b --repeats 4     # default variants: the sets that change the program
    python benchmarks/xla_cpu_flags.py --job a --variants default,<the best of b> --repeats 4
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

from _xla_flag_sets import FLAG_SETS  # noqa: E402  (beside this script)

EXTRA_VARIANTS = {"vocab_bf16": "ppojax+xla=default+vocab_dtype=bfloat16"}
"""Variants that are not flag sets: name -> ``vs_trl.py`` side."""


def side_of(variant: str) -> str:
    """The ``vs_trl.py`` side of a variant name: a flag set or one of :data:`EXTRA_VARIANTS`."""
    if variant in EXTRA_VARIANTS:
        return EXTRA_VARIANTS[variant]
    if variant not in FLAG_SETS:
        raise ValueError(f"unknown variant {variant!r}: flag sets {', '.join(FLAG_SETS)}; or "
                         f"{', '.join(EXTRA_VARIANTS)}")
    return f"ppojax+xla={variant}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compile a stand-in under every flag set; time nothing")
    p.add_argument("--job", choices=("a", "b"), default="a")
    p.add_argument("--variants", default="default,ynn_all,ynn_off,no_fusion_emitters,vocab_bf16",
                   help="comma-separated, the first the baseline: names of FLAG_SETS or " + ", ".join(EXTRA_VARIANTS))
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations per process (vs_trl's default)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default results/xla_cpu_flags_<job>.json)")
    p.add_argument("--force", action="store_true", help="write the result even if the machine was busy")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S")
    p.add_argument("--tiny", action="store_true", help="smoke run (vs_trl --tiny), writes only with --out")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the --check child
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",")]
    try:
        args.sides = [side_of(v) for v in names]
    except ValueError as e:
        p.error(str(e))
    if args.out is None and not args.tiny and not args.check:
        args.out = HERE / "results" / f"xla_cpu_flags_{args.job}_cpu.json"
    return args


# ----------------------------------------------------------------------------------------------------------------
# --check: does a flag set change the compiled program?


def _stand_in_hlo() -> str:
    """The optimised HLO of a small stand-in of the iteration's kinds of work (runs in the probe child)."""
    import jax
    import jax.numpy as jnp

    B, T, D, V, H = 4, 16, 64, 512, 4

    def block(w, x):  # causal attention + MLP, as a GPT-2 block
        q, k, v = jnp.split(x @ w["qkv"], 3, axis=-1)
        split = lambda t: t.reshape(B, T, H, D // H).transpose(0, 2, 1, 3)
        a = jnp.einsum("bhqd,bhkd->bhqk", split(q), split(k)) / jnp.sqrt(D // H)
        a = jnp.where(jnp.tril(jnp.ones((T, T), bool)), a, -1e9)
        o = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(a, -1), split(v)).transpose(0, 2, 1, 3).reshape(B, T, D)
        x = x + o @ w["proj"]
        return x + jax.nn.gelu(x @ w["fc"]) @ w["out"]

    def loss(w, x, tokens):
        h = block(w, x).reshape(B * T, D)
        z = h @ w["emb"].T  # the vocabulary matmul
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z, -1), tokens[:, None], -1))

    def step(w, m, x, tokens):
        g = jax.grad(loss)(w, x, tokens)
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
        return jax.tree.map(lambda w, m: w - 1e-3 * m, w, m), m

    key = iter(jax.random.split(jax.random.key(0), 8))
    shapes = {"qkv": (D, 3 * D), "proj": (D, D), "fc": (D, 4 * D), "out": (4 * D, D), "emb": (V, D)}
    w = {k: 0.02 * jax.random.normal(next(key), s) for k, s in shapes.items()}
    x = jax.random.normal(next(key), (B, T, D))
    tokens = jax.random.randint(next(key), (B * T,), 0, V)
    return jax.jit(step).lower(w, w, x, tokens).compile().as_text()


def hlo_summary(text: str) -> dict:
    """A fingerprint of an optimised HLO module (metadata and names stripped) and counts of its library calls."""
    body = re.sub(r", metadata=\{[^}]*\}", "", text)
    body = re.sub(r"%[\w.\-]+", "%", body)
    kinds = collections.Counter()
    for line in text.splitlines():
        m = re.search(r"= (?:\([^)]*\)|\S+) ([\w-]+)\(", line)
        if not m:
            continue
        op = m.group(1)
        name = re.match(r"\s*(?:ROOT )?%([\w\-]+?)(?:\.\d+)? =", line)
        lib = re.search(r'custom_call_target="([^"]+)"', line)
        if lib:
            kinds[f"custom-call:{lib.group(1)}"] += 1
        elif op == "fusion" and name and re.match(r"(ynn|xnn|onednn)", name.group(1)):
            kinds[f"fusion:{name.group(1).split('_')[0]}"] += 1
        elif op in ("fusion", "dot"):
            kinds[op] += 1
    return {"fingerprint": hashlib.sha256(body.encode()).hexdigest()[:16], "calls": dict(sorted(kinds.items()))}


def check(names) -> dict:
    """Compile the stand-in under each flag set in a fresh process: does it parse, does the program change?"""
    out = {}
    for name in names:
        flags = FLAG_SETS[name]["flags"]
        r = subprocess.run([sys.executable, __file__, "--probe"], env={**os.environ, "XLA_FLAGS": flags},
                           capture_output=True, text=True, cwd=str(HERE))
        if r.returncode:
            out[name] = {"flags": flags, "error": (r.stderr.strip().splitlines() or ["?"])[-1][-300:]}
        else:
            out[name] = {"flags": flags, **json.loads(r.stdout.strip().splitlines()[-1])}
    base = out.get("default", {}).get("fingerprint")
    for name, r in out.items():
        if "fingerprint" in r:
            r["changes_program"] = r["fingerprint"] != base
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(hlo_summary(_stand_in_hlo())))
        return None
    if args.check:
        res = check(list(FLAG_SETS))
        for name, r in res.items():
            same = "same HLO (acts in codegen?)" if FLAG_SETS[name].get("codegen") else "NO CHANGE"
            same = "baseline" if name == "default" else same
            state = r.get("error") or ("changes the program" if r["changes_program"] else same)
            print(f"{name:22} {state:22} {r.get('calls', '')}   [{r['flags']}]")
        return res
    sys.path.insert(0, str(HERE))
    import vs_trl

    argv_vs = ["--job", args.job, "--sides", ",".join(args.sides), "--repeats", str(args.repeats),
               "--wait-quiet", str(args.wait_quiet)] + (["--iterations", str(args.iterations)] if args.iterations
                                                       else []) \
        + (["--out", str(args.out)] if args.out else []) + (["--force"] if args.force else []) \
        + (["--tiny"] if args.tiny else [])
    result = vs_trl.main(argv_vs)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
