"""RunLogger: the files a run leaves behind, read back independently (json, the TFRecord format, the PNG)."""

import io
import json
import math
import re
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ppojax.io.logger import RunLogger, format_console_line, plot_curves, read_metrics, read_samples


def _metrics(i):
    return {"score_mean": 0.1 * i, "score_std": 0.5, "kl": 0.01 * i, "kl_coef": 0.2 - 0.001 * i,
            "entropy": 3.0 - 0.01 * i}


def _strict_json(line):
    """json.loads that refuses the NaN/Infinity extensions Python's json accepts by default."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(line, parse_constant=refuse)


def _raw_lines(path):
    text = Path(path).read_text()
    assert text.endswith("\n")
    return text.splitlines()


def _log_range(run_dir, iterations, **kw):
    logger = RunLogger(run_dir, **{"tensorboard": False, "console": "off", "curves": False, **kw})
    for i in iterations:
        logger.log_metrics(i, _metrics(i))
    return logger


def test_metrics_jsonl_lines(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False, console="off", curves=False)
    logger.log_metrics(1, {"score_mean": 0.5, "kl": np.float32(0.25), "loss": 2})
    logger.log_metrics(2, {"score_mean": float("nan"), "kl": float("inf"), "loss": -float("inf")})
    logger.log_metrics(3, {"score_mean": 1.5, "kl": 0.75, "loss": 1})
    # Flushed line by line: readable before close, as after a kill.
    lines = _raw_lines(tmp_path / "metrics.jsonl")
    logger.close()

    assert len(lines) == 3
    records = [_strict_json(line) for line in lines]
    for i, r in enumerate(records, start=1):
        assert list(r) == ["iteration", "score_mean", "kl", "loss"]
        assert r["iteration"] == i and isinstance(r["iteration"], int)
    assert records[0] == {"iteration": 1, "score_mean": 0.5, "kl": 0.25, "loss": 2.0}
    assert records[1] == {"iteration": 2, "score_mean": None, "kl": None, "loss": None}  # non-finite -> null

    back = read_metrics(tmp_path)
    assert [r["iteration"] for r in back] == [1, 2, 3]
    assert math.isnan(back[1]["score_mean"]) and math.isnan(back[1]["kl"])
    assert back[2]["kl"] == 0.75


def test_metrics_rejects_repeats_and_bad_values(tmp_path):
    logger = _log_range(tmp_path, [1, 2])
    with pytest.raises(ValueError, match="already logged"):
        logger.log_metrics(2, _metrics(2))
    with pytest.raises(ValueError, match="reserved"):
        logger.log_metrics(3, {"iteration": 3.0})
    with pytest.raises(TypeError, match="host scalar"):
        logger.log_metrics(3, {"kl": "high"})
    logger.close()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2]


def test_resume_keeps_each_iteration_once(tmp_path):
    logger = _log_range(tmp_path, range(1, 11))
    logger.log_samples(5, [{"prompt": "a", "response": "b", "score": 1.0}])
    logger.log_samples(8, [{"prompt": "c", "response": "d", "score": 2.0}])
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # killed mid-write of iteration 11
        f.write('{"iteration": 11, "score_mean": 0.3')

    resumed = RunLogger(tmp_path, tensorboard=False, console="off", curves=False, resume_from_iteration=6)
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert [r["iteration"] for r in read_samples(tmp_path)] == [5]
    with pytest.raises(ValueError):
        resumed.log_metrics(6, _metrics(6))  # the checkpoint already covers it
    for i in (7, 8):
        resumed.log_metrics(i, _metrics(i))
    resumed.close()

    lines = _raw_lines(tmp_path / "metrics.jsonl")
    iterations = [_strict_json(line)["iteration"] for line in lines]
    assert iterations == [1, 2, 3, 4, 5, 6, 7, 8]
    assert _strict_json(lines[6]) == {"iteration": 7, **_metrics(7)}
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic rewrite left no temp file behind


def test_truncated_last_line_dropped(tmp_path):
    _log_range(tmp_path, range(1, 4)).close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "kl"')
    # A reader (e.g. a plotting script on a live run) skips it...
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    # ...and a resume past all complete lines still removes it, so the next line starts clean.
    _log_range(tmp_path, [4], resume_from_iteration=3).close()
    assert [_strict_json(line)["iteration"] for line in _raw_lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_complete_last_line_without_newline_kept(tmp_path):
    _log_range(tmp_path, range(1, 3)).close()
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text().rstrip("\n"))  # killed between the object and its newline
    _log_range(tmp_path, [3], resume_from_iteration=2).close()
    assert [_strict_json(line)["iteration"] for line in _raw_lines(path)] == [1, 2, 3]


def test_fresh_run_starts_a_clean_log(tmp_path):
    _log_range(tmp_path, range(0, 5)).close()
    _log_range(tmp_path, range(0, 2)).close()  # resume_from_iteration=0: a new run in the same directory
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1]


def test_samples_jsonl(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False, console="off", curves=False)
    rows = [
        {"prompt": "The movie", "response": " was great | really\nfun", "score": np.float32(0.75)},
        {"prompt": "I think", "response": " \u00e9h", "score": float("nan"), "length": 3},
    ]
    logger.log_samples(4, rows)
    logger.log_samples(9, rows[:1])
    logger.close()
    lines = [_strict_json(line) for line in _raw_lines(tmp_path / "samples.jsonl")]
    assert lines == [
        {"iteration": 4, "prompt": "The movie", "response": " was great | really\nfun", "score": 0.75},
        {"iteration": 4, "prompt": "I think", "response": " \u00e9h", "score": None, "length": 3},
        {"iteration": 9, "prompt": "The movie", "response": " was great | really\nfun", "score": 0.75},
    ]
    assert list(lines[0]) == ["iteration", "prompt", "response", "score"]
    assert read_samples(tmp_path) == lines


def _read_events(logdir):
    """Parse TFRecord event files by hand: [u64 length][u32 masked crc][payload][u32 masked crc]."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    from tensorboardX.record_writer import masked_crc32c

    files = sorted(Path(logdir).glob("events.out.tfevents.*"))
    events = []
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            payload = data[pos + 12:pos + 12 + n]
            assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(payload)
            events.append((path, event_pb2.Event.FromString(payload)))
            pos += 16 + n
    return files, events


