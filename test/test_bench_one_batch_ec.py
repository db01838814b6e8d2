"""benchmark/bench_one_batch_ec.py's CPU-side logic on recorded data: the log and JSONL parsing
(lines from a real one_batch run on this CPU, tiny Qwen3-MoE, 2026-11-29), the run order, the
checks that refuse ratios (expert choice silently off, plugin missing) and the verdicts."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))

import bench_one_batch_ec as ob  # noqa: E402

# ----------------------------------------------------------------------------- recorded data

EC_LOG = """\
ONEBATCH plugin_flags=yes
[2026-11-29 17:03:37 TP0] sglang-moe-routing: expert-choice kernels ready (backend=reference)
[2026-11-29 17:03:37 TP0] sglang-moe-routing: expert choice routes 2 of 2 MoE (TopK) layers
max_total_num_tokens=8192
Warmup ...
Prefill. latency: 0.50760 s, throughput:     31.52 token/s
Decode.  median latency: 0.01558 s, median throughput:     64.17 token/s
Benchmark ...
[2026-11-29 17:03:38 TP0] sglang-moe-routing: layer 0 routes with expert choice (E=8, top_k=2, cf=1.25)
[2026-11-29 17:03:38 TP0] sglang-moe-routing: layer 1 routes with expert choice (E=8, top_k=2, cf=1.25)
Prefill. latency: 0.01386 s, throughput:   9233.65 token/s
"""

TC_LOG = """\
ONEBATCH plugin_flags=yes
max_total_num_tokens=8192
Warmup ...
Prefill. latency: 0.50760 s, throughput:     31.52 token/s
"""

# run_1_ec1.jsonl of the CPU run: --batch-size 1 8 32 1 8 32 (two passes), input 16, output 4
EC_JSONL = [
    {"run_name": "ec", "batch_size": 1, "input_len": 16, "output_len": 4, "prefill_latency": 0.23659211000085634, "median_decode_latency": 0.003308376999484608},  # noqa: E501
    {"run_name": "ec", "batch_size": 8, "input_len": 16, "output_len": 4, "prefill_latency": 0.01386233999983233, "median_decode_latency": 0.0056745360016066115},  # noqa: E501
    {"run_name": "ec", "batch_size": 32, "input_len": 16, "output_len": 4, "prefill_latency": 0.02528435000022, "median_decode_latency": 0.009437677001187694},  # noqa: E501
    {"run_name": "ec", "batch_size": 1, "input_len": 16, "output_len": 4, "prefill_latency": 0.004193067999949562, "median_decode_latency": 0.003450328000326408},  # noqa: E501
    {"run_name": "ec", "batch_size": 8, "input_len": 16, "output_len": 4, "prefill_latency": 0.007231404999402002, "median_decode_latency": 0.004141282999626128},  # noqa: E501
    {"run_name": "ec", "batch_size": 32, "input_len": 16, "output_len": 4, "prefill_latency": 0.013594772999567795, "median_decode_latency": 0.015437035999639193},  # noqa: E501
]


def _jsonl(recs):
    return "\n".join(json.dumps(r) for r in recs) + "\n"


# ----------------------------------------------------------------------------- parsing


def test_parse_log_reads_plugin_marker_and_ec_coverage():
    ec = ob.parse_log(EC_LOG)
    assert ec == {"plugin_flags": True, "coverage": [2, 2], "ec_layer_lines": 2}
    tc = ob.parse_log(TC_LOG)
    assert tc == {"plugin_flags": True, "coverage": None, "ec_layer_lines": 0}
    up = ob.parse_log(TC_LOG.replace("plugin_flags=yes", "plugin_flags=no"))
    assert up["plugin_flags"] is False
    assert ob.parse_log("no marker here")["plugin_flags"] is None
    partial = ob.parse_log("sglang-moe-routing: expert choice routes 3 of 8 MoE (TopK) layers; "
                           "the others keep token choice:")
    assert partial["coverage"] == [3, 8]


def test_parse_jsonl_discards_the_first_pass():
    pts = ob.parse_jsonl(_jsonl(EC_JSONL), [1, 8, 32], passes=2)
    assert set(pts) == {1, 8, 32}
    # the second pass, not the first (B=1's first prefill is 0.237 s: one_batch's warm-up
    # covers only the first batch size's shapes)
    assert pts[1]["prefill_latency"] == pytest.approx(0.004193067999949562)
    assert pts[1]["decode_latency"] == pytest.approx(0.003450328000326408)
    assert pts[32]["decode_latency"] == pytest.approx(0.015437035999639193)
    one = ob.parse_jsonl(_jsonl(EC_JSONL[:3]), [1, 8, 32], passes=1)
    assert one[1]["prefill_latency"] == pytest.approx(0.23659211000085634)
    # three passes: median of passes 2 and 3
    three = ob.parse_jsonl(_jsonl(EC_JSONL + EC_JSONL[3:]), [1, 8, 32], passes=3)
    assert three[8]["decode_latency"] == pytest.approx(0.004141282999626128)
    assert len(three[8]["samples"]["decode"]) == 2


def test_parse_jsonl_leaves_out_unfinished_points():
    pts = ob.parse_jsonl(_jsonl(EC_JSONL[:4]), [1, 8, 32], passes=2)
    assert set(pts) == {1}


# ----------------------------------------------------------------------------- plan


def test_run_order_interleaves_tc_ec_ec_tc_then_upstream():
    assert [r["label"] for r in ob.run_order(1, True)] == ["tc1", "ec1", "ec2", "tc2", "up1"]
    two = ob.run_order(2, False)
    assert [r["kind"] for r in two] == ["tc", "ec", "ec", "tc"] * 2
    assert [r["label"] for r in two][4:] == ["tc3", "ec3", "ec4", "tc4"]
    with pytest.raises(ValueError, match="--repeats"):
        ob.run_order(0, True)
    assert [r["label"] for r in ob.run_order(1, True, "tc,ec,tc,up")] == ["tc1", "ec1", "tc2", "up1"]
    with pytest.raises(ValueError, match="--order: \\['xx'\\]"):
        ob.run_order(1, True, "tc,xx")


def test_one_batch_argv_repeats_batch_sizes_and_adds_ec_flags_only_to_ec():
    ec_args = ["--enable-expert-choice", "--expert-capacity-factor", "1.25"]
    kw = dict(model="/m", tokenizer="/t", batch_sizes=[1, 32], passes=2, input_len=256,
              output_len=64, result="/r.jsonl", seed=0, ec_args=ec_args,
              device_args=["--attention-backend", "triton"], extra=["--mem-fraction-static", "0.5"])
    ec = ob.one_batch_argv(kind="ec", **kw)
    i = ec.index("--batch-size")
    assert ec[i + 1:i + 5] == ["1", "32", "1", "32"] and ec[i + 5] == "--input-len"
    assert "--enable-expert-choice" in ec and ec[-2:] == ["--mem-fraction-static", "0.5"]
    for kind in ("tc", "up"):
        assert "--enable-expert-choice" not in ob.one_batch_argv(kind=kind, **kw)


def test_child_code_compiles():
    compile(ob.CHILD, "<child>", "exec")


# ----------------------------------------------------------------------------- checks


def _pts():
    return ob.parse_jsonl(_jsonl(EC_JSONL), [1, 8, 32], passes=2)


@pytest.mark.parametrize("kind, log, rc, want", [
    ("ec", EC_LOG, 0, None),
    ("tc", TC_LOG, 0, None),
    ("up", TC_LOG.replace("=yes", "=no"), 0, None),
    ("ec", TC_LOG, 0, "expert choice was OFF: no 'expert choice routes"),
    ("ec", EC_LOG.replace("routes 2 of 2", "routes 0 of 2"), 0, "expert choice was OFF: it routes 0"),
    ("tc", EC_LOG, 0, "expert choice was ON in a tc run"),
    ("ec", EC_LOG.replace("=yes", "=no"), 0, "the plugin did not load"),
    ("up", TC_LOG, 0, "the plugin loaded in the upstream run"),
    ("tc", "Prefill.", 0, "no 'ONEBATCH plugin_flags=' line"),
    ("ec", EC_LOG, 1, "exit status 1"),
    # ecidle: EC on (coverage line) but no pass routed (no "layer N routes" line)
    ("ecidle", "\n".join(x for x in EC_LOG.splitlines() if "routes with" not in x), 0, None),
    ("ecidle", EC_LOG, 0, "expert choice routed a pass in an ecidle run"),
    ("ecidle", TC_LOG, 0, "expert choice was OFF: no 'expert choice routes"),
])
def test_run_failure(kind, log, rc, want):
    got = ob.run_failure(kind, rc, ob.parse_log(log), _pts(), [1, 8, 32])
    assert got == want if want is None else got.startswith(want)


def test_run_failure_names_missing_points():
    pts = ob.parse_jsonl(_jsonl(EC_JSONL[:4]), [1, 8, 32], passes=2)
    assert ob.run_failure("ec", 0, ob.parse_log(EC_LOG), pts, [1, 8, 32]) == "no result for B=[8, 32]"


# ----------------------------------------------------------------------------- verdicts


def _run(label, kind, decode_ms, prefill_ms=None, failure=None):
    pts = {b: {"decode_latency": d / 1e3,
               "prefill_latency": (prefill_ms or {}).get(b, 100.0) / 1e3}
           for b, d in decode_ms.items()}
    return {"label": label, "kind": kind, "failure": failure, "points": pts}


def _rows(result):
    return {(r["B"], r["phase"]): r for r in result["rows"]}


def test_analyse_verdicts_per_point():
    # decode ms per B; TC runs agree within 0.5% at B=1 and 32, 2% at B=128
    # (B=128: the run pairs disagree, 10.0 / 10.4 < 0.97 < 10.2 / 10.4, so the noise decides)
    runs = [_run("tc1", "tc", {1: 10.0, 32: 10.0, 128: 10.0}),
            _run("ec1", "ec", {1: 10.01, 32: 10.2, 128: 10.4}),
            _run("ec2", "ec", {1: 10.02, 32: 10.25, 128: 10.4}),
            _run("tc2", "tc", {1: 10.05, 32: 10.05, 128: 10.2}),
            _run("up1", "up", {1: 9.0, 32: 10.0, 128: 10.0})]
    res = ob.analyse(runs, [1, 32, 128], input_len=256, min_tokens=32)
    rows = _rows(res)
    r1 = rows[(1, "decode")]
    assert not r1["ec_routes"] and r1["goal_row"]
    assert r1["verdict"] == "nothing measurable"  # |1.0025/1.0015 - 1| < 0.5% spread
    r32 = rows[(32, "decode")]
    assert r32["ec_over_tc"] == pytest.approx(10.025 / 10.225)
    assert r32["tc_spread"] == pytest.approx(0.05 / 10.025)
    assert r32["verdict"] == "met"  # 0.980 >= 0.97
    assert rows[(128, "decode")]["verdict"].startswith("noise floor too high (TC-vs-TC 2.0%")
    assert rows[(1, "prefill")]["ec_routes"] and not rows[(1, "prefill")]["goal_row"]
    assert rows[(1, "decode")]["tc_over_up"] == pytest.approx(9.0 / 10.025)
    assert res["overall"].startswith("not judged") and res["exit_code"] == 0


def test_analyse_missed_and_measurable():
    runs = [_run("tc1", "tc", {1: 10.0, 32: 10.0}), _run("ec1", "ec", {1: 10.3, 32: 10.5}),
            _run("ec2", "ec", {1: 10.3, 32: 10.5}), _run("tc2", "tc", {1: 10.0, 32: 10.0})]
    rows = _rows(res := ob.analyse(runs, [1, 32], input_len=256, min_tokens=32))
    assert rows[(32, "decode")]["verdict"].startswith("MISSED (EC/TC 0.952")
    assert rows[(1, "decode")]["verdict"].startswith("MEASURABLE: |EC/TC - 1| = 2.9%")
    assert res["overall"] == "MISSED"
    # prefill (100 ms everywhere, spread 0): met at every B
    assert rows[(32, "prefill")]["verdict"] == "met"


def test_analyse_met_overall_and_single_tc_run_not_judged():
    runs = [_run("tc1", "tc", {1: 10.0, 32: 10.0}), _run("ec1", "ec", {1: 10.0, 32: 10.1}),
            _run("ec2", "ec", {1: 10.0, 32: 10.1}), _run("tc2", "tc", {1: 10.0, 32: 10.0})]
    assert ob.analyse(runs, [1, 32], 256, 32)["overall"] == "met"
    one = ob.analyse(runs[:2], [1, 32], 256, 32)
    assert _rows(one)[(32, "decode")]["verdict"].startswith("not judged: needs >= 2 TC runs")


def test_a_failed_run_refuses_every_ratio():
    runs = [_run("tc1", "tc", {32: 10.0}),
            _run("ec1", "ec", {32: 10.0}, failure="expert choice was OFF: no line"),
            _run("ec2", "ec", {32: 10.0}), _run("tc2", "tc", {32: 10.0})]
    res = ob.judged(runs, [32], 256, 32, 0.97, 0.01)
    assert res["measure"] == "latency" and res["other"] is None  # no device times: wall clock
    for r in res["rows"]:
        assert r["ec_over_tc"] is None
        assert r["verdict"] == r["ec_over_tc_text"] == "n/a (correctness check failed: ec1)"
    assert res["overall"] == "n/a (correctness check failed: ec1)" and res["exit_code"] == 1
    md = ob.markdown({"device": "CPU", "date": "d", "torch": "t", "sglang": "s", "command": "c",
                      "model": "m", "timing": "t", "goal": 0.97}, runs, res)
    assert "**FAILED: expert choice was OFF" in md and "n/a (correctness check failed: ec1)" in md


def _with_gpu(run, decode_ms):
    for b, d in decode_ms.items():
        run["points"][b].update(decode_gpu=d / 1e3, prefill_gpu=50.0 / 1e3)
    return run


def test_judged_on_device_time_when_every_run_has_it():
    # wall clock: TC-vs-TC 5% apart (not judged); device time: 0.1% apart, EC 1% slower (met)
    runs = [_with_gpu(_run("tc1", "tc", {1: 10.0, 32: 10.0}), {1: 5.0, 32: 5.0}),
            _with_gpu(_run("ec1", "ec", {1: 12.0, 32: 10.1}), {1: 5.0, 32: 5.05}),
            _with_gpu(_run("ec2", "ec", {1: 10.0, 32: 10.1}), {1: 5.001, 32: 5.05}),
            _with_gpu(_run("tc2", "tc", {1: 10.5, 32: 10.5}), {1: 5.004, 32: 5.005})]
    res = ob.judged(runs, [1, 32], 256, 32, 0.97, 0.01)
    assert res["measure"] == "gpu" and res["measure_name"] == "device time"
    assert res["overall"] == "met"
    assert _rows(res)[(32, "decode")]["ec_over_tc"] == pytest.approx(5.0025 / 5.05)
    assert _rows(res)[(1, "decode")]["verdict"] == "nothing measurable"
    assert res["other"]["measure"] == "latency"
    # wall clock B=32: TC 10.0 / 10.5 (5% apart), EC 10.1 twice: every pair >= 0.97 anyway
    assert _rows(res["other"])[(32, "decode")]["verdict"] == "met (every run pair: EC/TC >= 0.990)"
    md = ob.markdown({"device": "H200", "date": "d", "torch": "t", "sglang": "s", "command": "c",
                      "model": "m", "timing": "t", "goal": 0.97}, runs, res)
    assert "judged on device time: met" in md
    assert md.index("### Judged: device time") < md.index("### Shown, not judged: one_batch's")
    # one run without device times: back to the wall clock
    del runs[1]["points"][32]["decode_gpu"]
    assert ob.judged(runs, [1, 32], 256, 32, 0.97, 0.01)["measure"] == "latency"


def test_spread():
    assert ob.spread([10.0]) is None
    assert ob.spread([10.0, 11.0, 12.0]) == pytest.approx(2 / 11)


def test_parse_args_rejects_bad_values():
    with pytest.raises(SystemExit):
        ob.parse_args(["--passes", "0"])
    with pytest.raises(SystemExit):
        ob.parse_args(["--batch-sizes", "1,x"])
    with pytest.raises(SystemExit):
        ob.parse_args(["--order", "tc,ecc"])
    with pytest.raises(SystemExit):
        ob.parse_args(["--ec-min-tokens", "often"])
    assert ob.parse_args([]).ec_min_tokens == "auto"
    assert [ob.resolved_min_tokens(v, 128, 8) for v in ("auto", "32")] == [64, 32]
    a = ob.parse_args(["--out", "/tmp/x", "--extra-args", "--mem-fraction-static 0.5"])
    assert a.batch_sizes == [1, 8, 32, 64, 128, 512] and a.qwen_size == "a3b"
    assert a.extra_args == ["--mem-fraction-static", "0.5"]


# ----------------------------------------------------------------------------- CPU smoke


@pytest.mark.slow
def test_cpu_smoke_one_run_of_each_kind(tmp_path):
    """The script end to end on the CPU (tiny Qwen3-MoE, SGLang's torch-native paths): one TC,
    one EC, one upstream and one idle-EC run, each checked from its own log; ~1.5 min on 2
    cores."""
    pytest.importorskip("sglang")
    from sgl_helpers import run_cpu_benchmark

    r = run_cpu_benchmark(
        "bench_one_batch_ec.py", ["--qwen-size", "small", "--batch-sizes", "1,32", "--input-len",
                                  "16", "--output-len", "3", "--order", "tc,ec,up,ecidle", "--out",
                                  tmp_path / "out", "--model-dir", tmp_path / "models",
                                  "--max-seconds", "400"], timeout=450)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((tmp_path / "out" / "bench_one_batch_ec.json").read_text())
    runs = {x["label"]: x for x in d["runs"]}
    assert set(runs) == {"tc1", "ec1", "up1", "ecidle1"}
    assert all(x["failure"] is None for x in runs.values()), [x["failure"] for x in runs.values()]
    assert runs["ec1"]["log"]["coverage"] == [2, 2] and runs["ec1"]["log"]["ec_layer_lines"] == 2
    assert runs["tc1"]["log"] == {"plugin_flags": True, "coverage": None, "ec_layer_lines": 0}
    assert runs["up1"]["log"]["plugin_flags"] is False
    # EC on with min-tokens 10^9: every layer is covered, no pass routed with EC
    assert runs["ecidle1"]["log"] == {"plugin_flags": True, "coverage": [2, 2], "ec_layer_lines": 0}
    idle_args = runs["ecidle1"]["args"]
    assert idle_args[idle_args.index("--expert-choice-min-tokens") + 1] == "1000000000"
    rows = {(x["B"], x["phase"]): x for x in d["result"]["rows"]}
    assert rows[(32, "decode")]["ec_over_tc"] > 0  # a ratio, not a refusal
    assert rows[(32, "decode")]["verdict"].startswith("not judged: needs >= 2 TC runs")
    assert (tmp_path / "out" / "bench_one_batch_ec.png").stat().st_size > 0


def test_noisy_points_are_decided_when_every_run_pair_agrees():
    # B=32 decode: TC runs 2% apart (above the 1% noise limit), but the slowest EC run against
    # the fastest TC run is still 10.2/10.3 = 0.990 >= 0.97: met whatever the noise floor
    runs = [_run("tc1", "tc", {32: 10.0, 64: 10.0, 128: 10.0}),
            _run("ec1", "ec", {32: 10.25, 64: 10.9, 128: 10.3}),
            _run("ec2", "ec", {32: 10.3, 64: 11.0, 128: 10.4}),
            _run("tc2", "tc", {32: 10.2, 64: 10.2, 128: 10.2})]
    rows = _rows(res := ob.analyse(runs, [32, 64, 128], input_len=256, min_tokens=32))
    assert rows[(32, "decode")]["verdict"] == "met (every run pair: EC/TC >= 0.971)"
    # B=64: even the fastest EC run against the slowest TC run is 10.2/10.9 = 0.936 < 0.97
    assert rows[(64, "decode")]["verdict"] == "MISSED (every run pair: EC/TC <= 0.936 < 0.97)"
    # B=128: pairs disagree (10.0/10.4 = 0.962, 10.2/10.3 = 0.990): still not judged
    assert rows[(128, "decode")]["verdict"] == "noise floor too high (TC-vs-TC 2.0%)"
    assert res["overall"] == "MISSED"
    del runs[1]["points"][64], runs[2]["points"][64]
    res = ob.analyse(runs, [32, 128], 256, 32)
    assert res["overall"].startswith("not judged")
    runs[1]["points"][128]["decode_latency"] = runs[2]["points"][128]["decode_latency"] = 0.0102
    assert ob.analyse(runs, [32, 128], 256, 32)["overall"] == "met"


def test_rejudge_reads_a_saved_report_and_runs_nothing(tmp_path, monkeypatch):
    runs = [_run("tc1", "tc", {1: 10.0, 64: 10.0}), _run("ec1", "ec", {1: 10.0, 64: 10.25}),
            _run("ec2", "ec", {1: 10.0, 64: 10.3}), _run("tc2", "tc", {1: 10.0, 64: 10.2})]
    meta = {"device": "1 x H200", "date": "2026-11-29T22:00:00+00:00", "torch": "t",
            "sglang": "0.5.23", "command": "python3 benchmark/bench_one_batch_ec.py",
            "model": "Qwen3-MoE a3b: 128 experts, top-8, 4 layers, random weights; EC = "
                     "--expert-capacity-factor 1.25 --expert-choice-min-tokens auto (= 64 tokens "
                     "for this model)",
            "timing": "B x 256 seeded random ids (seed 0), 64 output tokens; 2 passes",
            "skipped": [], "goal": 0.97}
    saved = tmp_path / "saved.json"  # JSON turns the points' int keys into strings
    saved.write_text(json.dumps({"meta": meta, "runs": runs, "result": {}}))
    monkeypatch.setattr(ob.Bench, "run_plan", lambda *a, **k: pytest.fail("ran something"))
    out = tmp_path / "out"
    rc = ob.Bench(ob.parse_args(["--rejudge", str(saved), "--out", str(out)])).main()
    assert rc == 0
    res = json.loads((out / "bench_one_batch_ec.json").read_text())
    rows = {(r["B"], r["phase"]): r for r in res["result"]["rows"]}
    assert sorted({b for b, _ in rows}) == [1, 64]  # from the saved runs, not the defaults
    assert rows[(1, "decode")]["tokens"] == 1 and not rows[(1, "decode")]["ec_routes"]
    assert rows[(64, "decode")]["ec_routes"]  # min-tokens 64 read back from the model line
    assert rows[(64, "prefill")]["tokens"] == 64 * 256
    assert rows[(64, "decode")]["verdict"] == "met (every run pair: EC/TC >= 0.971)"
    md = (out / "bench_one_batch_ec.md").read_text()
    assert "- re-judged: " in md and "saved.json judged again" in md
    assert "- date: 2026-11-29T22:00:00+00:00" in md  # the measurement's date, kept


def test_host_time_table_shows_each_run_and_the_ec_minus_tc_difference():
    runs = [_with_gpu(_run("tc1", "tc", {1: 10.0, 32: 10.0}), {1: 5.0, 32: 5.0}),
            _with_gpu(_run("ec1", "ec", {1: 10.0, 32: 10.1}), {1: 5.0, 32: 5.05}),
            _with_gpu(_run("ec2", "ec", {1: 10.0, 32: 10.1}), {1: 5.0, 32: 5.05}),
            _with_gpu(_run("tc2", "tc", {1: 10.0, 32: 10.0}), {1: 5.0, 32: 5.0})]
    host = {"tc1": 0.380, "ec1": 0.402, "ec2": 0.416, "tc2": 0.384}  # ms, B = 1 only
    cpu = {"tc1": 0.370, "ec1": 0.371, "ec2": 0.373, "tc2": 0.372}  # on-CPU part: equal
    pre = {"tc1": 2.0, "ec1": 3.1, "ec2": 2.9, "tc2": 2.2}  # prefill host ms
    pre_cpu = {"tc1": 1.9, "ec1": 2.5, "ec2": 2.5, "tc2": 2.1}
    segs = {"tc1": 5, "ec1": 7, "ec2": 7, "tc2": 5}  # EC's prefill graph has more breaks
    for r in runs:
        r["points"][1].update(decode_host=host[r["label"]] / 1e3,
                              decode_host_cpu=cpu[r["label"]] / 1e3,
                              prefill_host=pre[r["label"]] / 1e3,
                              prefill_host_cpu=pre_cpu[r["label"]] / 1e3,
                              prefill_segments=segs[r["label"]], decode_segments=1)
    res = ob.judged(runs, [1, 32], 256, 32, 0.97, 0.01)
    meta = {"device": "H200", "date": "d", "torch": "t", "sglang": "s", "command": "c",
            "model": "m", "timing": "t", "goal": 0.97}
    md = ob.markdown(meta, runs, res)
    note = "### Shown, not judged: host time of each prefill and decode step"
    assert note in md
    table = md.split(note)[1]
    assert ("| B | phase | TC host ms per step (runs) | EC host ms per step (runs) | EC - TC (us) "
            "| EC - TC on CPU (us) | graph segments per step |") in table
    # prefill medians: TC 2.1, EC 3.0 -> +900 us; on CPU 2.0 vs 2.5 -> +500 us
    assert "| 1 | prefill | 2.000, 2.200 | 3.100, 2.900 | +900 | +500 | TC 5, EC 7 |" in table
    # decode medians: TC 0.382, EC 0.409 -> +27 us; on CPU 0.371 vs 0.372 -> +1 us
    # (descheduled, not more work); B = 32 has no host times: no row
    assert "| 1 | decode | 0.380, 0.384 | 0.402, 0.416 | +27 | +1 | TC 1, EC 1 |" in table
    assert table.index("| 1 | prefill |") < table.index("| 1 | decode |")
    assert "| 32 |" not in table
    # runs that disagree on the segments show each count; older records: "-"
    runs[3]["points"][1]["prefill_segments"] = 6
    for r in runs:
        del r["points"][1]["decode_segments"]
    table = ob.markdown(meta, runs, res).split(note)[1]
    assert "| +900 | +500 | TC 5/6, EC 7 |" in table and "| +27 | +1 | - |" in table
    # a saved report from before prefill host times: the decode row alone
    for r in runs:
        del r["points"][1]["prefill_host"], r["points"][1]["prefill_host_cpu"]
    table = ob.markdown(meta, runs, res).split(note)[1]
    assert "| prefill |" not in table and "| 1 | decode | 0.380, 0.384 |" in table
    for r in runs:
        del r["points"][1]["decode_host"]
    md = ob.markdown(meta, runs, res)
    assert "host time of each" not in md  # older records: no table


def test_rejudge_of_a_stored_report_renders_the_host_table(tmp_path):
    """docs/results' EC run with decode host times (from before prefill host times and
    segment counts): re-judged, its host table has the decode rows, segments "-"."""
    saved = (Path(__file__).resolve().parents[1] / "docs" / "results"
             / "bench_one_batch_ec_a3b_host_2026-11-30.json")
    out = tmp_path / "out"
    ob.Bench(ob.parse_args(["--rejudge", str(saved), "--out", str(out)])).main()
    md = (out / "bench_one_batch_ec.md").read_text()
    table = md.split("### Shown, not judged: host time of each prefill and decode step")[1]
    assert "| B | phase | TC host ms per step (runs) |" in table
    assert "| 1 | decode | 0.828, 0.507, 0.492 | 0.490, 0.540, 0.497 |" in table
    assert "| 64 | decode |" in table and "| prefill |" not in table
    assert table.split("\n\n")[1].splitlines()[2].endswith("| - |")


@pytest.mark.parametrize("content", [None, "not json", '{"runs": []}', '{"meta": {}, "runs": 3}'])
def test_rejudge_refuses_a_file_that_is_not_a_saved_report(tmp_path, content):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    bench = ob.Bench(ob.parse_args(["--rejudge", str(path), "--out", str(tmp_path / "o")]))
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert str(exc.value).startswith(f"error: --rejudge {path}: not a saved bench_one_batch_ec")
