"""benchmarks/gpu.py: its pure helpers (FLOP count, decode roofline, datasheet peaks, the time budget, targets and
the README table) and the parent's handling of its children, fast, with the children stubbed out; and, marked slow,
``--dry-run``: every part of the script for real on tiny shapes on the CPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def gpu(load_benchmark):
    return load_benchmark("gpu")


def test_update_flops_match_a_hand_count(gpu):
    j = gpu.job_dict(gpu.SIZES["gpt2"], dict(batch=512, query=64, response=24, epochs=1, minibatches=4))
    L, d, V, B, P, R = 12, 768, 50257, 512, 64, 24
    S = P + R
    # forward of one sequence: 12 d^2 matmul weights per layer x 2 FLOPs per multiply-add per token, plus causal
    # attention (query t attends t keys: QK^T and AV, 2 d t FLOPs each), plus the vocabulary projection at the R
    # response positions (actor) or the scalar head (critic).
    matmuls = L * 2 * 12 * d * d * S
    attention = L * sum(2 * 2 * d * t for t in range(1, S + 1))
    actor = matmuls + attention + R * 2 * d * V
    critic = matmuls + attention + R * 2 * d
    expected_update = 1 * 3 * B * (actor + critic)  # epochs x (forward + backward = 3 forwards) x episodes
    flops = gpu.model_flops(j)
    assert flops["update"] == expected_update
    # sanity: ~6 x (actor + critic trunk params) x tokens, within the attention/projection extras
    trunk_params = L * 12 * d * d
    assert 1.0 < flops["update"] / (6 * 2 * trunk_params * B * S) < 2.0


def test_decode_roofline_bytes(gpu):
    roof = gpu.decode_roofline(n_layer=12, n_head=12, n_embd=768, batch=512, query=64, response=24,
                               param_bytes=1000, kv_itemsize=2)
    assert roof["avg_len"] == 64 + 12
    # 2 (K and V) x layers x batch x heads x avg_len x head_dim x 2 bytes
    assert roof["kv_bytes"] == 2 * 12 * 512 * 12 * 76 * 64 * 2 == 1_434_451_968
    assert roof["bytes"] == 1000 + roof["kv_bytes"]
    assert roof["kv_bytes_max_len"] == 2 * 12 * 512 * 12 * 88 * 64 * 2


def test_device_peaks_and_slug(gpu):
    h100 = gpu.device_peaks("NVIDIA H100 80GB HBM3")
    assert (h100["name"], h100["bf16_flops"], h100["hbm_bytes_per_s"]) == ("H100 SXM", 989e12, 3.35e12)
    assert gpu.device_peaks("NVIDIA H200")["hbm_bytes_per_s"] == 4.8e12
    assert gpu.device_peaks("NVIDIA GH200 480GB")["name"] == "GH200"  # not mistaken for an H200
    assert gpu.device_peaks("NVIDIA H100 PCIe")["name"] == "H100 PCIe"
    assert gpu.device_peaks("NVIDIA A100-SXM4-80GB")["hbm_bytes_per_s"] == 2.039e12
    assert gpu.device_peaks("NVIDIA A100-SXM4-40GB")["bf16_flops"] == 312e12
    assert gpu.device_peaks("cpu")["bf16_flops"] is None
    assert gpu.slug("NVIDIA H100 80GB HBM3") == "h100_80gb_hbm3"


def test_fit_ladder_and_oom_detection(gpu):
    assert gpu.fit_ladder(1, False, 128) == [(1, False), (2, False), (4, False), (8, False), (1, True), (4, True)]
    assert gpu.fit_ladder(1, False, 128, auto=False) == [(1, False)]
    assert gpu.fit_ladder(1, True, 12) == [(1, True), (2, True), (4, True)]
    assert gpu.is_oom("XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
    assert gpu.is_oom("CUDA error: out of memory")
    assert not gpu.is_oom("FloatingPointError: kl is nan")
    assert not gpu.is_oom("ZeroDivisionError in room")


def _fake_result(gpu):
    cfg = dict(gpu.DEFAULTS, grad_accum=1, remat=False, dtype="bfloat16", param_dtype="float32")
    raw = {
        "device_kind": "NVIDIA H100 80GB HBM3",
        "measured": {"bf16_matmul_flops": 800e12, "copy_bytes_per_s": 3.0e12},
        "iteration_median_s": 2.0, "update_median_s": 1.0, "rollout_median_s": 0.8, "score_median_s": 0.1,
        "first_iteration_s": 60.0, "compile_s": 50.0, "generation_median_s": 0.3, "n_params": 354_823_168,
        "peak_bytes_in_use": 40 * 2**30, "recompiles_after_first_iteration": 0,
        "decode": {"rollout_params": {"param_bytes": 1_419_292_672, "kv_itemsize": 2, "step_s": 2e-3},
                   "bf16_params": {"param_bytes": 709_646_336, "kv_itemsize": 2, "step_s": 1.5e-3}},
    }
    spec = dict(cfg, name="gpt2-medium", shape=gpu.SIZES["gpt2-medium"])
    ok = {"ok": True, "spec": spec, **raw, "derived": gpu.derive_size(raw, spec),
          "command": gpu.repro_command(cfg, gpu.DEFAULTS, sizes="gpt2-medium", trl=False, sweep=False)}
    failed = {"ok": False, "spec": dict(cfg, name="gpt2-large", shape=gpu.SIZES["gpt2-large"]),
              "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory | 3 GiB",
              "command": gpu.repro_command(cfg, gpu.DEFAULTS, sizes="gpt2-large", trl=False, sweep=False,
                                           grad_accum=8, remat=True)}
    return {"benchmark": "gpu", "date": "2026-01-01T00:00:00+00:00", "dry_run": False,
            "gpu": {"device_kind": "NVIDIA H100 80GB HBM3", "platform_version": "CUDA 12.8"},
            "device_peaks": gpu.device_peaks("NVIDIA H100 80GB HBM3"), "versions": {"jax": "0.x", "jaxlib": "0.x"},
            "config": cfg, "sizes": {"gpt2-medium": ok, "gpt2-large": failed},
            "trl": {"skipped": "torch 2.13.0+cpu sees no CUDA device", "device": "cuda", "iterations": 3,
                    "job": gpu.job_dict(gpu.SIZES["gpt2"], cfg),
                    "command": gpu.repro_command(cfg, gpu.DEFAULTS, sizes="none", trl=True, sweep=False)}}


def test_derived_mfu_and_decode_fraction(gpu):
    res = _fake_result(gpu)
    d = res["sizes"]["gpt2-medium"]["derived"]
    update_flops = d["flops_per_iteration"]["update"]
    assert d["mfu"] == pytest.approx(update_flops / 1.0 / 989e12)
    assert d["mfu_vs_measured_matmul"] == pytest.approx(update_flops / 800e12)
    dec = d["decode"]["rollout_params"]
    kv = 2 * 24 * 512 * 16 * 76 * 64 * 2
    assert dec["bytes"] == 1_419_292_672 + kv
    assert dec["fraction_of_roofline"] == pytest.approx((1_419_292_672 + kv) / 3.35e12 / 2e-3)
    assert dec["fraction_of_roofline_measured_bandwidth"] == pytest.approx((1_419_292_672 + kv) / 3.0e12 / 2e-3)


def test_targets_and_table(gpu):
    res = _fake_result(gpu)
    targets = {t["name"]: t for t in gpu.evaluate_targets(res)}
    speed = next(t for n, t in targets.items() if "TRL" in n)
    assert speed["met"] is None and "no CUDA" in speed["detail"]
    medium = next(t for n, t in targets.items() if "MFU" in n and "gpt2-medium" in n)
    assert medium["met"] == (res["sizes"]["gpt2-medium"]["derived"]["mfu"] >= 0.45)
    large = next(t for n, t in targets.items() if "MFU" in n and "gpt2-large" in n)
    assert large["met"] is None and "RESOURCE_EXHAUSTED" in large["detail"]
    assert next(t for n, t in targets.items() if "recompiles" in n)["met"] is True

    table = gpu.markdown_table(res)
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    n_cols = lines[header].count("|")
    rows = [line for line in lines[header + 2:] if line.startswith("| gpt2")]
    assert len(rows) == 2 and all(r.count("|") == n_cols for r in rows)  # the failure's "|" is escaped
    assert "`python benchmarks/gpu.py --no-trl --no-sweep`" in rows[0]  # gpt2-medium is the default size
    assert "--grad-accum 8 --remat" in rows[1] and "failed" in rows[1]
    assert "skipped: torch 2.13.0+cpu sees no CUDA device" in table
    assert "`python benchmarks/gpu.py --sizes none --no-sweep`" in table
    assert "H100 SXM" in table


def test_parse_args_defaults_and_validation(gpu):
    a = gpu.parse_args(["--dry-run"])
    assert (a.batch, a.query, a.response, a.minibatches, a.size_list) == (8, 8, 4, 1, ["tiny"])
    assert (a.sweep_config, a.sweep_runs, a.budget) == ("tiny", 4, 600)
    a = gpu.parse_args([])
    assert a.size_list == ["gpt2-medium"] and (a.sweep_config, a.sweep_runs, a.budget) == ("offline", 16, 480)
    a = gpu.parse_args(["--sizes", "gpt2-large", "--grad-accum", "4"])
    assert (a.batch, a.query, a.response, a.epochs, a.minibatches) == (512, 64, 24, 1, 4)
    assert a.size_list == ["gpt2-large"]
    assert gpu.parse_args(["--sizes", "none"]).size_list == []
    for bad in (["--sizes", "gpt3"], ["--minibatches", "128"], ["--grad-accum", "3"], ["--iterations", "1"],
                ["--sweep-iterations", "1"], ["--sweep-config", "nope"]):
        with pytest.raises(SystemExit):
            gpu.parse_args(bad)


def test_no_gpu_exits_2_with_one_message(gpu, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "run_child", lambda kind, spec, **kw: {"backend": "cpu", "device_kind": "cpu",
                                                                     "devices": ["cpu:0"], "n_devices": 1})
    assert gpu.main(["--no-trl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no GPU" in err[0] and "--dry-run" in err[0]


def _fake_children(gpu, oom_attempts=0, trl="skipped", sequential="ok", size_timeout=False):
    """A stand-in for ``run_child``: a GPU probe, size children (the first ``oom_attempts`` run out of memory; with
    ``size_timeout``, stopped after saving the iterations), the TRL children and the sweep's two sides (the
    sequential one 20x the sweep's time, or stopped by its timeout)."""
    calls = []
    raw = {k: v for k, v in _fake_result(gpu)["sizes"]["gpt2-medium"].items()
           if k not in ("ok", "spec", "derived", "command")}

    def run_child(kind, spec, **kw):
        calls.append((kind, spec, kw["timeout"]))
        if kind == "sweep-vmapped":
            return {"total_s": 20.0, "steady_s": 2.0, "steps_s": [18.0, 1.0, 1.0], "child_wall_s": 25.0}
        if kind == "sweep-sequential":
            if sequential == "timeout":
                return {"error": "timeout: sweep (sequential) ran past its 100 s", "timed_out": True,
                        "child_wall_s": 105.0}
            return {"total_s": 400.0, "steady_s": 32.0, "per_run_s": [25.0] * 16, "child_wall_s": 405.0}
        if kind == "size" and size_timeout:
            partial = {k: v for k, v in raw.items() if k not in ("decode", "measured", "generation_median_s")}
            return {"error": "timeout: gpt2-medium ran past its 150 s", "timed_out": True, "child_wall_s": 150.0,
                    "partial": partial | {"incomplete": "stopped before the decode measurement ended"}}
        if kind == "probe":
            return {"backend": "gpu", "device_kind": "NVIDIA H100 80GB HBM3", "n_devices": 1, "devices": ["cuda:0"]}
        if kind == "size":
            if sum(c[0] == "size" for c in calls) <= oom_attempts:
                return {"error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory", "stderr_tail": ""}
            return dict(raw)
        if kind == "trl-prep":
            return {"skipped": "torch has no CUDA"} if trl == "skipped" else {"torch": "2.x"}
        side = {"iteration_median_s": 2.0 if kind == "trl-ppojax" else 30.0, "first_iteration_s": 5.0,
                "update_median_s": 1.0, "generation_median_s": 0.5, "scoring_median_s": 0.2,
                "rollout_forwards_median_s": 0.3, "generated_tokens_per_s": 6000.0, "matmul_peak_flops": 7e14}
        return side

    return run_child, calls