def test_tensorboard_scalars_and_text(tmp_path):
    pytest.importorskip("tensorboardX")
    logger = RunLogger(tmp_path, console="off", curves=False)
    for i in (1, 2, 3):
        logger.log_metrics(i, _metrics(i))
    logger.log_samples(3, [{"prompt": "p", "response": "r", "score": 0.5}])
    logger.close()

    files, events = _read_events(tmp_path / "tensorboard")
    assert files and all(f.stat().st_size > 0 for f in files)
    scalars = {}
    texts = []
    for _, e in events:
        for v in e.summary.value:
            if v.HasField("simple_value"):
                scalars.setdefault(v.tag, []).append((e.step, v.simple_value))
            elif v.metadata.plugin_data.plugin_name == "text":
                texts.append((e.step, v.tensor.string_val[0].decode()))
    assert set(scalars) == set(_metrics(1))
    steps, values = zip(*scalars["kl"])
    assert steps == (1, 2, 3)
    np.testing.assert_allclose(values, [0.01, 0.02, 0.03], rtol=1e-6)
    assert len(texts) == 1 and texts[0][0] == 3
    assert "| prompt | response | score |" in texts[0][1] and "| p | r | 0.500 |" in texts[0][1]


def test_tensorboard_resume_purges_later_steps(tmp_path):
    pytest.importorskip("tensorboardX")
    _log_range(tmp_path, range(1, 10), tensorboard=True).close()
    logger = RunLogger(tmp_path, console="off", curves=False, resume_from_iteration=6)
    logger.log_metrics(7, _metrics(7))
    logger.close()
    _, events = _read_events(tmp_path / "tensorboard")
    starts = [e.step for _, e in events if e.HasField("session_log") and e.session_log.status == 1]  # START
    assert starts == [0, 7]  # fresh run hides anything older; the resume hides steps >= 7 of the crashed run


