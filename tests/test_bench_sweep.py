"""benchmarks/sweep.py's arithmetic (no timing here): paired ratios, medians, the memory extrapolation."""

import pytest


def test_summary_ratios_and_memory_extrapolation(load_benchmark):
    bench = load_benchmark("sweep")
    sweeps = [{"total_s": 10.0, "steady_s": 4.0}, {"total_s": 12.0, "steady_s": 6.0}]
    seqs = [{"total_s": 40.0, "steady_s": 8.0}, {"total_s": 30.0, "steady_s": 9.0}]
    out = bench.summarise(4, 3, sweeps, seqs)
    ci, ce = out["compile_included"], out["compile_excluded"]
    assert ci["speedup_range"] == [2.5, 4.0] and ci["speedup_median"] == pytest.approx(3.25)
    assert ce["speedup_range"] == [1.5, 2.0]
    assert ci["sweep_run_iterations_per_s"] == pytest.approx(4 * 3 / 11.0)
    assert ce["sweep_run_iterations_per_s"] == pytest.approx(4 * 2 / 5.0)
    # RSS grows 200 bytes per run, more than the 50 bytes of state: the growth bounds the estimate.
    mem = bench.largest_r({"peak_rss_bytes": 1_000}, {"peak_rss_bytes": 1_600, "state_bytes_per_run": 50,
                                                      "state_bytes_shared": 7}, R=4, ram_bytes=10_000)
    assert mem["peak_rss_growth_per_run_bytes"] == 200 and mem["largest_R_that_fits"] == 4 + (10_000 - 1_600) // 200
    # A tiny model: the peak does not move with R; each further run still needs its state.
    mem = bench.largest_r({"peak_rss_bytes": 1_000}, {"peak_rss_bytes": 1_000, "state_bytes_per_run": 300,
                                                      "state_bytes_shared": 7}, R=16, ram_bytes=10_000)
    assert mem["largest_R_that_fits"] == 16 + 9_000 // 300 and mem["state_bytes_shared"] == 7


@pytest.mark.slow
def test_tiny_sweep_and_sequential_run(load_benchmark):
    bench = load_benchmark("sweep")
    s = bench.time_sweep(bench.CONFIGS["tiny"], 2, 2)
    q = bench.time_sequential(bench.CONFIGS["tiny"], 2, 2)
    assert len(s["steps_s"]) == 2 and s["total_s"] >= s["steady_s"] > 0
    assert len(q["per_run_s"]) == 2 and q["total_s"] >= q["steady_s"] > 0


def test_estimator_benchmark_summary(load_benchmark):
    bench = load_benchmark("estimators")
    records = [{"estimator": "gae", "seconds": [9.0, 2.0, 4.0, 3.0], "peak_rss_bytes": 10, "params_bytes": 8,
                "opt_state_bytes": 16, "frozen_bytes": 4},
               {"estimator": "gae", "seconds": [9.0, 5.0, 6.0], "peak_rss_bytes": 30, "params_bytes": 8,
                "opt_state_bytes": 16, "frozen_bytes": 4},
               {"estimator": "grpo", "seconds": [9.0, 1.0], "peak_rss_bytes": 20, "params_bytes": 4,
                "opt_state_bytes": 8, "frozen_bytes": 4}]
    out = bench.summarise(records)
    assert out["gae"]["s_per_iteration_range"] == [3.0, 5.5] and out["gae"]["s_per_iteration_median"] == 4.25
    assert out["gae"]["peak_rss_bytes_median"] == 20 and out["grpo"]["s_per_iteration_median"] == 1.0