def test_parent_retries_an_oom_with_more_accumulation(gpu, monkeypatch, tmp_path):
    run_child, calls = _fake_children(gpu, oom_attempts=2, trl="ok")
    monkeypatch.setattr(gpu, "run_child", run_child)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--sizes", "gpt2-medium", "--out", str(out)]) == 0
    res = __import__("json").loads(out.read_text())
    s = res["sizes"]["gpt2-medium"]
    assert s["ok"] and [(a["grad_accum"], a["remat"]) for a in s["attempts"]] == [(1, False), (2, False), (4, False)]
    assert s["command"] == "python benchmarks/gpu.py --grad-accum 4 --no-trl --no-sweep"
    assert res["trl"]["speedup_ppojax_over_trl"] == pytest.approx(15.0)
    met = {t["name"]: t["met"] for t in res["targets"]}
    assert met["ppojax at least 10x faster than TRL on the GPU (s/iteration, gpt2 shape)"] is True
    assert "| gpt2-medium |" in gpu.markdown_table(res)

    # A later run of another size keeps this one's row (same device) and, with --no-trl, the TRL result.
    run_child, _ = _fake_children(gpu)
    monkeypatch.setattr(gpu, "run_child", run_child)
    assert gpu.main(["--sizes", "gpt2", "--no-trl", "--out", str(out)]) == 0
    res = __import__("json").loads(out.read_text())
    assert set(res["sizes"]) == {"gpt2", "gpt2-medium"} and "speedup_ppojax_over_trl" in res["trl"]


