"""benchmark/harness.py and the benchmarks' CPU-side logic: the correctness gate on speed-ups,
table formatting, argument parsing, and the checks against the reference (no GPU needed)."""

import ast
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmark"
sys.path.insert(0, str(BENCH))

import bench_omni  # noqa: E402
import bench_routing  # noqa: E402
import harness  # noqa: E402
import omni_variants  # noqa: E402
import sglang_yardstick  # noqa: E402
from harness import Checks  # noqa: E402

from sglang_moe_routing.expert_choice import RoutingSpec  # noqa: E402
from sglang_moe_routing.expert_choice.reference import (  # noqa: E402
    expert_choice_topk_reference,
    token_choice_topk_reference,
)
from sglang_moe_routing.omni import omni_router_pruned_torch  # noqa: E402

REFUSED = "n/a (correctness check failed: "


# ----------------------------------------------------------------------------- the gate


def test_ratio_printed_only_when_every_party_passed():
    c = Checks()
    c.record(("ec_cuda", 8192, 64, 8), None)
    c.record(("torch_tc", 8192, 64, 8), None)
    assert c.ratio(20.0, 10.0, ("ec_cuda", 8192, 64, 8), ("torch_tc", 8192, 64, 8)) == "2.00"
    c.record(("torch_tc", 8192, 64, 8), "3 rows differ")
    got = c.ratio(20.0, 10.0, ("ec_cuda", 8192, 64, 8), ("torch_tc", 8192, 64, 8))
    assert got == REFUSED + "torch_tc)"
    # a party never checked (the reference, a baseline) does not refuse
    assert c.ratio(300.0, 20.0, ("ec_cuda", 8192, 64, 8), spec=".1f", suffix="x") == "15.0x"
    assert c.exit_code() == 1
    assert "FAILED torch_tc 8192 64 8: 3 rows differ" in c.summary()
    assert c.to_json() == {"ec_cuda 8192 64 8": None, "torch_tc 8192 64 8": "3 rows differ"}


def test_ratio_missing_values_and_clean_exit():
    c = Checks()
    for num, den in ((None, 1.0), (1.0, None), (float("nan"), 1.0), (1.0, 0.0)):
        assert c.ratio(num, den) == "-"
    assert c.exit_code() == 0 and c.failures == {}


def test_first_failure_is_kept_and_a_crashing_check_fails():
    c = Checks()
    c.record("a", "wrong ids")
    c.record("a", None)  # a later pass does not erase the failure
    assert c.failed("a") == ["a"]

    def boom():
        raise RuntimeError("kernel crashed")

    assert c.run("b", boom) == "RuntimeError: kernel crashed"
    assert c.refusal("a", "b", "c") == REFUSED + "a, b)"
    assert c.run("c", lambda: None) is None and c.ok("c")


# ----------------------------------------------------------------------------- formatting


def test_md_table_and_fmt():
    text = harness.md_table(["T", "us"], [[1, "2.5"], [32, harness.fmt(12.345)]])
    assert text.splitlines() == ["| T | us |", "|---|---|", "| 1 | 2.5 |", "| 32 | 12.3 |"]
    with pytest.raises(ValueError, match="row has 1 cells, header 2"):
        harness.md_table(["T", "us"], [[1]])
    assert [harness.fmt(v) for v in (None, float("nan"), 3.14159, 314.159)] == ["-", "n/a", "3.14", "314.2"]
    assert harness.fmt(2.0, ".3f") == "2.000"


