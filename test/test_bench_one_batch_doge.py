"""benchmark/bench_one_batch_doge.py's CPU-side logic: the mirrored run order, the log checks
(the model's start-up line recorded from a real one_batch run on this CPU, Doge n=8,
2026-11-29), the goal verdicts and the refusal of every ratio when a run failed; plus a CPU
smoke of the script end to end."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))

import bench_one_batch_doge as obd  # noqa: E402

# ----------------------------------------------------------------------------- recorded data

LOG = """\
ONEBATCH plugin_flags=yes
[2026-11-29 18:35:53 TP0] Load weight begin. avail mem=22.02 GB
[2026-11-29 18:35:53 TP0] sglang-moe-routing: Doge CDMoE: 4 of 4 layers route with the Omni router, backend=triton (--omni-router-backend triton; n=8, top_k=8)
[2026-11-29 18:35:53 TP0] Load weight end. elapsed=0.12 s, type=DogeForCausalLM, avail mem=21.94 GB, mem usage=0.09 GB.
max_total_num_tokens=8192
"""


def _log(backend="triton", flag="triton", layers=4, flags="yes"):
    return (LOG.replace("backend=triton", f"backend={backend}")
            .replace("--omni-router-backend triton", f"--omni-router-backend {flag}")
            .replace("4 of 4", f"{layers} of 4").replace("=yes", f"={flags}"))


PTS = {1: {"prefill_latency": 0.1, "decode_latency": 0.01},
       128: {"prefill_latency": 0.2, "decode_latency": 0.02}}


# ----------------------------------------------------------------------------- plan


def test_run_order_is_mirrored_per_n():
    plan = obd.run_order([512], ["triton", "torch", "reference"], repeats=1)
    assert [p["backend"] for p in plan] == ["triton", "torch", "reference",
                                            "reference", "torch", "triton"]
    assert [p["label"] for p in plan][:4] == ["n512_triton1", "n512_torch1",
                                              "n512_reference1", "n512_reference2"]
    two = obd.run_order([64, 512], ["triton", "torch"], repeats=2)
    assert [p["n"] for p in two] == [64] * 8 + [512] * 8
    assert [p["label"] for p in two][:8] == ["n64_triton1", "n64_torch1", "n64_torch2",
                                             "n64_triton2", "n64_triton3", "n64_torch3",
                                             "n64_torch4", "n64_triton4"]
    given = obd.run_order([8], ["triton"], 1, order=["torch", "reference", "torch"])
    assert [p["label"] for p in given] == ["n8_torch1", "n8_reference1", "n8_torch2"]
    with pytest.raises(ValueError, match="--repeats"):
        obd.run_order([8], ["triton"], 0)
    with pytest.raises(ValueError, match=r"\['naive'\] not among"):
        obd.run_order([8], ["triton", "naive"], 1)


def test_runs_pass_the_backend_flag():
    """The argv a run gets (one_batch_runner.one_batch_argv with this script's run args)."""
    import one_batch_runner as obr

    argv = obr.one_batch_argv("/m", "/t", [1, 128], 2, 64, 64, "/r.jsonl", 0, "n512_torch1",
                              ["--attention-backend", "triton", "--omni-router-backend", "torch"])
    i = argv.index("--batch-size")
    assert argv[i + 1:i + 5] == ["1", "128", "1", "128"]
    assert argv[-2:] == ["--omni-router-backend", "torch"]
    assert argv[argv.index("--run-name") + 1] == "n512_torch1"


# ----------------------------------------------------------------------------- checks


def test_parse_log_reads_the_model_start_up_line():
    got = obd.parse_log(LOG)
    assert got == {"plugin_flags": True,
                   "omni": [{"layers": 4, "of": 4, "backend": "triton", "flag": "triton"}]}
    cannot = obd.parse_log(_log(backend="triton (cannot run: omni_router: backend='triton' "
                                        "cannot run here: dtype torch.float64)"))
    assert cannot["omni"][0]["backend"].startswith("triton (cannot run")
    assert obd.parse_log("Prefill.") == {"plugin_flags": None, "omni": []}


@pytest.mark.parametrize("backend, log, rc, pts, want", [
    ("triton", LOG, 0, PTS, None),
    ("torch", _log("torch", "torch"), 0, PTS, None),
    ("auto", _log("triton", "auto"), 0, PTS, None),
    ("auto", _log("torch", "auto"), 0, PTS, None),
    ("triton", LOG, 1, PTS, "exit status 1"),
    ("triton", LOG, "timeout (--max-seconds)", PTS, "exit status timeout"),
    ("triton", LOG, 0, {1: PTS[1]}, "no result for B=[128]"),
    ("triton", _log(flags="no"), 0, PTS, "the plugin did not load"),
    ("triton", "ONEBATCH plugin_flags=yes\n", 0, PTS, "no 'Doge CDMoE: ..."),
    ("triton", "Prefill.", 0, PTS, "no 'ONEBATCH plugin_flags=' line"),
    ("reference", LOG, 0, PTS, "the model got --omni-router-backend triton, the run asked "
                               "for reference"),
    ("triton", _log("torch", "triton"), 0, PTS, "the model runs backend=torch, the run asked "
                                                "for triton"),
    ("triton", _log("triton (cannot run: x)", "triton"), 0, PTS, "the model runs backend=triton "
                                                                 "(cannot run"),
    ("auto", _log("auto", "auto"), 0, PTS, "the model runs backend=auto"),
    ("triton", _log(layers=0), 0, PTS, "no layer routes with the Omni router (0 of 4)"),
    ("triton", LOG + _log("torch", "torch"), 0, PTS, "the model got --omni-router-backend torch"),
])
def test_run_failure(backend, log, rc, pts, want):
    got = obd.run_failure(backend, rc, obd.parse_log(log), pts, [1, 128])
    assert got == want if want is None else got.startswith(want), got


# ----------------------------------------------------------------------------- verdicts


def _run(i, backend, decode_ms, prefill_ms=100.0, n=512, failure=None):
    pts = {b: {"decode_latency": d / 1e3, "prefill_latency": prefill_ms / 1e3}
           for b, d in decode_ms.items()}
    return {"label": f"n{n}_{backend}{i}", "n": n, "backend": backend, "failure": failure,
            "points": pts}


def _mirrored(tri, tor, ref, n=512):
    """Six runs: ``tri``/``tor``/``ref`` are two {B: ms} dicts each (runs 1 and 2)."""
    return [_run(1, "triton", tri[0], n=n), _run(1, "torch", tor[0], n=n),
            _run(1, "reference", ref[0], n=n), _run(2, "reference", ref[1], n=n),
            _run(2, "torch", tor[1], n=n), _run(2, "triton", tri[1], n=n)]


def _rows(res):
    return {(r["n"], r["B"], r["phase"]): r for r in res["rows"]}


def test_goal_1_met_and_goal_2_within_noise():
    # triton 1.0/1.02 ms (spread 2%), torch 1.0/1.01, reference 2.0/2.02 at B=128
    runs = _mirrored(({1: 0.50, 128: 1.00}, {1: 0.50, 128: 1.02}),
                     ({1: 0.50, 128: 1.00}, {1: 0.50, 128: 1.01}),
                     ({1: 0.60, 128: 2.00}, {1: 0.60, 128: 2.02}))
    res = obd.analyse(runs, [512], [1, 128], input_len=64)
    r = _rows(res)[(512, 128, "decode")]
    assert r["goal1_row"] and r["median_s"]["triton"] == pytest.approx(1.01e-3)
    assert r["triton_over_reference"] == pytest.approx(2.01 / 1.01)
    assert r["floor_reference"] == pytest.approx(0.02 / 1.01)
    assert r["goal1"] == "met" and res["goal1"] == "met"
    # triton/torch = 1.005/1.01 = 0.995 >= 1 - 1.98%: met within the noise floor
    assert r["triton_over_torch"] == pytest.approx(1.005 / 1.01)
    assert r["goal2"] == "met" and res["goal2"] == "met" and res["exit_code"] == 0
    assert not _rows(res)[(512, 1, "decode")]["goal1_row"]
    assert _rows(res)[(512, 1, "decode")]["goal1"] == ""


def test_goal_1_missed_and_not_judged_within_noise():
    runs = _mirrored(({128: 1.0}, {128: 1.0}), ({128: 1.0}, {128: 1.0}),
                     ({128: 1.3}, {128: 1.3}))
    res = obd.analyse(runs, [512], [128], input_len=64)
    assert res["goal1"] == "MISSED"
    assert _rows(res)[(512, 128, "decode")]["goal1"].startswith("MISSED (triton/reference 1.30")
    # ratio 1.52 with a 5% triton spread: the 1.3% margin is inside the noise
    noisy = _mirrored(({128: 1.0}, {128: 1.05}), ({128: 1.0}, {128: 1.0}),
                      ({128: 1.56}, {128: 1.56}))
    res = obd.analyse(noisy, [512], [128], input_len=64)
    v = _rows(res)[(512, 128, "decode")]["goal1"]
    assert v.startswith("not judged: noise floor 4.9% >= margin"), v
    assert res["goal1"].startswith("not judged (noise floor 4.9%")


def test_goal_2_missed_and_noise_too_high():
    runs = _mirrored(({1: 1.0, 128: 1.1}, {1: 1.0, 128: 1.1}),
                     ({1: 1.0, 128: 1.0}, {1: 1.0, 128: 1.0}),
                     ({1: 1.0, 128: 3.0}, {1: 1.0, 128: 3.0}))
    res = obd.analyse(runs, [512], [1, 128], input_len=64)
    rows = _rows(res)
    assert rows[(512, 128, "decode")]["goal2"].startswith("MISSED (triton/torch 0.909")
    assert rows[(512, 1, "decode")]["goal2"] == "met"
    assert res["goal2"] == "MISSED" and res["goal1"] == "met"
    noisy = _mirrored(({128: 1.0}, {128: 1.1}), ({128: 1.0}, {128: 1.0}),
                      ({128: 3.0}, {128: 3.0}))
    v = _rows(obd.analyse(noisy, [512], [128], 64))[(512, 128, "decode")]["goal2"]
    assert v == "not judged: noise floor 9.5% >= 5%"


def test_single_runs_and_other_n_are_not_judged():
    runs = [_run(1, "triton", {128: 1.0}), _run(1, "torch", {128: 1.0}),
            _run(1, "reference", {128: 2.0})]
    res = obd.analyse(runs, [512], [128], 64)
    assert res["goal1"].startswith("not judged (needs >= 2 runs of triton and of reference")
    assert _rows(res)[(512, 128, "decode")]["triton_over_reference"] == pytest.approx(2.0)
    other = [dict(r, n=64) for r in runs]
    res = obd.analyse(other, [64], [128], 64)
    assert res["goal1"] == "not measured (n=512 B=128 decode not in the plan)"


def test_a_failed_run_refuses_every_ratio_and_exits_1():
    runs = _mirrored(({128: 1.0}, {128: 1.0}), ({128: 1.0}, {128: 1.0}),
                     ({128: 2.0}, {128: 2.0}))
    runs[2]["failure"] = "the model runs backend=torch, the run asked for reference"
    res = obd.analyse(runs, [512], [128], 64)
    refusal = "n/a (correctness check failed: n512_reference1)"
    for r in res["rows"]:
        assert r["triton_over_reference"] is None and r["triton_over_torch"] is None
        assert r["triton_over_reference_text"] == r["triton_over_torch_text"] == refusal
        assert r["goal2"] == refusal
    assert res["goal1"] == res["goal2"] == refusal and res["exit_code"] == 1
    meta = {"device": "CPU", "date": "d", "torch": "t", "sglang": "s", "command": "c",
            "model": "m", "timing": "t", "goal_ratio": 1.5, "goal_n": 512, "goal_batch": 128}
    md = obd.markdown(meta, runs, res)
    assert "**FAILED: the model runs backend=torch" in md and refusal in md


def test_device_time_table_beside_the_wall_clock_goals():
    runs = _mirrored(({128: 3.0}, {128: 3.0}), ({128: 3.0}, {128: 3.0}),
                     ({128: 3.1}, {128: 3.1}))  # wall clock: host-bound, ratio 1.03
    assert not obd.has_device_time(runs)
    for r, gpu in zip(runs, (0.5, 0.8, 2.5, 2.5, 0.8, 0.5)):
        r["points"][128].update(decode_gpu=gpu / 1e3, prefill_gpu=gpu / 1e3)
    assert obd.has_device_time(runs)
    wall = obd.analyse(runs, [512], [128], 64)
    dev = obd.analyse(runs, [512], [128], 64, measure="gpu")
    assert wall["goal1"] == "MISSED" and dev["goal1"] == "met"
    assert _rows(dev)[(512, 128, "decode")]["triton_over_torch"] == pytest.approx(1.6)
    meta = {"device": "H200", "date": "d", "torch": "t", "sglang": "s", "command": "c",
            "model": "m", "timing": "t", "goal_ratio": 1.5, "goal_n": 512, "goal_batch": 128}
    res = obd.judged(runs, [512], [128], 64, 512, 128, 1.5, 0.05)
    assert res["goal1"] == "MISSED"  # a speed-up: judged end to end
    assert res["goal2"] == "met" and res["goal2_measure"] == "device time"
    assert res["goal2_wall"] == wall["goal2"] == "met"  # 3.0 vs 3.0 ms
    md = obd.markdown(meta, runs, res)
    assert "**Goal 1 (triton >= 1.5x reference, n=512 B=128 decode): MISSED**" in md
    assert "judged on device time: met** (wall clock: met)" in md
    assert "### Device time per pass" in md and "| 5.00 |" in md
    assert "host time of each" not in md  # no host times recorded
    # mirrored order: triton1, torch1, reference1, reference2, torch2, triton2
    for r, h, ph, seg in zip(runs, (0.30, 0.40, 0.35, 0.35, 0.42, 0.31),
                             (4.0, 3.0, 3.5, 3.5, 3.2, 4.4), (7, 5, 5, 5, 5, 7)):
        r["points"][128].update(decode_host=h / 1e3, prefill_host=ph / 1e3,
                                prefill_segments=seg, decode_segments=1)
    md = obd.markdown(meta, runs, res)
    assert ("| n | B | phase | triton host ms per step (runs) | torch host ms per step (runs) "
            "| reference host ms per step (runs) | torch - triton (us) | reference - triton (us) "
            "| torch - triton on CPU (us) | reference - triton on CPU (us) "
            "| graph segments per step |") in md
    # prefill: triton 4.0, 4.4 (median 4.2); torch 3.0, 3.2 (-1100 us); reference -700 us;
    # triton's prefill replays more graph segments (more breaks, each launched by the host)
    assert ("| 512 | 128 | prefill | 4.000, 4.400 | 3.000, 3.200 | 3.500, 3.500 | -1100 | -700 "
            "| - | - | triton 7, torch 5, reference 5 |") in md
    # decode: triton 0.300, 0.310 (median 0.305); torch 0.400, 0.420 (+105 us); reference +45
    assert ("| 512 | 128 | decode | 0.300, 0.310 | 0.400, 0.420 | 0.350, 0.350 | +105 | +45 "
            "| - | - | triton 1, torch 1, reference 1 |") in md
    # a run without device times: goal 2 back on the wall clock
    del runs[0]["points"][128]["decode_gpu"]
    assert obd.judged(runs, [512], [128], 64, 512, 128, 1.5, 0.05)["goal2_measure"] == "wall clock"


def test_rejudge_of_a_stored_report_without_host_times(tmp_path, monkeypatch):
    """docs/results' Doge run recorded no host times: re-judged, it renders (device-time table
    included) without a host table."""
    saved = (Path(__file__).resolve().parents[1] / "docs" / "results"
             / "bench_one_batch_doge_n64_n256_2026-11-29.json")
    monkeypatch.setattr(obd.Bench, "run_plan", lambda *a, **k: pytest.fail("ran something"))
    out = tmp_path / "out"
    obd.Bench(obd.parse_args(["--rejudge", str(saved), "--out", str(out)])).main()
    md = (out / "bench_one_batch_doge.md").read_text()
    assert "- re-judged: " in md and "### Device time per pass" in md
    assert "| 256 | 128 | decode | 128 | 0.451, 0.450 |" in md
    assert "host time of each" not in md
    # with host times added to one n's runs, that n's rows render; the other n has none
    saved_runs = json.loads(saved.read_text())
    for r in saved_runs["runs"]:
        if r["n"] == 64:
            r["points"]["128"].update(prefill_host=2e-3, decode_host=0.3e-3)
    path = tmp_path / "with_host.json"
    path.write_text(json.dumps(saved_runs))
    obd.Bench(obd.parse_args(["--rejudge", str(path), "--out", str(out)])).main()
    table = (out / "bench_one_batch_doge.md").read_text().split("host time of each")[1]
    assert "| 64 | 128 | prefill | 2.000, 2.000 | 2.000, 2.000 | 2.000 | +0 | +0 | - | - | - |" \
        in table
    assert "| 64 | 128 | decode |" in table and "| 256 |" not in table


def test_parse_args():
    a = obd.parse_args(["--out", "/tmp/x"])
    assert a.doge_n == [512] and a.batch_sizes == [1, 128]
    assert a.backends == ["triton", "torch", "reference"] and a.order is None
    for bad in (["--backends", "triton,naive"], ["--doge-n", "0"], ["--doge-n", "2"],
                ["--passes", "0"], ["--order", "x"], ["--batch-sizes", "1,x"]):
        with pytest.raises(SystemExit):
            obd.parse_args(bad)


# ----------------------------------------------------------------------------- CPU smoke


@pytest.mark.slow
def test_cpu_smoke_one_run_of_each_backend(tmp_path):
    """The script end to end on the CPU (Doge n=8, SGLang's torch-native paths, Triton
    interpreted): one run per backend, each checked from its own log; ~75 s on 2 cores."""
    pytest.importorskip("sglang")
    from sgl_helpers import run_cpu_benchmark

    r = run_cpu_benchmark(
        "bench_one_batch_doge.py", ["--doge-n", "8", "--batch-sizes", "1,8", "--input-len", "16",
                                    "--output-len", "3", "--order", "triton,torch,reference",
                                    "--out", tmp_path / "out", "--model-dir", tmp_path / "models",
                                    "--max-seconds", "400"], timeout=450, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((tmp_path / "out" / "bench_one_batch_doge.json").read_text())
    runs = {x["label"]: x for x in d["runs"]}
    assert list(runs) == ["n8_triton1", "n8_torch1", "n8_reference1"]
    for x in runs.values():
        assert x["failure"] is None, x["failure"]
        assert x["log"]["omni"] == [{"layers": 4, "of": 4, "backend": x["backend"],
                                     "flag": x["backend"]}]
    rows = {(x["B"], x["phase"]): x for x in d["result"]["rows"]}
    assert rows[(8, "decode")]["triton_over_torch"] > 0  # a ratio, not a refusal
    assert rows[(8, "decode")]["goal2"].startswith("not judged: needs >= 2 runs")
    assert d["result"]["goal1"] == "not measured (n=512 B=128 decode not in the plan)"
    assert (tmp_path / "out" / "bench_one_batch_doge.png").stat().st_size > 0


@pytest.mark.slow
def test_cpu_run_with_the_wrong_backend_is_refused(tmp_path):
    """A later ``--omni-router-backend torch`` in --extra-args wins over the run's own: the
    model's start-up line names torch, so the reference run fails its check, every ratio is
    refused and the script exits 1 (~20 s)."""
    pytest.importorskip("sglang")
    from sgl_helpers import run_cpu_benchmark

    r = run_cpu_benchmark(
        "bench_one_batch_doge.py", ["--doge-n", "8", "--batch-sizes", "1", "--input-len", "8",
                                    "--output-len", "2", "--passes", "1", "--order", "reference",
                                    "--extra-args", "--omni-router-backend torch", "--out",
                                    tmp_path / "out", "--model-dir", tmp_path / "models"],
        timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((tmp_path / "out" / "bench_one_batch_doge.json").read_text())
    assert d["runs"][0]["failure"] == ("the model got --omni-router-backend torch, the run "
                                       "asked for reference")
    assert d["result"]["goal1"] == "n/a (correctness check failed: n8_reference1)"


def test_noisy_goal_rows_are_decided_when_every_run_pair_agrees():
    # B=1: triton runs 10% apart (above the 5% limit) but its slowest run (0.55 ms) still beats
    # torch's fastest (0.80 ms): met. B=128: its fastest run (1.2) loses to torch's slowest
    # (1.05): missed. Goal 1: triton 1.0/1.1 vs reference 2.0/2.02 -> every pair >= 1.82.
    runs = _mirrored(({1: 0.50, 128: 1.00}, {1: 0.55, 128: 1.10}),
                     ({1: 0.80, 128: 1.00}, {1: 0.80, 128: 1.05}),
                     ({1: 1.00, 128: 2.00}, {1: 1.00, 128: 2.02}))
    for r in runs:
        if r["backend"] == "triton":
            r["points"][128]["decode_latency"] += 0.2e-3  # 1.2 and 1.3 ms
    rows = _rows(res := obd.analyse(runs, [512], [1, 128], input_len=64))
    assert rows[(512, 1, "decode")]["goal2"] == "met (every run pair: triton/torch >= 1.45)"
    assert rows[(512, 128, "decode")]["goal2"] == (
        "MISSED (every run pair: triton/torch <= 0.88 < 1.0)")
    assert res["goal2"] == "MISSED"
    assert rows[(512, 128, "decode")]["goal1"] == (
        "met (every run pair: triton/reference >= 1.54)")
    assert res["goal1"] == "met"
    # pairs that disagree stay not judged
    runs = _mirrored(({128: 1.0}, {128: 1.1}), ({128: 1.0}, {128: 1.0}), ({128: 3.0}, {128: 3.0}))
    assert _rows(obd.analyse(runs, [512], [128], 64))[(512, 128, "decode")]["goal2"] == (
        "not judged: noise floor 9.5% >= 5%")