def test_parent_records_a_failure_and_a_skipped_trl(gpu, monkeypatch, tmp_path):
    run_child, calls = _fake_children(gpu, oom_attempts=99)
    monkeypatch.setattr(gpu, "run_child", run_child)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--sizes", "gpt2-large", "--no-fit", "--no-sweep", "--out", str(out)]) == 0
    res = __import__("json").loads(out.read_text())
    s = res["sizes"]["gpt2-large"]
    assert not s["ok"] and len(s["attempts"]) == 1 and "RESOURCE_EXHAUSTED" in s["error"]
    assert res["trl"]["skipped"] == "torch has no CUDA"
    assert [c[0] for c in calls] == ["probe", "size", "trl-prep"]
    assert res["parts"]["size:gpt2-large"]["status"] == "error" and res["parts"]["trl-prep"]["status"] == "skipped"
    table = gpu.markdown_table(res)
    assert "failed: XlaRuntimeError" in table and "skipped: torch has no CUDA" in table


def test_budget_timeout_splits_what_is_left(gpu):
    # on schedule: each part gets its estimate
    assert gpu.budget_timeout(480, [20, 160, 30, 60, 70, 40, 100]) == pytest.approx(20)
    # ahead of schedule: the next part may use the time the earlier ones saved, not the later parts' estimates
    assert gpu.budget_timeout(400, [160, 100, 100]) == pytest.approx(200)
    # behind schedule: every part left shrinks in proportion (the later ones are not starved)
    assert gpu.budget_timeout(100, [100, 100]) == pytest.approx(50)
    assert gpu.budget_timeout(90, [30, 60]) == pytest.approx(30)
    # the last part gets what is left; nothing is left: nothing
    assert gpu.budget_timeout(75, [40]) == pytest.approx(75)
    assert gpu.budget_timeout(-5, [10, 10]) == 0


