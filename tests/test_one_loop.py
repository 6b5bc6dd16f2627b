"""One training loop: every place that advances a train state iteration after iteration (the runner, sweeps, the
pipeline, every benchmark) goes through ``ppojax.train.loop.train``. Checked on the source: a ``for``/``while`` loop
whose body calls an iteration entry point is a training loop, and only ``ppojax/train/loop.py`` may hold one."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALLOWED = {REPO / "ppojax" / "train" / "loop.py"}
# The calls that advance a train state by one iteration (or one of its phases).
STEP_CALLS = {"train_step", "ppo_iteration", "update", "rollout", "shard_map_iteration", "vmapped_step"}


def _called_name(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Attribute):
        return f.attr
    return f.id if isinstance(f, ast.Name) else ""


def _training_loops(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.While)):
            calls = {_called_name(c) for c in ast.walk(node) if isinstance(c, ast.Call)}
            hit = calls & STEP_CALLS
            # ``state.update(...)``-style dict updates are not iterations: require a state-like argument.
            real = [c for c in ast.walk(node) if isinstance(c, ast.Call) and _called_name(c) in hit
                    and not (isinstance(c.func, ast.Attribute) and _called_name(c) == "update"
                             and not _looks_like_ppojax(c.func.value))]
            if real:
                yield node.lineno, sorted({_called_name(c) for c in real})


def _looks_like_ppojax(value: ast.AST) -> bool:
    """``ppojax.update``, ``iteration.update``, ``step.update``, ``mesh_step.update``: a module, not a dict."""
    return isinstance(value, ast.Name) and value.id in {"ppojax", "iteration", "step", "mesh_step", "ppo"}


def test_the_only_training_loop_is_ppojax_train_loop():
    offenders = []
    for folder in ("ppojax", "experiments", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path in ALLOWED:
                continue
            offenders += [f"{path.relative_to(REPO)}:{line} calls {', '.join(names)} in a loop"
                          for line, names in _training_loops(path)]
    assert not offenders, "training loops outside ppojax/train/loop.py:\n" + "\n".join(offenders)


def test_the_check_finds_a_hand_written_loop(tmp_path):
    """The scan is able to fail: a benchmark-style loop over ppojax.train_step is found."""
    bad = tmp_path / "bench.py"
    bad.write_text("import ppojax\nfor it in range(3):\n    state, m = ppojax.train_step(state, ids, mask)\n"
                   "d = {}\nfor k in ks:\n    d.update(k)\n")
    assert list(_training_loops(bad)) == [(2, ["train_step"])]
