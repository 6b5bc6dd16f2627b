"""benchmarks/smollm2.py runs end to end on a tiny model and writes its record."""

import json

import pytest


@pytest.mark.slow  # ~30-50 s on 2 CPU cores: compiles a generate and a PPO iteration
def test_tiny_run_writes_decode_and_ppo_numbers(load_benchmark, tmp_path):
    bench = load_benchmark("smollm2")
    out = tmp_path / "smollm2.json"
    bench.main(["--tiny", "--reps", "2", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4",
                "--ppo-response", "4", "--out", str(out)])
    r = json.loads(out.read_text())
    for side in ("ppojax", "transformers"):
        g = r["decode"][side]["generate"]
        assert len(g["times_s"]) == 2 and g["min_s"] <= g["median_s"] <= g["max_s"]
        assert r["decode"][side]["tokens_per_s"] > 0
    assert len(r["ppo_iteration"]["times_s"]) == 2 and r["ppo_iteration"]["median_s"] > 0
    assert {"machine", "versions", "load_before", "trustworthy"} <= set(r) and r["versions"]["gguf"]


def test_arguments_are_checked(load_benchmark):
    bench = load_benchmark("smollm2")
    with pytest.raises(SystemExit):
        bench.parse_args(["--new-tokens", "1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--ppo-batch", "12"])
    assert bench.parse_args(["--tiny"]).out is None and bench.parse_args([]).out == bench.DEFAULT_OUT