def test_budget_hands_saved_time_forward_and_caps(gpu):
    now = [0.0]
    estimates = {"probe": 20, "size:gpt2-medium": 160, "sweep-vmapped": 40, "sweep-sequential": 90, "trl-prep": 5}
    plan = gpu.plan_parts(["gpt2-medium"], trl=False, sweep=True, estimates=estimates)
    assert list(plan) == ["probe", "size:gpt2-medium", "sweep-vmapped", "sweep-sequential"]
    b = gpu.Budget(300, plan, reserve_s=10, clock=lambda: now[0])
    # 290 s for 310 s of estimates: behind from the start, so every part's share is proportional
    assert b.timeout("probe") == pytest.approx(290 * 20 / 310)
    now[0] = 5.0
    b.done("probe")
    assert b.timeout("size:gpt2-medium") == pytest.approx(285 * 160 / 290)
    now[0] = 100.0  # the size took 95 s, not 160: ahead of schedule, the sweep's first side may use the savings
    b.done("size:gpt2-medium")
    assert b.timeout("sweep-vmapped") == pytest.approx(190 - 90)
    now[0] = 110.0
    b.done("sweep-vmapped")
    assert b.timeout("sweep-sequential") == pytest.approx(180) == pytest.approx(b.remaining())
    capped = gpu.Budget(1000, {"probe": 20, "sweep-vmapped": 40}, cap_s=60, clock=lambda: 0.0)
    assert capped.timeout("probe") == 60  # --child-timeout caps every child
    assert gpu.plan_parts([], trl=True, sweep=False, estimates={})["trl-ppojax"] == 60  # unknown: a default


