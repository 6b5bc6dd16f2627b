"""The measuring logic of benchmarks/vs_trl.py, _interleave.py, _env.py and xla_cpu_flags.py: run order, medians,
spreads and paired ratios, the busy gate on writing, side parsing and the commands of each side (another git
revision, options, XLA flags), the README lines. Fast: every run is faked, nothing is timed or trained."""

import json
import os
import subprocess

import pytest


@pytest.fixture(scope="module")
def vs(load_benchmark):
    return load_benchmark("vs_trl")


@pytest.fixture(scope="module")
def il(load_benchmark):
    load_benchmark("vs_trl")  # puts benchmarks/ on the path
    import _interleave

    return _interleave


@pytest.fixture(scope="module")
def env(il):
    import _env

    return _env


# ----------------------------------------------------------------------------------------------------------------
# Order and statistics


def test_each_round_rotates_the_order(il):
    assert il.schedule(["ppojax", "trl"], 4) == [["ppojax", "trl"], ["trl", "ppojax"], ["ppojax", "trl"],
                                                 ["trl", "ppojax"]]
    three = il.schedule(["a", "b", "c"], 3)
    assert three == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert [r[0] for r in three] == ["a", "b", "c"]  # each goes first once
    with pytest.raises(ValueError, match="repeats"):
        il.schedule(["a", "b"], 0)
    with pytest.raises(ValueError, match="distinct"):
        il.schedule(["a", "a"], 2)


def test_spread_and_paired_ratio(il):
    s = il.spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"], s["iqr"]) == (3.0, 1.0, 5.0, 2.0, 4.0, 2.0)
    assert s["rel_range"] == pytest.approx(4 / 3) and s["n"] == 5
    one = il.spread([7.0])
    assert one["median"] == one["q1"] == one["q3"] == 7.0 and one["iqr"] == 0.0
    r = il.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])
    assert r["paired"] == [2.0, 2.0, 3.0]
    assert (r["of_medians"], r["min"], r["median_of_paired"], r["max"]) == (2.0, 2.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="same number"):
        il.paired_ratio([1.0], [1.0, 2.0])


def _fake_runner(times, others=None, calls=None):
    """run_one for run_interleaved: the time of (variant, repeat) from a table."""
    def run_one(variant, repeat):
        if calls is not None:
            calls.append((variant.name, repeat))
        return {"iteration_median_s": times[variant.name][repeat],
                "other_processes_cores": (others or {}).get((variant.name, repeat), 0.0)}
    return run_one


def test_runs_follow_the_schedule_and_busy_runs_mark_the_result(il):
    variants = [il.Variant("ppojax", ("x",)), il.Variant("trl", ("y",))]
    times = {"ppojax": [1.0, 1.1, 0.9, 1.0], "trl": [2.0, 2.4, 1.8, 2.0]}
    calls, probes = [], iter([0.0] * 10)
    run = il.run_interleaved(variants, 4, _fake_runner(times, calls=calls), probe=lambda: next(probes),
                             log=lambda *_: None)
    assert calls == [("ppojax", 0), ("trl", 0), ("trl", 1), ("ppojax", 1), ("ppojax", 2), ("trl", 2), ("trl", 3),
                     ("ppojax", 3)]
    assert [r["position"] for r in run["runs"]] == [0, 1] * 4
    assert il.values_of(run["runs"], "trl", "iteration_median_s") == times["trl"]
    assert run["busy"]["busy"] is False and len(run["probes"]) == 5
    busy = il.run_interleaved(variants, 2, _fake_runner(times, others={("trl", 1): 0.6}), probe=lambda: 0.0,
                              log=lambda *_: None)
    assert busy["busy"]["busy"] is True and busy["busy"]["max_other_cores_during_runs"] == 0.6


