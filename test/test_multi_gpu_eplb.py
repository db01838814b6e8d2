"""benchmark/multi_gpu_eplb.py without a GPU: arguments, the launch flags each run gets (parsed
by SGLang's real parser with the plugin's flags), log analysis (rebalances, balancedness lines,
measured MoE-time windows over ranks), the probe checks, and the table/plot from a recorded JSON.
Also the skewed model's hot-expert bias (tools.models)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sglang_moe_routing.eplb.expert_cost import format_moe_time_line
from sglang_moe_routing.tools import models, serverlog

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("multi_gpu_eplb", REPO / "benchmark" / "multi_gpu_eplb.py")
mg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mg)


def test_defaults_and_bad_arguments(capsys):
    a = mg.parse_args([])
    assert (a.tp, a.runs, a.costs) == (2, ["tc", "deepseek", "ca05", "ca10", "ec"], ["hetero", "homo"])
    assert mg.planned_runs(mg.parse_args(["--tp", "1"])) == ["tc", "ec"]  # SGLang: no EPLB on 1 GPU
    for argv, msg in ((["--runs", "tc,foo"], "unknown --runs/--costs value(s) ['foo']"),
                      (["--tp", "0"], "--tp must be >= 1, got 0"),
                      (["--warmup-rounds", "12"], "--warmup-rounds (12) must be < --rounds (12)"),
                      (["--hot-fraction", "2"], "--hot-fraction must be in [0, 1], got 2.0"),
                      (["--redundant-experts", "3"], "--redundant-experts (3) must be a multiple of --tp (2)")):
        with pytest.raises(SystemExit):
            mg.parse_args(argv)
        assert msg in capsys.readouterr().err


def test_run_flags():
    a = mg.parse_args(["--tp", "4", "--redundant-experts", "4"])
    ca = mg.server_args(a, "ca05", "hetero")
    joined = " ".join(ca)
    assert "--tp-size 4 --ep-size 4" in joined and "--moe-runner-backend triton" in joined
    assert "--enable-eplb --eplb-algorithm compute_aware --eplb-compute-cost-alpha 0.5" in joined
    assert "--expert-cost-slow-factor 3" in joined and "--ep-num-redundant-experts 4" in joined
    assert "--enable-expert-compute-profiling" in joined and "--expert-moe-time-window 5" in joined
    assert "--disable-cuda-graph" not in joined  # CUDA graphs stay on
    tc = mg.server_args(a, "tc", "homo")
    assert "--enable-eplb" not in tc and "--expert-cost-slow-factor" not in tc
    assert "--eplb-rebalance-num-iterations" not in tc
    ec = mg.server_args(a, "ec", "hetero")
    assert "--enable-expert-choice" in ec and "--enable-eplb" not in ec


def test_every_run_flag_is_known_to_sglang_with_the_plugin():
    pytest.importorskip("sglang")
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    a = mg.parse_args(["--redundant-experts", "2"])
    for run in mg.RUNS:
        for cost in mg.COSTS:
            ns = parser.parse_args(["--model-path", "m"] + mg.server_args(a, run, cost))
            assert ns.tp_size == 2 and ns.moe_runner_backend == "triton"
    ns = parser.parse_args(["--model-path", "m"] + mg.server_args(a, "ca10", "hetero"))
    assert (ns.eplb_algorithm, ns.eplb_compute_cost_alpha, ns.expert_cost_slow_factor) == ("compute_aware", 1.0, 3)


LOG = "\n".join([
    "[2026-11-29 10:00:00 TP0 EP0] [EPLBManager] system started, will rebalance per 200 iterations.",
    "[2026-11-29 10:00:00 TP1 EP1] [EPLBManager] system started, will rebalance per 200 iterations.",
    "[2026-11-29 10:00:05 TP0 EP0] [EPLBManager] rebalance start",
    "[2026-11-29 10:00:05 TP1 EP1] [EPLBManager] rebalance start",
    "[2026-11-29 10:00:05 TP0 EP0] [EPLBManager] balancedness (mean/max per GPU over the recorded window) "
    "before: tokens=0.912 compute=0.731 | after: tokens=0.861 compute=0.957 (algorithm=compute_aware)",
    "[2026-11-29 10:00:06 TP0 EP0] [EPLBManager] rebalance end time=0.812s",
    "[2026-11-29 10:00:06 TP1 EP1] [EPLBManager] rebalance end time=0.799s",
    "[2026-11-29 10:00:09 TP0 EP0] [EPLBManager] rebalance start",
    "[2026-11-29 10:00:09 TP0 EP0] [EPLBManager] Skipped ep rebalancing: compute-time balancedness 0.95",
    "[2026-11-29 10:00:09 TP0 EP0] " + format_moe_time_line(0, 0, 9, 0, {1: 4.0, 2: 2.0}),
    "[2026-11-29 10:00:09 TP1 EP1] " + format_moe_time_line(0, 0, 9, 1, {1: 2.0, 2: 2.0}),
    "[2026-11-29 10:00:12 TP0 EP0] " + format_moe_time_line(1, 10, 19, 0, {1: 3.0, 2: 3.0}),
    "[2026-11-29 10:00:12 TP1 EP1] " + format_moe_time_line(1, 10, 19, 1, {1: 3.0, 2: 1.0}),
])


def test_log_analysis():
    rb = serverlog.rebalances(LOG)
    assert rb == {"started": 2, "done": 1, "skipped": 1, "durations_s": [0.812]}  # rank 0 only
    (b,) = serverlog.balancedness_lines(LOG)
    assert b == {"before": {"tokens": 0.912, "compute": 0.731}, "after": {"tokens": 0.861, "compute": 0.957},
                 "algorithm": "compute_aware"}
    d = mg.analyse_log(LOG, num_gpus=2)
    w0 = (3.0 / 4.0 + 1.0) / 2
    w1 = (1.0 + 2.0 / 3.0) / 2
    assert d["moe_balancedness_series"] == pytest.approx([w0, w1])
    assert d["moe_balancedness_mean"] == pytest.approx((w0 + w1) / 2)
    assert d["moe_balancedness_last_half"] == pytest.approx(w1)
    assert d["errors"] == []
    one_gpu = "[2026-11-29] [EPLBManager] rebalance end time=1.5s\n"  # no rank tags: every line
    assert serverlog.rebalances(one_gpu)["durations_s"] == [1.5]


def test_errors_found_in_log():
    text = "ok\nTraceback (most recent call last):\n  File \"x\", line 1\n    f()\nRuntimeError: boom\nafter\n"
    assert serverlog.errors(text) == ["RuntimeError: boom"]


def _run(first, last, tp=1000.0):
    return {"probe_first": first, "probe_last": last, "throughput_tok_s": tp, "lost_requests": 0,
            "crashed": False, "moe_windows": 2, "moe_balancedness_series": [0.8, 0.9],
            "moe_balancedness_mean": 0.85, "moe_balancedness_last_half": 0.9,
            "rebalances": {"started": 2, "done": 2, "skipped": 0, "durations_s": [0.5, 0.7]},
            "balancedness_lines": [{"before": {"tokens": 0.9}, "after": {"tokens": 0.95, "compute": 0.97},
                                    "algorithm": "x"}]}


def test_probe_checks():
    p = [[1, 2]] * mg.PROBE_N
    q = [[1, 3]] + [[1, 2]] * (mg.PROBE_N - 1)
    runs = {"tc": _run(p, p), "deepseek": _run(p, q), "ec": _run(q, q)}
    c = mg.probe_checks(runs)
    assert c["ok"] and c["first_probe_equal_tc"] == {"tc": mg.PROBE_N, "deepseek": mg.PROBE_N}
    assert c["last_vs_first_equal"] == {"tc": mg.PROBE_N, "deepseek": mg.PROBE_N - 1, "ec": mg.PROBE_N}
    runs["ca05"] = _run(q, q)
    assert not mg.probe_checks(runs)["ok"]  # a token-choice run's first probe differs


def test_table_and_plot_from_recorded_json(tmp_path):
    p = [[1, 2]] * mg.PROBE_N
    res = {"meta": {"device": "2 x NVIDIA H200", "date": "2026-11-29T10:00:00", "command": "python x",
                    "model": "m", "workload": "w", "slow_factor": 3, "slow_fraction": 0.25, "moe_time_window": 10},
           "costs": {"hetero": {"tc": _run(p, p, 900.0), "deepseek": _run(p, p, 1000.0), "ca05": _run(p, p, 1100.0),
                                "ec": {"error": "server exited", "args": []}},
                     "homo": {}},
           "notes": ["a note"]}
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps(res))
    mg.main(["--render", str(rec), "--out", str(tmp_path / "o")])
    md = (tmp_path / "o" / "multi_gpu_eplb.md").read_text()
    assert "## cost mode: hetero (slow experts x3, 0.25 of each layer)" in md
    assert "| ca05 | 1100 | 1.100 | 0.850 / 0.900 (2) | tokens=0.950 compute=0.970 | 2/2/0 | 0.60/0.70 | 0 | no |" in md
    assert "| ec | FAILED: server exited |" in md
    assert "-> ok" in md and "cost mode: homo" not in md and "- a note" in md
    assert (tmp_path / "o" / "multi_gpu_eplb.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "o" / "multi_gpu_eplb.json").read_text())["costs"]["hetero"]["tc"][
        "throughput_tok_s"] == 900.0
    # a second device call's JSON (the other cost mode) merges into one table
    res2 = json.loads(json.dumps(res))
    res2["costs"] = {"hetero": {}, "homo": {"tc": _run(p, p, 950.0)}}
    res2["meta"]["command"], res2["notes"] = "python y", []
    rec2 = tmp_path / "rec2.json"
    rec2.write_text(json.dumps(res2))
    mg.main(["--render", str(rec), str(rec2), "--out", str(tmp_path / "m")])
    md = (tmp_path / "m" / "multi_gpu_eplb.md").read_text()
    assert "## cost mode: homo (all experts equal)" in md and "| ca05 | 1100 |" in md
    assert "command: `python x` and `python y`" in md


def test_hot_expert_bias():
    hot = models.hot_expert_bias(4, 32, 0.25, 0.3, seed=0)
    assert ((hot == 0.3).sum(1) == 8).all() and ((hot == 0) | (hot == 0.3)).all()
    assert not torch.equal(hot[1], hot[2])
    assert torch.equal(models.hot_expert_bias(4, 32, 0.25, 0.3, seed=0), hot)
    with pytest.raises(ValueError, match="hot_fraction"):
        models.hot_expert_bias(1, 8, -0.1, 0.3, 0)


def test_deepseek_builder_applies_the_hot_bias(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    small = dict(num_hidden_layers=3, n_routed_experts=8, n_group=2, topk_group=1, hidden_size=64,
                 intermediate_size=64, moe_intermediate_size=32, kv_lora_rank=32, vocab_size=128)
    models.deepseek_v3(str(tmp_path / "a"), dtype=torch.float32, **small)
    models.deepseek_v3(str(tmp_path / "b"), dtype=torch.float32, hot_fraction=0.25, hot_bias=0.5, **small)

    def biases(d):
        t = {}
        for f in Path(d).glob("*.safetensors"):
            t.update({k: v for k, v in load_file(str(f)).items() if k.endswith("e_score_correction_bias")})
        return t

    a, b = biases(tmp_path / "a"), biases(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 2  # layers 1, 2 (layer 0 dense)
    hot = models.hot_expert_bias(3, 8, 0.25, 0.5, seed=0)
    for name in a:
        layer = int(name.split("layers.")[1].split(".")[0])
        torch.testing.assert_close(b[name] - a[name], hot[layer])


def test_measure_counts_throughput_and_lost_requests(tmp_path):
    """Bench.measure against a stand-in server: timed rounds after the warm-up only, a short
    output and a failed request are lost requests, probes first and last."""
    a = mg.parse_args(["--rounds", "4", "--warmup-rounds", "1", "--batch", "3", "--decode", "5",
                       "--out", str(tmp_path)])

    class FakeServer:
        calls = 0

        def post(self, path, body, timeout):
            FakeServer.calls += 1
            n, new = len(body["input_ids"]), body["sampling_params"]["max_new_tokens"]
            if FakeServer.calls == 3:  # second round: one short output
                return [{"output_ids": [7] * new}] * (n - 1) + [{"output_ids": [7] * (new - 1)}]
            if FakeServer.calls == 4:  # third round: the request fails
                raise RuntimeError("HTTP 500")
            return [{"output_ids": [ids[0]] * new} for ids in body["input_ids"]]

    d = mg.Bench(a).measure(FakeServer(), "x", vocab=100)
    assert d["lost_requests"] == 1 + 3
    assert [r["lost"] for r in d["rounds"]] == [0, 1, 3, 0]
    assert d["request_errors"] == ["HTTP 500"]
    assert len(d["probe_first"]) == mg.PROBE_N and d["probe_first"] == d["probe_last"]
    timed = d["rounds"][1:]
    assert d["throughput_tok_s"] == pytest.approx(sum(r["tokens"] for r in timed) / sum(r["s"] for r in timed),
                                                  rel=1e-9)