def test_sweep_target_and_a_lower_bound_when_the_sequential_side_ran_out(gpu):
    vm = {"total_s": 20.0, "steady_s": 2.0}
    full = gpu.sweep_summary(16, 3, vm, {"total_s": 250.0, "steady_s": 30.0})
    assert full["compile_included"]["speedup_median"] == pytest.approx(12.5)
    assert full["compile_excluded"]["speedup_median"] == pytest.approx(15.0)

    def sweep_target(sweep):
        return next(t for t in gpu.evaluate_targets({"sizes": {}, "sweep": sweep}) if "sweep" in t["name"])

    t = sweep_target(full | {"config": "offline"})
    assert t["met"] is True and t["value"] == pytest.approx(12.5) and "15.00x without" in t["detail"]
    slow = gpu.sweep_summary(16, 3, vm, {"total_s": 160.0, "steady_s": 30.0})
    assert sweep_target(slow)["met"] is False

    # stopped after 300 s of sequential runs: the ratio is at least 300 / 20 = 15, which meets the target ...
    cut = gpu.sweep_summary(16, 3, vm, {"error": "timeout", "ran_s": 300.0})
    assert cut["compile_included"]["speedup_at_least"] == pytest.approx(15.0) and "error" in cut
    t = sweep_target(cut)
    assert t["met"] is True and t["value"] == pytest.approx(15.0) and "at least 15.00x" in t["detail"]
    # ... while a bound below the target says nothing
    assert sweep_target(gpu.sweep_summary(16, 3, vm, {"error": "timeout", "ran_s": 100.0}))["met"] is None
    assert sweep_target({"skipped": "the time budget is spent"})["met"] is None
    assert "error" in gpu.sweep_summary(16, 3, {"error": "boom"}, {})
    assert sweep_target({})["met"] is None  # not run