def test_a_busy_probe_is_waited_out_or_recorded(il, env):
    values = iter([0.9, 0.8, 0.1])
    assert env.wait_until_quiet(60, probe=lambda: next(values)) == [0.9, 0.8, 0.1]
    assert env.wait_until_quiet(0, probe=lambda: 0.9) == [0.9]  # no waiting: one probe
    variants = [il.Variant("a", ("x",)), il.Variant("b", ("y",))]
    run = il.run_interleaved(variants, 2, _fake_runner({"a": [1, 1], "b": [1, 1]}), probe=lambda: 0.7,
                             log=lambda *_: None)
    assert run["busy"] == {"busy": True, "threshold_cores": env.BUSY_OTHER_CORES,
                           "max_other_cores_between_runs": 0.7, "max_other_cores_during_runs": 0.0}


def test_busy_results_are_not_written_unless_forced(il, tmp_path, capsys):
    busy = {"x": 1, "busy": {"busy": True, "threshold_cores": 0.25, "max_other_cores_between_runs": 0.9,
                             "max_other_cores_during_runs": 0.3}}
    out = tmp_path / "r.json"
    assert il.write_result(out, dict(busy), force=False) is None
    assert not out.exists()
    err = capsys.readouterr().err
    assert "NOT WRITTEN" in err and "--force" in err
    kept = err.rsplit("The result is in ", 1)[1].strip().rstrip(".")
    assert json.loads(open(kept).read())["busy"]["busy"] is True  # nothing measured is lost
    os.remove(kept)
    assert il.write_result(out, dict(busy), force=True) == out
    written = json.loads(out.read_text())
    assert written["busy"]["busy"] is True and written["forced"] is True
    quiet = {"busy": {"busy": False}}
    assert il.write_result(out, quiet, force=False) == out
    assert json.loads(out.read_text()) == {"busy": {"busy": False}, "forced": False}


# ----------------------------------------------------------------------------------------------------------------
# vs_trl.py: sides, arguments, commands


def test_sides_parse_or_fail_with_one_message(vs):
    assert vs.parse_side("trl") == vs.Side("trl", "trl")
    assert vs.parse_side("ppojax@47bc523") == vs.Side("ppojax@47bc523", "ppojax", "47bc523")
    s = vs.parse_side("ppojax+reuse_sampler_logprobs+critic=shared+vocab_chunk_size=8192")
    assert s.options == (("reuse_sampler_logprobs", True), ("critic", "shared"), ("vocab_chunk_size", 8192))
    assert vs.parse_side("ppojax+xla=ynn_off").options == (("xla", "ynn_off"),)
    for bad, match in [("torch", "expected trl"), ("ppojax@abc+critic=shared", "another revision"),
                       ("ppojax+critic=both", "critic takes one of"), ("ppojax+bogus", "unknown ppojax side option"),
                       ("ppojax+reuse_sampler_logprobs=yes", "true or false"), ("ppojax+xla=nope", "FLAG_SETS"),
                       ("ppojax+critic=shared+critic=separate", "twice")]:
        with pytest.raises(ValueError, match=match):
            vs.parse_side(bad)


def test_arguments(vs):
    a = vs.parse_args(["--ppojax-rev", "47bc523", "--out", "/tmp/x.json"])
    assert [s.name for s in a.side_specs] == ["ppojax", "ppojax@47bc523"] and a.repeats == vs.REPEATS
    assert vs.parse_args([]).out == vs.DEFAULT_OUT
    for bad in (["--ppojax-rev", "x", "--sides", "ppojax,trl"], ["--sides", "ppojax,ppojax+critic=shared"],
                ["--repeats", "0"], ["--sides", "ppojax,ppojax"], ["--sides", "ppojax,torch", "--out", "/tmp/y"]):
        with pytest.raises(SystemExit):
            vs.parse_args(bad)


