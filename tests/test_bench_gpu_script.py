"""benchmarks/gpu.py's pure helpers: FLOP count, decode roofline, datasheet peaks, targets and the README table.

Fast: nothing here trains, compiles or starts a subprocess (the no-GPU exit is checked with the probe stubbed out).
"""

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
          "command": gpu.repro_command(cfg, gpu.DEFAULTS, sizes="gpt2-medium", trl=False)}
    failed = {"ok": False, "spec": dict(cfg, name="gpt2-large", shape=gpu.SIZES["gpt2-large"]),
              "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory | 3 GiB",
              "command": gpu.repro_command(cfg, gpu.DEFAULTS, sizes="gpt2-large", trl=False, grad_accum=8,
                                           remat=True)}
    return {"benchmark": "gpu", "date": "2026-01-01T00:00:00+00:00", "tiny": False,
            "gpu": {"device_kind": "NVIDIA H100 80GB HBM3", "platform_version": "CUDA 12.8"},
            "device_peaks": gpu.device_peaks("NVIDIA H100 80GB HBM3"), "versions": {"jax": "0.x", "jaxlib": "0.x"},
            "config": cfg, "sizes": {"gpt2-medium": ok, "gpt2-large": failed},
            "trl": {"skipped": "torch 2.13.0+cpu sees no CUDA device", "device": "cuda", "iterations": 3,
                    "job": gpu.job_dict(gpu.SIZES["gpt2"], cfg),
                    "command": gpu.repro_command(cfg, gpu.DEFAULTS, sizes="none", trl=True)}}


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
    assert "`python benchmarks/gpu.py --sizes gpt2-medium --no-trl`" in rows[0]
    assert "--grad-accum 8 --remat" in rows[1] and "failed" in rows[1]
    assert "skipped: torch 2.13.0+cpu sees no CUDA device" in table
    assert "`python benchmarks/gpu.py --sizes none`" in table
    assert "H100 SXM" in table


def test_parse_args_defaults_and_validation(gpu):
    a = gpu.parse_args(["--tiny"])
    assert (a.batch, a.query, a.response, a.minibatches, a.size_list) == (8, 8, 4, 1, ["tiny"])
    a = gpu.parse_args(["--sizes", "gpt2-large", "--grad-accum", "4"])
    assert (a.batch, a.query, a.response, a.epochs, a.minibatches) == (512, 64, 24, 1, 4)
    assert a.size_list == ["gpt2-large"]
    assert gpu.parse_args(["--sizes", "none"]).size_list == []
    for bad in (["--sizes", "gpt3"], ["--minibatches", "128"], ["--grad-accum", "3"], ["--iterations", "1"]):
        with pytest.raises(SystemExit):
            gpu.parse_args(bad)


def test_no_gpu_exits_2_with_one_message(gpu, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "run_child", lambda kind, spec, **kw: {"backend": "cpu", "device_kind": "cpu",
                                                                     "devices": ["cpu:0"], "n_devices": 1})
    assert gpu.main(["--no-trl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no GPU" in err[0] and "--tiny" in err[0]


def _fake_children(gpu, oom_attempts=0, trl="skipped"):
    """A stand-in for ``run_child``: a GPU probe, size children (the first ``oom_attempts`` run out of memory) and
    the TRL children."""
    calls = []
    raw = {k: v for k, v in _fake_result(gpu)["sizes"]["gpt2-medium"].items()
           if k not in ("ok", "spec", "derived", "command")}

    def run_child(kind, spec, **kw):
        calls.append((kind, spec))
        if kind == "probe":
            return {"backend": "gpu", "device_kind": "NVIDIA H100 80GB HBM3", "n_devices": 1, "devices": ["cuda:0"]}
        if kind == "size":
            if sum(k == "size" for k, _ in calls) <= oom_attempts:
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
    assert s["command"] == "python benchmarks/gpu.py --sizes gpt2-medium --grad-accum 4 --no-trl"
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
    assert gpu.main(["--sizes", "gpt2-large", "--no-fit", "--out", str(out)]) == 0
    res = __import__("json").loads(out.read_text())
    s = res["sizes"]["gpt2-large"]
    assert not s["ok"] and len(s["attempts"]) == 1 and "RESOURCE_EXHAUSTED" in s["error"]
    assert res["trl"]["skipped"] == "torch has no CUDA"
    assert [k for k, _ in calls] == ["probe", "size", "trl-prep"]
    table = gpu.markdown_table(res)
    assert "failed: XlaRuntimeError" in table and "skipped: torch has no CUDA" in table
