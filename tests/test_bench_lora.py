"""benchmarks/lora.py: the record's arithmetic on made-up measurements, and one real round on a tiny model."""

import json

import pytest


def _run(side, times, peak_gib, state_gib):
    gib = 2**30
    return {"side": side, "iteration_times_s": times, "first_call_s": 10.0, "load_s": 1.0,
            "peak_rss_bytes": peak_gib * gib, "rss_after_load_bytes": 0.5 * gib,
            "state_bytes": {"trainable": 0, "optimizer": 0, "frozen": 0, "total": state_gib * gib},
            "trainable_params": 10, "model_params": 100}


def test_summary_takes_medians_over_rounds_and_alternates_the_first_side(load_benchmark):
    bench = load_benchmark("lora")
    assert [bench.order_of(r)[0] for r in range(4)] == ["lora", "full", "lora", "full"]
    runs = [_run("lora", [1.0, 3.0], 1.0, 0.5), _run("full", [4.0, 4.0], 3.0, 2.0),
            _run("full", [6.0, 8.0], 5.0, 2.0), _run("lora", [2.0, 2.0], 2.0, 0.5)]
    s = bench.summarize(runs)
    lora, full = s["sides"]["lora"], s["sides"]["full"]
    assert lora["s_per_iteration"]["values"] == [1.0, 3.0, 2.0, 2.0] and lora["s_per_iteration"]["median"] == 2.0
    assert full["s_per_iteration"]["median"] == 5.0 and full["s_per_iteration"]["rel_spread"] == pytest.approx(0.8)
    assert lora["peak_rss_gib"]["median"] == 1.5 and full["peak_rss_gib"]["median"] == 4.0
    assert s["ratios"] == {"s_per_iteration_full_over_lora": 2.5, "peak_rss_full_over_lora": 4.0 / 1.5,
                           "state_full_over_lora": 4.0}


def test_arguments_are_checked(load_benchmark):
    bench = load_benchmark("lora")
    with pytest.raises(SystemExit):
        bench.parse_args(["--minibatch", "4"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch", "12"])
    assert bench.parse_args(["--tiny"]).out is None and bench.parse_args([]).out == bench.DEFAULT_OUT


@pytest.mark.slow  # two fresh processes, each compiling a PPO iteration of a tiny Llama: ~1 min on 2 CPU cores
def test_one_tiny_round_measures_both_sides(load_benchmark, tmp_path):
    bench = load_benchmark("lora")
    out = tmp_path / "lora.json"
    bench.main(["--tiny", "--reps", "1", "--iters", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    lora, full = r["sides"]["lora"], r["sides"]["full"]
    # Full fine-tuning trains every weight and holds actor, critic and reference copies; LoRA one base and adapters.
    assert full["trainable_params"] > 10 * lora["trainable_params"] > 0
    assert lora["model_params"] == full["model_params"]
    assert r["ratios"]["state_full_over_lora"] > 3
    assert all(s["s_per_iteration"]["median"] > 0 and s["peak_rss_gib"]["median"] > 0 for s in (lora, full))
    assert {"machine", "versions", "load_before", "trustworthy", "other_processes_cores"} <= set(r)