def test_each_side_runs_its_own_code_with_its_options(vs, tmp_path):
    args = vs.parse_args(["--sides", "ppojax,ppojax@old,ppojax+critic=shared+reuse_sampler_logprobs+vocab_dtype="
                          "bfloat16,ppojax+xla=ynn_off,trl", "--out", str(tmp_path / "o.json")])
    old = tmp_path / "rev_old"
    v = {s.name: vs.side_variant(s, "b", 6, "/ckpt", args, {"old": old}) for s in args.side_specs}
    base = ["--child", "ppojax", "--job", "b", "--iterations", "6", "--ckpt", "/ckpt"]
    assert list(v["ppojax"].argv[1:]) == [str(vs.ROOT / "benchmarks" / "vs_trl.py"), *base]
    # Another revision: its own script, from its own folder, importing its own ppojax, with the same arguments.
    rev = v["ppojax@old"]
    assert list(rev.argv[1:]) == [str(old / "benchmarks" / "vs_trl.py"), *base]
    assert rev.cwd == str(old) and rev.env["PYTHONPATH"].split(os.pathsep)[0] == str(old)
    opts = list(v["ppojax+critic=shared+reuse_sampler_logprobs+vocab_dtype=bfloat16"].argv)
    assert opts[-6:] == ["--ppo-option", "critic=shared", "--ppo-option", "reuse_sampler_logprobs=true",
                         "--vocab-dtype", "bfloat16"]
    import xla_cpu_flags

    assert v["ppojax+xla=ynn_off"].env["XLA_FLAGS"] == xla_cpu_flags.FLAG_SETS["ynn_off"]["flags"]
    assert v["trl"].argv[3] == "trl" and "XLA_FLAGS" not in v["trl"].env