def test_parent_runs_every_part_within_the_budget(gpu, monkeypatch, tmp_path, capsys):
    run_child, calls = _fake_children(gpu, trl="ok")
    monkeypatch.setattr(gpu, "run_child", run_child)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [c[0] for c in calls] == ["probe", "size", "trl-prep", "trl-ppojax", "trl-trl", "sweep-vmapped",
                                     "sweep-sequential"]
    assert all(0 < c[2] <= 480 for c in calls)
    assert set(res["parts"]) == {"probe", "size:gpt2-medium", "trl-prep", "trl-ppojax", "trl-trl", "sweep-vmapped",
                                 "sweep-sequential"}
    assert {p["status"] for p in res["parts"].values()} == {"ok"}
    assert res["sweep"]["compile_included"]["speedup_median"] == pytest.approx(20.0)
    met = {t["name"]: t["met"] for t in res["targets"]}
    assert met["a sweep of 16 runs at least 10x the same runs one after another (compilation included, offline "
               "config)"] is True
    printed = capsys.readouterr().out
    assert "| with compilation | 20.00 | 400.00 | **20.00x** |" in printed and "Targets:" in printed


def test_parent_keeps_partial_results_of_stopped_children(gpu, monkeypatch, tmp_path):
    run_child, calls = _fake_children(gpu, trl="ok", sequential="timeout", size_timeout=True)
    monkeypatch.setattr(gpu, "run_child", run_child)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    s = res["sizes"]["gpt2-medium"]
    assert s["ok"] and "timeout" in s["incomplete"] and "decode" in s["incomplete"]
    assert sum(c[0] == "size" for c in calls) == 1  # a timeout is not an OOM: no retry
    mfu = next(t for t in res["targets"] if "MFU" in t["name"])
    assert mfu["value"] == pytest.approx(s["derived"]["mfu"]) and mfu["met"] is not None
    assert res["parts"]["size:gpt2-medium"]["status"] == "timeout"
    # the sequential side ran 105 - (25 - 20) = 100 s of runs: at least 5x
    assert res["sweep"]["compile_included"]["speedup_at_least"] == pytest.approx(5.0)
    table = gpu.markdown_table(res)
    assert "gpt2-medium (incomplete:" in table and "at least **5.00x**" in table


@pytest.mark.slow
def test_dry_run_runs_every_part_on_the_cpu(tmp_path):
    """``--dry-run`` end to end (~3 minutes on 2 quiet cores): every part for real on tiny shapes, the JSON in a
    temporary file (nothing written into benchmarks/results), the table printed."""
    root = Path(__file__).resolve().parent.parent
    results = root / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
    # a generous budget: a loaded machine must not turn slowness into a failed part here
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--dry-run", "--budget", "1200"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before
    path = Path(proc.stdout.strip().splitlines()[-1].split("the result: ")[1])
    assert path.parent != results
    res = json.loads(path.read_text())
    assert res["dry_run"] is True and res["gpu"]["device_kind"]
    assert set(res["parts"]) == {"probe", "size:tiny", "trl-prep", "trl-ppojax", "trl-trl", "sweep-vmapped",
                                 "sweep-sequential"}
    assert {p["status"] for p in res["parts"].values()} == {"ok"}, res["parts"]
    s = res["sizes"]["tiny"]
    assert s["ok"] and not s.get("incomplete") and s["derived"]["mfu_vs_measured_matmul"] > 0
    assert s["derived"]["decode"]["rollout_params"]["step_s"] is not None
    assert res["trl"]["speedup_ppojax_over_trl"] > 0 and res["trl"]["device"] == "cpu"
    sw = res["sweep"]
    assert (sw["R"], sw["config"]) == (16, "tiny") and "error" not in sw
    assert sw["compile_included"]["speedup_median"] > 0 and len(sw["sequential"][0]["per_run_s"]) == 16
    names = " ".join(t["name"] for t in res["targets"])
    for what in ("TRL", "MFU", "HBM roofline", "recompiles", "sweep of 16 runs"):
        assert what in names
    assert "| model |" in proc.stdout and "Sweep: 16 runs" in proc.stdout and "Targets:" in proc.stdout