def test_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    run_dir = tmp_path / "gpt2_sentiment_run"
    _log_range(run_dir, range(1, 41), curves=True).close()  # close() writes curves.png
    png = run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] >= 400 and image.shape[1] >= 600
    assert image[..., :3].std() > 0.01  # not a blank canvas

    fig = plot_curves(run_dir, tmp_path / "again.png", window=3)
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == ["score", "KL", "KL coefficient", "entropy"]
    assert fig._suptitle.get_text() == "gpt2_sentiment_run"
    kl_line = fig.axes[1].lines[0]
    np.testing.assert_allclose(kl_line.get_xdata(), np.arange(1, 41))
    np.testing.assert_allclose(kl_line.get_ydata(), 0.01 * np.arange(1, 41))
    # The score panel: raw line and a trailing rolling mean over 3 iterations.
    raw, rolling = fig.axes[0].lines
    scores = 0.1 * np.arange(1, 41)
    expected = [scores[max(0, i - 2):i + 1].mean() for i in range(40)]
    np.testing.assert_allclose(rolling.get_ydata(), expected, rtol=1e-9)


def test_curves_from_records_with_missing_metric_and_nan(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"iteration": i, "score_mean": float("nan") if i == 2 else float(i), "kl": 0.1} for i in range(1, 5)]
    fig = plot_curves(records, tmp_path / "c.png", window=2)
    assert (tmp_path / "c.png").stat().st_size > 1000
    np.testing.assert_allclose(fig.axes[0].lines[1].get_ydata(), [1.0, 1.0, 3.0, 3.5])  # NaN skipped
    assert not fig.axes[2].lines and "kl_coef" in fig.axes[2].texts[0].get_text()


def test_non_main_process_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = RunLogger(run_dir, is_main_process=False, wandb={"project": "x"}, console="lines", console_every=1,
                       resume_from_iteration=3)
    logger.log_metrics(4, _metrics(4))
    logger.log_samples(4, [{"prompt": "p", "response": "r", "score": 1.0}])
    assert logger.plot() is None
    logger.close()
    assert not run_dir.exists()
    assert capsys.readouterr() == ("", "")


def test_non_main_process_leaves_existing_logs_alone(tmp_path):
    _log_range(tmp_path, range(1, 6)).close()
    before = (tmp_path / "metrics.jsonl").read_bytes()
    RunLogger(tmp_path, is_main_process=False, resume_from_iteration=2).close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_wandb_requested_but_missing_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, installed or not
    with pytest.warns(RuntimeWarning, match="wandb") as record:
        logger = RunLogger(tmp_path, tensorboard=False, console="off", curves=False, wandb={"project": "ppojax"})
        logger.log_metrics(1, _metrics(1))
        logger.log_samples(1, [{"prompt": "p", "response": "r", "score": 1.0}])
        logger.close()
    assert len([w for w in record if "wandb" in str(w.message)]) == 1
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1]


def test_wandb_calls_when_installed(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw))
    fake.log = lambda data, step: calls.append(("log", data, step))
    fake.finish = lambda: calls.append(("finish",))

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    fake.Table = Table
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = RunLogger(tmp_path, tensorboard=False, console="off", curves=False,
                       wandb={"project": "ppojax", "name": "r1", "config": {"lr": 1e-5}})
    logger.log_metrics(1, {"kl": 0.5})
    logger.log_samples(1, [{"prompt": "p", "response": "r", "score": 2.0}])
    logger.close()
    assert calls[0] == ("init", {"dir": str(tmp_path), "project": "ppojax", "name": "r1", "config": {"lr": 1e-5}})
    assert calls[1] == ("log", {"kl": 0.5}, 1)
    _, data, step = calls[2]
    assert step == 1 and data["samples"].columns == ["prompt", "response", "score"]
    assert data["samples"].data == [["p", "r", 2.0]]
    assert calls[3] == ("finish",)