def test_a_revision_is_exported_and_imports_its_own_package(vs, tmp_path):
    sha, folder = vs.export_revision("HEAD", tmp_path)
    head = subprocess.run(["git", "-C", str(vs.ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert sha == head.strip() and (folder / "benchmarks" / "vs_trl.py").exists()
    assert not (vs.ROOT / ".git" / "worktrees" / folder.name).exists()  # nothing registered in the repository
    variant = vs._interleave.Variant("ppojax@HEAD", ("x",), {"PYTHONPATH": str(folder)}, str(folder))
    assert vs.check_import(variant) == os.path.realpath(folder / "ppojax")
    with pytest.raises(SystemExit, match="not a commit"):
        vs.export_revision("no-such-revision-xyz", tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Summary, README lines, and main's gate with every run faked


def _child(t, others=0.0):
    return {"iteration_median_s": t, "first_iteration_s": 10 * t, "update_median_s": 0.8 * t,
            "generation_median_s": 0.1 * t, "scoring_median_s": 0.05 * t, "peak_rss_mib": 1000.0,
            "matmul_peak_flops": 1e11, "other_processes_cores": others}


def _fake_main(vs, monkeypatch, times, others=0.0):
    import _env

    monkeypatch.setattr(vs, "build_checkpoint", lambda j, d: None)
    monkeypatch.setattr(vs, "check_import", lambda v: "/somewhere/ppojax")
    monkeypatch.setattr(_env, "other_load_probe", lambda seconds=2.0: others)
    monkeypatch.setattr(vs, "run_child", lambda v, r, tmp: _child(times[v.name][r]))


def test_summary_ratio_and_readme_line(vs, monkeypatch, tmp_path):
    times = {"ppojax": [1.0, 1.2, 0.8, 1.0], "trl": [2.0, 2.4, 2.4, 1.5]}
    _fake_main(vs, monkeypatch, times)
    out = tmp_path / "vs.json"
    res = vs.main(["--job", "b", "--repeats", "4", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r == json.loads(json.dumps(res)) and r["format"] == 2 and r["busy"]["busy"] is False
    job = r["jobs"]["b"]
    assert job["sides"]["ppojax"]["iteration_s"]["median"] == 1.0
    assert job["sides"]["trl"]["iteration_s"]["median"] == 2.2
    q = job["ratios"]["trl/ppojax"]
    assert q["of_medians"] == pytest.approx(2.2) and q["paired"] == pytest.approx([2.0, 2.0, 3.0, 1.5])
    assert (q["min"], q["max"]) == (pytest.approx(1.5), pytest.approx(3.0))
    assert job["order"][1] == ["trl", "ppojax"] and job["target_speedup"] == vs.TARGETS["b"]
    rows = vs.readme_rows(r)
    assert len(rows) == 1 and "trl/ppojax time per iteration **2.20** (paired rounds 1.50-3.00; target >= 3.0x)" \
        in rows[0]
    table = vs.markdown_table(r)
    assert "| b | ppojax | 1.00 | 0.95-1.05 | 0.80-1.20 |" in table and rows[0] in table


def test_main_refuses_to_write_a_busy_measurement_unless_forced(vs, monkeypatch, tmp_path, capsys):
    times = {"ppojax": [1.0, 1.0], "ppojax@HEAD": [1.0, 1.02]}
    _fake_main(vs, monkeypatch, times, others=0.8)
    monkeypatch.setattr(vs, "export_revision", lambda rev, into: ("f" * 40, into / "rev"))
    out = tmp_path / "rev.json"
    vs.main(["--ppojax-rev", "HEAD", "--repeats", "2", "--out", str(out)])
    assert not out.exists() and "NOT WRITTEN" in capsys.readouterr().err
    vs.main(["--ppojax-rev", "HEAD", "--repeats", "2", "--out", str(out), "--force"])
    r = json.loads(out.read_text())
    assert r["busy"]["busy"] is True and r["forced"] is True and r["revisions"] == {"HEAD": "f" * 40}
    assert r["jobs"]["b"]["ratios"]["ppojax@HEAD/ppojax"]["paired"] == [1.0, 1.02]
    assert "**busy machine**" in vs.readme_rows(r)[0]


# ----------------------------------------------------------------------------------------------------------------
# xla_cpu_flags.py


def test_flag_variants_map_to_vs_trl_sides(load_benchmark, vs):
    xf = load_benchmark("xla_cpu_flags")
    assert xf.side_of("default") == "ppojax+xla=default"
    assert xf.side_of("vocab_bf16") == "ppojax+xla=default+vocab_dtype=bfloat16"  # the same (no) flags
    with pytest.raises(ValueError, match="unknown variant"):
        xf.side_of("turbo")
    for name, spec in xf.FLAG_SETS.items():
        assert all(f.startswith("--xla_cpu_") for f in spec["flags"].split()), name
        vs.parse_side(xf.side_of(name))  # every set is a valid side
    args = xf.parse_args(["--job", "b"])
    assert args.sides[0] == "ppojax+xla=default" and args.out.name == "xla_cpu_flags_b_cpu.json"


def test_hlo_summary_counts_library_fusions(load_benchmark):
    xf = load_benchmark("xla_cpu_flags")
    hlo = """
  %ynn_fusion.3 = f32[192,4096]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, metadata={op_name="x"}
  %dot.1 = f32[8,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}
  %multiply_add_fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%d
  %cc = f32[8,8]{1,0} custom-call(%a, %b), custom_call_target="__onednn$matmul"
"""
    s = xf.hlo_summary(hlo)
    assert s["calls"] == {"custom-call:__onednn$matmul": 1, "dot": 1, "fusion": 1, "fusion:ynn": 1}
    renamed = hlo.replace("dot.1", "dot.7").replace('op_name="x"', 'op_name="y"')
    assert xf.hlo_summary(renamed)["fingerprint"] == s["fingerprint"]  # names and metadata do not count


def test_vocab_dtype_experiment_reaches_the_iterations_log_probs(vs, monkeypatch):
    import jax.numpy as jnp

    from ppojax.rl import iteration

    seen = {}
    monkeypatch.setattr(iteration, "token_logprobs", lambda *a, **k: seen.update(k))  # restored after the test
    vs._vocab_dtype_experiment("bfloat16")
    iteration.token_logprobs("h", "W", "tokens", compute_dtype=jnp.float32, chunk_size=4096)
    assert seen == {"compute_dtype": jnp.bfloat16, "chunk_size": 4096}