def test_line_panels_writes_a_png(tmp_path):
    results = [{"T": t, "E": e, "k": k, "us": {"torch_tc": 1.0 + t / 1e3, "ec_cuda": 2.0 + t / 1e3}}
               for t in (1, 128, 8192) for e in (64, 256) for k in (2, 8)]
    bench_routing.plot(results, tmp_path / "r.png", "TestGPU")
    rows = [dict(n=n, k=k, T=4096, naive_fwd_us=100.0 * n, pruned_fwd_us=10.0 * n, triton_fwd_us=float(n),
                 naive_fwdbwd_us=None, pruned_fwdbwd_us=20.0 * n, triton_fwdbwd_us=2.0 * n,
                 floor_fwd_us=1.0, floor_bwd_us=1.0) for n in (64, 512) for k in (8, 32)]
    bench_omni.plot(rows, tmp_path / "o.png")
    for name in ("r.png", "o.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- arguments


def test_list_parsers_name_the_flag():
    assert harness.int_list("1, 8,32") == [1, 8, 32]
    assert harness.shape_list("512,8,4096;128,8,64", 3) == [(512, 8, 4096), (128, 8, 64)]
    with pytest.raises(Exception, match="--batch-sizes: expected comma-separated integers"):
        harness.int_list("1,x", "--batch-sizes")
    with pytest.raises(Exception, match="--shapes: each shape is 3 positive integers"):
        harness.shape_list("512,8", 3)
    with pytest.raises(Exception, match="--impls: cuda not among naive, pruned, triton"):
        harness.choice_list("triton,cuda", bench_omni.IMPLS, "--impls")


def test_bench_routing_arguments_and_grid(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    args = bench_routing.build_parser().parse_args(["--quick", "--no-paths"])
    assert (args.out, args.quick, args.no_paths, args.no_profile) == ("benchmark/out", True, True, False)
    assert bench_routing.grid(True) == ([1, 32, 128, 1024, 8192], [64, 256])
    t_full, e_full = bench_routing.grid(False)
    assert max(t_full) == 32768 and set(bench_routing.DENSE_GOAL["E"]) <= set(e_full)
    args = bench_routing.build_parser().parse_args(
        ["--t-values", "32768,8192", "--k-values", "8", "--max-seconds", "60"])
    assert bench_routing.grid(args.quick, args.t_values, args.e_values) == ([32768, 8192], e_full)
    assert (args.k_values, args.max_seconds) == ([8], 60.0)
    with pytest.raises(SystemExit):
        bench_routing.build_parser().parse_args(["--e-values", "64,x"])


def test_bench_omni_arguments_and_plan(monkeypatch, capsys):
    monkeypatch.setenv("OUT", "/tmp/omni_out")
    ap = bench_omni.build_parser()
    quick = ap.parse_args(["--quick"])
    assert quick.out == "/tmp/omni_out" and quick.impls == ["naive", "pruned", "triton"]
    assert bench_omni.plan(quick) == ([(512, 8, 4096)], [(512, 8, 4096)])
    full = ap.parse_args(["--variants", "--shapes", "512,8,4096;64,8,128"])
    shapes, vsh = bench_omni.plan(full)
    assert shapes[0] == (512, 8, 4096) and len(shapes) == 36 and vsh == [(512, 8, 4096), (64, 8, 128)]
    assert bench_omni.plan(ap.parse_args([]))[1] is None  # no variants table by default
    with pytest.raises(SystemExit):
        ap.parse_args(["--shapes", "512,8"])
    assert "--shapes: each shape is 3 positive integers" in capsys.readouterr().err


def test_sglang_yardstick_arguments():
    args = sglang_yardstick.build_parser().parse_args(["--check", "--no-fused", "--dir", "/x"])
    assert args.check and args.no_fused and args.dir == "/x" and not args.stage


def test_benchmarks_do_not_import_each_other_in_a_circle():
    mods = {p.stem for p in BENCH.glob("*.py")}
    deps = {}
    for p in BENCH.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
        deps[p.stem] = (found & mods) - {p.stem}
    assert deps["harness"] == set()
    assert "bench_routing" not in deps["sglang_yardstick"]

    def reach(m, seen):
        for d in deps[m]:
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    # train_moe_lm --eval runs eval_routing_quality in-process; both read the data helpers of
    # moe_corpus, so the eval never imports the trainer back
    assert "train_moe_lm" not in reach("eval_routing_quality", set())
    assert [m for m in deps if m in reach(m, set())] == []


# ----------------------------------------------------------------------------- checks vs the reference


def test_routing_comparisons_against_the_reference():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    w, ids = expert_choice_topk_reference(x, RoutingSpec(4, 1.25))
    assert harness.compare_routing(w, ids, w.clone(), ids.clone()) is None
    bad = ids.clone()
    bad[7, 0] = (bad[7, 0] + 1) % 16
    assert "1 of 200 rows differ from the reference, e.g. row 7" in harness.compare_routing(w, bad, w, ids)
    assert "max |dw|" in harness.compare_routing(w + 1e-4, ids, w, ids)

    # token choice: an exact tie may pick either expert, a wrong pick may not
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    ref_w, ref_ids = token_choice_topk_reference(logits, RoutingSpec(2))
    probs = torch.softmax(logits, -1)
    tie = torch.tensor([[0, 2]], dtype=torch.int32) if ref_ids[0, 1] == 1 else torch.tensor([[0, 1]], dtype=torch.int32)
    assert harness.compare_token_choice(ref_w, tie, probs, ref_w, ref_ids) is None
    wrong = torch.tensor([[0, 3]], dtype=torch.int32)
    assert "1 untied ids differ" in harness.compare_token_choice(ref_w, wrong, probs, ref_w, ref_ids)
    dup = torch.tensor([[0, 0]], dtype=torch.int32)
    assert "1 rows repeat an expert" in harness.compare_token_choice(ref_w, dup, probs, ref_w, ref_ids)


def test_bench_routing_checks_real_methods_and_refuses_a_wrong_one():
    """check_methods on the CPU: torch token choice and our Triton EC kernel (interpreter)
    pass against the reference; a method returning a wrong pick fails; ec_ref / ec_dense are
    not checked; a method raising is dropped from the point, not counted as wrong."""
    from sglang_moe_routing.expert_choice.triton_kernel import expert_choice_topk_triton

    torch.manual_seed(0)
    T, E, k = 64, 8, 2
    logits = torch.randn(T, E)

    def wrong():
        w, ids = expert_choice_topk_reference(logits, RoutingSpec(k, bench_routing.CF))
        ids = ids.clone()
        ids[3] = ids[3].flip(0) if ids[3, 0] != ids[3, 1] else ids[3]
        ids[5, 0] = (ids[5, 0] + 1) % E
        return w, ids

    def unsupported():
        raise NotImplementedError("E=8 not compiled")

    methods = {
        "torch_tc": lambda: harness.torch_token_choice(logits, k),
        "ec_dense": lambda: bench_routing.seeds_dense_expert_choice(logits, k),
        "ec_ref": lambda: expert_choice_topk_reference(logits, RoutingSpec(k, bench_routing.CF)),
        "ec_triton": lambda: expert_choice_topk_triton(logits, RoutingSpec(k, bench_routing.CF)),
        "ec_cuda": wrong,
        "ec_cuda_one_launch": unsupported,
    }
    checks = Checks()
    kept = bench_routing.check_methods(checks, methods, logits, k, (T, E, k))
    assert list(kept) == ["torch_tc", "ec_dense", "ec_ref", "ec_triton", "ec_cuda"]
    assert checks.ok(("torch_tc", T, E, k), ("ec_triton", T, E, k))
    assert set(checks.verdicts) == {("torch_tc", T, E, k), ("ec_triton", T, E, k), ("ec_cuda", T, E, k)}
    assert "rows differ from the reference" in checks.failures[("ec_cuda", T, E, k)]

    # the table and the goals refuse every speed-up of the failed kernel at that point
    us = {"torch_tc": 10.0, "ec_dense": 400.0, "ec_ref": 500.0, "ec_triton": 30.0, "ec_cuda": 20.0}
    ok_pt = (8192, 64, 8)
    for name in ("torch_tc", "ec_triton", "ec_cuda"):
        checks.record((name, *ok_pt), None)
    results = [{"T": T, "E": E, "k": k, "us": dict(us)}, {"T": 8192, "E": 64, "k": 8, "us": dict(us)}]
    table, goals = bench_routing.tables(results, checks, paths=())
    bad_row, good_row = table.splitlines()[2], table.splitlines()[3]
    assert bad_row.count(REFUSED + "ec_cuda)") == 5  # CUDA/torch, /sglang, /fused, dense/CUDA, ref/CUDA
    assert "| 3.00 | 16.7 |" in bad_row  # Triton/torchTC and ref/Triton: Triton passed
    assert REFUSED not in good_row and "| 20.0 | 2.00 |" in good_row
    dense = goals["10x_vs_seeds_dense_T>=8192_E64-384_k8"]
    assert (dense["met"], dense["of"], dense["baseline"]) == (1, 1, "ec_dense (seeds_dense_expert_choice)")
    assert goals["no_slower_than_torch_tc"]["missed"][0] == f"T={T},E={E},k={k} (correctness check failed)"


def test_dense_goal_rows_are_the_issue_12_points():
    """>= 10x vs the seeds' algorithm: every T >= 8192, E in {64, 128, 256, 384}, k 8 only."""
    t_vals, e_vals = bench_routing.grid(False)
    pts = [(t, e, k) for t in t_vals for e in e_vals for k in bench_routing.K_VALUES
           if bench_routing.in_dense_goal(t, e, k)]
    assert pts == [(t, e, 8) for t in (8192, 32768) for e in (64, 128, 256, 384)]


def test_omni_forward_check_against_the_reference():
    torch.manual_seed(0)
    x, y = torch.randn(33, 16).to(torch.bfloat16), torch.randn(33, 16).to(torch.bfloat16)
    w, ids = omni_router_pruned_torch(x, y, 8)
    assert omni_variants.check_forward(x, y, 8, w, ids) is None
    bad = ids.clone()
    bad[4, 7] = next(i for i in range(256) if i not in ids[4].tolist())
    assert "1 rows pick other scores than the reference (first: row 4)" == omni_variants.check_forward(x, y, 8, w, bad)
    dup = ids.clone()
    dup[0, 1] = dup[0, 0]
    assert omni_variants.check_forward(x, y, 8, w, dup) == "an expert repeated within a token"
    assert "weights differ" in omni_variants.check_forward(x, y, 8, w * 1.5, ids)


def test_omni_goal_block_refused_when_ours_failed():
    g = dict(naive_fwd_us=5000.0, triton_fwd_us=9.0, triton_bwd_us=5.0, floor_fwd_us=3.0)
    checks = Checks()
    lines = bench_omni.goal_lines(g, checks, steady=(9.5, 4.5, 2.0))
    assert "556x (goal >= 100x) PASS" in lines[1] and "forward / yardstick = 2.11" in lines[5]
    checks.record(("triton", 512, 8, 4096), "3 rows pick other scores")
    lines = bench_omni.goal_lines(g, checks, steady=(9.5, 4.5, 2.0))
    assert all(REFUSED + "triton)" in ln and "PASS" not in ln for ln in lines[1:5])
    assert "forward / yardstick = " + REFUSED in lines[5]


def test_bench_serving_exit_status_follows_its_checks():
    import bench_serving

    b = object.__new__(bench_serving.Bench)
    b.res = {"qwen": {"check": {"ok": True}}, "eplb": {},
             "doge": {"runs": {"64": {"triton": {"check": {"ok": False}}, "torch": {"check": {"ok": True}}}}}}
    assert b.failed_checks() == ["doge n=64 triton"]
    b.res["doge"] = {}
    assert b.failed_checks() == []


def test_eplb_speed_refuses_the_speedup_when_alpha0_differs_from_upstream(monkeypatch, capsys):
    import eplb_speed

    if eplb_speed.upstream_deepseek() is None:
        pytest.skip("needs SGLang's deepseek placement as the reference")
    real = eplb_speed.compute_cost_aware_rebalance_experts

    def off_by_one(tokens, cost, *a):
        out = real(tokens, cost, *a)
        if a[-1] == 0.0 and a[-2]:  # alpha 0, hierarchical: corrupt the placement
            return (out[0].flip(-1),) + tuple(out[1:])
        return out

    monkeypatch.setattr(eplb_speed, "compute_cost_aware_rebalance_experts", off_by_one)
    rows = eplb_speed.speed(repeats=1, goal_ms=1e9)
    out = capsys.readouterr().out
    assert [r["alpha0_equals_deepseek"] for r in rows] == [True, False, True, False]
    table = [ln for ln in out.splitlines() if ln.startswith("| uniform") or ln.startswith("| heavy")]
    assert [REFUSED + "ours)" in ln for ln in table] == [False, True, False, True]
    assert out.count(": PASS") == 1 and out.count(": " + REFUSED + "ours)") == 1


def test_issue_12_fused_goals_cover_their_t_ranges():
    """<= 2x the fused TC kernel at 32 <= T <= 1024 and <= 3x at T = 32768: the points in
    range count, a slow point is missed, a point outside both ranges is not counted."""
    checks = Checks()
    rows = []
    for T, c in ((1, 99.0), (32, 19.0), (1024, 21.0), (8192, 99.0), (32768, 29.0)):
        for name in ("ec_cuda", "fused_tc", "torch_tc"):
            checks.record((name, T, 64, 8), None)
        rows.append({"T": T, "E": 64, "k": 8, "us": {"ec_cuda": c, "fused_tc": 10.0, "torch_tc": 50.0}})
    _, goals = bench_routing.tables(rows, checks, paths=())
    two = goals["within_2x_fused_tc_32<=T<=1024"]
    assert (two["met"], two["of"], two["missed"]) == (1, 2, ["T=1024,E=64,k=8"])
    three = goals["within_3x_fused_tc_T=32768"]
    assert (three["met"], three["of"], three["yardstick"]) == (1, 1, "fused_tc")


def test_issue_12_2x_goal_counts_only_points_where_expert_choice_runs():
    """The default min-tokens (auto: max(32, 4 * E / k)) routes T = 32 at E = 128 (auto 64)
    and T = 128 at E = 384 (auto 192) by token choice: not counted; T = 128 at E = 128 is."""
    assert [bench_routing.ec_runs_from(e, 8) for e in (64, 128, 256, 384)] == [32, 64, 128, 192]
    checks = Checks()
    rows = []
    for T, E in ((32, 128), (128, 384), (128, 128)):
        for name in ("ec_cuda", "fused_tc", "torch_tc"):
            checks.record((name, T, E, 8), None)
        rows.append({"T": T, "E": E, "k": 8, "us": {"ec_cuda": 25.0, "fused_tc": 10.0,
                                                    "torch_tc": 50.0}})
    _, goals = bench_routing.tables(rows, checks, paths=())
    two = goals["within_2x_fused_tc_32<=T<=1024"]
    assert (two["met"], two["of"], two["missed"]) == (0, 1, ["T=128,E=128,k=8"])


def test_pair_bounds_are_the_extreme_run_pairings():
    from harness import pair_bounds

    # baseline times 10, 11; candidate times 10.5, 12 (ms): worst = 10 / 12, best = 11 / 10.5
    assert pair_bounds([10.0, 11.0], [12.0, 10.5]) == (10.0 / 12.0, 11.0 / 10.5)
    assert pair_bounds([10.0], [12.0, 10.5]) is None  # one run is no repetition
    assert pair_bounds([10.0, None, float("nan")], [12.0, 10.5]) is None
    lo, hi = pair_bounds([1.0, 1.0], [1.0, 1.0])
    assert lo == hi == 1.0


def test_pair_verdict_decides_only_when_every_pair_agrees():
    from harness import pair_verdict

    assert pair_verdict((0.98, 1.02), 0.97, "EC/TC", ".3f") == "met (every run pair: EC/TC >= 0.980)"
    assert pair_verdict((0.90, 0.95), 0.97, "x") == "MISSED (every run pair: x <= 0.95 < 0.97)"
    assert pair_verdict((0.96, 0.98), 0.97, "x") is None  # the pairs disagree
    assert pair_verdict(None, 0.97, "x") is None
