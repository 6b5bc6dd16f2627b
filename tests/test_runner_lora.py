"""experiments/ppo_gpt2.py with LoRA (``lora.rank > 0``) on the tiny config: both exports checked by transformers and
PEFT, exact resume through the runner, and bad LoRA inputs (settings, and resuming across LoRA and full
fine-tuning) as one error line with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "ppo_gpt2.py"
TINY = REPO / "configs" / "tiny.yaml"
LORA = ("--set", "lora.rank=2", "--set", "lora.alpha=4", "--set", "logging.tensorboard=false")


def _run(*args, check=True, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _error_line(proc) -> str:
    """The one error line of a failed start (exit 2)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny config with LoRA (rank 2 on every GPT-2 projection), 4 iterations uninterrupted."""
    run_dir = tmp_path_factory.mktemp("lora_straight")
    _run("--config", TINY, "--run-dir", run_dir, "--iterations", 4, *LORA)
    return run_dir


def _base():
    """The tiny config's random base, as the runner initialises it (model.init_seed 0)."""
    import jax

    import ppojax
    from ppojax.io import configlib
    from ppojax.train.config import ExperimentConfig

    cfg = configlib.from_dict(ExperimentConfig, configlib.load_yaml(TINY))
    config = cfg.model.random_init_config()
    return config, ppojax.init_params(config, jax.random.key(cfg.model.init_seed))


def _batch():
    ids = np.array([[464, 3807, 373, 845, 922], [50257, 50257, 40, 588, 340]])
    mask = (ids != 50257).astype(np.int64)
    return ids, mask


def _torch_logits(model, ids, mask):
    import torch

    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.where(mask > 0, ids, 0)), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy()


def test_lora_run_exports_the_merged_policy_and_a_peft_adapter(straight, tmp_path):
    import jax.numpy as jnp
    import peft
    import transformers

    import ppojax
    from ppojax.models import lora
    from ppojax.rl.roles import roles_from_config

    assert {"export", "export-adapter", "checkpoints", "metrics.jsonl"} <= {p.name for p in straight.iterdir()}
    config, base = _base()
    spec, adapters = lora.load_adapter(straight / "export-adapter", config)
    assert (spec.rank, spec.alpha) == (2, 4.0) and set(spec.targets) == set(roles_from_config(
        type("L", (), {"rank": 2, "alpha": 4.0, "targets": ()})(), config).targets)
    # The adapters trained: B left zero (and with it the update A B) would make every check below vacuous.
    assert all(np.abs(np.asarray(a["lora_b"])).max() > 0 for a in adapters.values())
    ids, mask = _batch()
    adapted = np.asarray(ppojax.forward(config, spec.merge(base, adapters), jnp.asarray(ids), jnp.asarray(mask)))
    unadapted = np.asarray(ppojax.forward(config, base, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(adapted - unadapted)[mask > 0].max() > 1e-4

    # export/: the merged weights, read by transformers, give the adapted logits.
    merged = transformers.GPT2LMHeadModel.from_pretrained(straight / "export").eval()
    np.testing.assert_allclose(_torch_logits(merged, ids, mask)[mask > 0], adapted[mask > 0], atol=1e-4)

    # export-adapter/: PEFT applies it to the base (here the run's random init, written for transformers).
    ppojax.save_pretrained(tmp_path / "base", config, base)
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    model = peft.PeftModel.from_pretrained(hf_base, straight / "export-adapter").eval()
    np.testing.assert_allclose(_torch_logits(model, ids, mask)[mask > 0], adapted[mask > 0], atol=1e-4)
    peft_config = json.loads((straight / "export-adapter" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] is None  # a random init has no name to point at


def test_export_checkpoint_writes_the_adapter_too(straight):
    from safetensors.numpy import load_file

    _run("--config", TINY, "--run-dir", straight, "--iterations", 4, "--export-checkpoint", 4, *LORA)
    for final, exported in (("export/model.safetensors", "export-4/model.safetensors"),
                            ("export-adapter/adapter_model.safetensors",
                             "export-adapter-4/adapter_model.safetensors")):
        a, b = load_file(str(straight / final)), load_file(str(straight / exported))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_an_interrupted_lora_run_resumes_exactly(straight, tmp_path):
    run_dir = tmp_path / "resumed"
    _run("--config", TINY, "--run-dir", run_dir, "--iterations", 2, *LORA)
    proc = _run("--config", TINY, "--run-dir", run_dir, "--iterations", 4, *LORA)
    assert "resuming" in proc.stderr
    resumed, reference = _metrics(run_dir), _metrics(straight)
    assert [m["iteration"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, reference):
        a.pop("time_s"), b.pop("time_s")
        assert a == b, a["iteration"]


@pytest.mark.parametrize("setting, message", [
    ("lora.targets=c_attn,q_proj", "LoRA targets ['q_proj'] match no projection of the gpt2 model"),
    ("lora.rank=64", "LoRA rank 64 is larger than min(in, out)"),  # tiny.yaml's width is 32
    ("lora.rank=-1", "rank must be an int >= 0"),
])
def test_bad_lora_settings_fail_before_compiling(setting, message, tmp_path):
    run_dir = tmp_path / "run"
    proc = _run("--config", TINY, "--run-dir", run_dir, *LORA, "--set", setting, check=False, timeout=300)
    assert message in _error_line(proc)
    assert not run_dir.exists()  # failed before the model was initialised: nothing written


@pytest.mark.slow
def test_resuming_across_lora_and_full_fine_tuning_says_so(straight, tmp_path):
    # A LoRA run's checkpoints, resumed without LoRA or with another rank.
    line = _error_line(_run("--config", TINY, "--run-dir", straight, "--iterations", 6, check=False))
    assert "this checkpoint was saved by a LoRA run" in line
    line = _error_line(_run("--config", TINY, "--run-dir", straight, "--iterations", 6, *LORA,
                            "--set", "lora.rank=4", check=False))
    assert "LoRA adapters have rank 2, this run's rank 4" in line
    line = _error_line(_run("--config", TINY, "--run-dir", straight, "--iterations", 6, *LORA,
                            "--set", "lora.targets=c_attn", check=False))
    assert "LoRA adapters are on other modules" in line
    assert [m["iteration"] for m in _metrics(straight)] == [1, 2, 3, 4]  # nothing changed

    # A full fine-tune's checkpoints, resumed with LoRA.
    full = tmp_path / "full"
    _run("--config", TINY, "--run-dir", full, "--iterations", 1, "--set", "logging.tensorboard=false")
    line = _error_line(_run("--config", TINY, "--run-dir", full, "--iterations", 2, *LORA, check=False))
    assert "this checkpoint was saved by a full fine-tuning run" in line
    line = _error_line(_run("--config", TINY, "--run-dir", full, "--iterations", 1, "--export-checkpoint", 1,
                            *LORA, check=False))
    assert "this checkpoint was saved by a full fine-tuning run" in line
