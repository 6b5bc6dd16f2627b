"""The RLHF pipeline end to end on tiny models: synthetic VADER labels -> reward model -> PPO against the learned
reward raises the labeler's TRUE score; and a LoRA reward model on the policy's own frozen weights, as the SmolLM2
pipeline trains one, scoring a LoRA PPO run through the runner.

Setting (``rlhf_pipeline.py --fast``): a random 1-layer GPT-2 over a ~560-word English vocabulary (the prompt file's
words plus 128 positive and 128 negative VADER words), so that samples carry sentiment VADER can read and every stage
takes seconds; see the pipeline's docstring for why not GPT-2's 50k tokens here, and README.md for the pipeline's
SmolLM2 run (minutes, not a test).
"""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~50 s on 2 cores: samples, labels, trains a reward model, then PPO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import rlhf_pipeline

    out = tmp_path_factory.mktemp("pipeline")
    assert rlhf_pipeline.main(["--out", str(out), "--fast", "--vocab", "words"]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_reward_model_beats_chance_on_held_out_labels(pipeline):
    _, report = pipeline
    assert report["rm_chance"] == 0.25 and report["k"] == 4
    assert report["rm_val_accuracy"] > 0.45, report  # chance is 1/k = 0.25


def test_ppo_against_the_learned_reward_raises_the_true_score(pipeline):
    _, report = pipeline
    before, after = report["before"], report["after"]
    assert before["samples"] == after["samples"] >= 200
    gain = after["true_score"]["mean"] - before["true_score"]["mean"]
    noise = (before["true_score"]["stderr"] ** 2 + after["true_score"]["stderr"] ** 2) ** 0.5
    assert gain > 3 * noise, report  # VADER compound of fresh samples, same queries and sampling keys
    # The proxy rose too, and the run stayed finite and close to the reference.
    assert after["rm_score"]["mean"] > before["rm_score"]["mean"]
    assert 0 <= report["ppo_final_kl"] < 10


def test_stages_wrote_their_outputs(pipeline):
    out, report = pipeline
    from ppojax.rl import preferences

    rows = preferences.read_preferences(out / "labels.jsonl")  # every row labeled
    assert len(rows) == report["comparisons"] and all(r.k == 4 and "scores" in r.extra for r in rows)
    exported = {p.name for p in (out / "reward_model").iterdir()}
    assert {"config.json", "model.safetensors", "reward_head.json"} <= exported
    config = (out / "ppo" / "config.yaml").read_text()
    assert "kind: reward_model" in config and str(out / "reward_model") in config
    assert (out / "ppo" / "export" / "model.safetensors").exists()


def test_ppo_runner_refuses_a_bad_reward_model_path(pipeline, capsys):
    from ppojax import cli as runner

    out, _ = pipeline
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), "--run-dir", str(out / "bad_run"),
            "--set", f"model.name_or_path={out / 'policy'}", "--set", f"tokenizer={out / 'policy'}",
            "--set", "reward.kind=reward_model", "--set", f"reward.reward_model_path={out / 'nope'}"]
    capsys.readouterr()
    assert runner.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ppo_gpt2.py: error: reward.reward_model_path=") and "does not exist" in err


def test_a_lora_reward_model_on_the_policys_base_scores_a_lora_ppo_run(pipeline, tmp_path):
    """What the SmolLM2 pipeline does, at the tiny policy's size: train_reward.py --lora-rank writes adapters and a
    head only (no copy of the trunk), and a LoRA PPO run on the same base scores with it (the runner checks its
    contract on the run's base before compiling)."""
    import train_reward

    from ppojax.rl import reward_training
    from ppojax.rl.rewards import LoraRewardModel
    from ppojax import cli as runner

    out, _ = pipeline
    policy, rm_dir = out / "policy", tmp_path / "lora_rm"
    assert train_reward.main(["--data", str(out / "labels.jsonl"), "--init", str(policy), "--out", str(rm_dir),
                              "--lora-rank", "2", "--lora-targets", "c_attn,c_proj", "--epochs", "1", "--lr", "3e-3",
                              "--query-length", "8", "--response-length", "8", "--normalize-samples", "32"]) == 0
    report = json.loads((rm_dir / "train_report.json").read_text())
    assert report["lora"] == {"rank": 2, "alpha": 16.0, "targets": ["c_attn", "c_proj"]}
    names = {p.name for p in rm_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "reward_head.json"} <= names
    assert "model.safetensors" not in names
    assert isinstance(reward_training.load_reward_model(rm_dir), LoraRewardModel)

    run_dir = tmp_path / "ppo"
    argv = ["--config", str(REPO / "configs" / "tiny.yaml"), "--run-dir", str(run_dir), "--iterations", "2",
            "--set", f"model.name_or_path={policy}", "--set", f"tokenizer={policy}",
            "--set", "prompts.max_prompt_tokens=8", "--set", "lora.rank=2", "--set", "logging.tensorboard=false",
            "--set", "reward.kind=reward_model", "--set", f"reward.reward_model_path={rm_dir}"]
    assert runner.main(argv) == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(abs(m["score_mean"]) < 10 and m["score_std"] > 0 for m in metrics)
