"""Shared fixtures: tiny random GPT-2 checkpoints written by transformers itself (the independent reference)."""

import importlib.util
import os
import sys
from pathlib import Path

# Tests never touch the network: the hub is unreachable on CI machines anyway, and this makes it fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest


def _tiny_hf_config(**overrides):
    import transformers

    kw = dict(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
              bos_token_id=100, eos_token_id=100)
    kw.update(overrides)
    return transformers.GPT2Config(**kw)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny ``transformers.GPT2LMHeadModel`` saved with ``save_pretrained`` (safetensors)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_tiny_hf_config()).eval()
    path = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_hf_dir):
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()


@pytest.fixture
def left_padded_batch():
    """Three prompts of lengths 9, 6 and 3 over vocabulary 100, left-padded to 9 (pad id 100 = EOS here)."""
    rng = np.random.RandomState(0)
    lengths = [9, 6, 3]
    ids = np.full((3, 9), 100, np.int64)
    mask = np.zeros((3, 9), np.int64)
    for b, n in enumerate(lengths):
        ids[b, 9 - n:] = rng.randint(0, 100, n)
        mask[b, 9 - n:] = 1
    return ids, mask


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark('gpu')``: a script of ``benchmarks/`` imported as a module. The scripts import ``_env`` and
    each other from their own folder, so that folder joins ``sys.path`` for the session."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every module's compiled programs and cached arrays when it ends: one pytest process runs hundreds of
    jits, and without this the session's memory only grows."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