def test_format_console_line():
    m = {"score_mean": 0.123, "kl": 1.23, "kl_coef": 0.15, "entropy": 3.21, "other": 9.0}
    expected = "it 10/200 | score 0.123 | kl 1.23 | kl_coef 0.150 | entropy 3.21 | 1.4 s/it"
    assert format_console_line(10, 200, m, 1.4) == expected
    assert format_console_line(7, None, {"kl": float("nan")}) == "it 7 | kl nan"
    assert format_console_line(1, 5, {"score_mean": -12.0}, 0.05) == "it 1/5 | score -12.0 | 0.05 s/it"


def test_console_lines_when_not_a_tty(tmp_path):
    stream = io.StringIO()  # isatty() is False, so "auto" picks plain lines
    logger = RunLogger(tmp_path, tensorboard=False, progress_total=12, console_every=5, stream=stream,
                       curves=False)
    for i in range(1, 13):
        logger.log_metrics(i, _metrics(i))
    logger.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["it 5/12", "it 10/12", "it 12/12"]
    pattern = r"it \d+/12 \| score [\d.]+ \| kl [\d.]+ \| kl_coef [\d.]+ \| entropy [\d.]+ \| [\d.e-]+ s/it"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert lines[1].startswith("it 10/12 | score 1.00 | kl 0.100 | kl_coef 0.190 | entropy 2.90 |")


def test_console_tqdm_forced(tmp_path):
    stream = io.StringIO()
    logger = RunLogger(tmp_path, tensorboard=False, progress_total=4, console="tqdm", stream=stream,
                       curves=False, resume_from_iteration=1)
    for i in (2, 3):
        logger.log_metrics(i, _metrics(i))
    logger.close()
    out = stream.getvalue()
    assert "3/4" in out and "score=0.300" in out and "kl=0.0300" in out


def test_module_imports_neither_jax_nor_numpy():
    source = str(Path(__file__).parents[1] / "ppojax" / "io" / "logger.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('logger', {source!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "heavy = [m for m in ('jax', 'numpy', 'matplotlib', 'tensorboardX', 'tqdm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resume_reports_metrics_lost_in_the_middle(tmp_path):
    _log_range(tmp_path, range(1, 7)).close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:25]  # iteration 3 torn (a damaged line, not the last one)
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"metrics.jsonl has no metrics for iteration\(s\) 3 of 1..5") as caught:
        logger = RunLogger(tmp_path, tensorboard=False, console="off", curves=False, resume_from_iteration=5)
    assert len([w for w in caught if "no metrics" in str(w.message)]) == 1
    logger.log_metrics(6, _metrics(6))
    logger.close()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2, 4, 5, 6]


def test_resume_keeps_one_line_per_iteration_after_two_writers(tmp_path):
    # What two jobs once writing one run directory left: 1,1,2,3,2,4,3,5.
    order = [1, 1, 2, 3, 2, 4, 3, 5]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, **_metrics(i)}) + "\n"
                                                    for i in order))
    RunLogger(tmp_path, tensorboard=False, console="off", curves=False, resume_from_iteration=4).close()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_nan_metrics_do_not_flood_the_console_from_tensorboardx(tmp_path, capfd):
    pytest.importorskip("tensorboardX")
    import logging

    logging.getLogger("tensorboardX.x2num").addHandler(handler := logging.StreamHandler(sys.stderr))
    try:
        logger = RunLogger(tmp_path, console="off", curves=False)
        for i in (1, 2, 3):
            logger.log_metrics(i, {**_metrics(i), "kl": math.nan})
        logger.close()
    finally:
        logging.getLogger("tensorboardX.x2num").removeHandler(handler)
    assert "NaN or Inf" not in capfd.readouterr().err
    assert all(math.isnan(r["kl"]) for r in read_metrics(tmp_path))  # the NaNs are still logged
