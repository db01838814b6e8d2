"""The EPLB simulator: recorder-dump loader and a small end-to-end run."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmark" / "eplb_sim.py"
_spec = importlib.util.spec_from_file_location("eplb_sim", _PATH)
sim = importlib.util.module_from_spec(_spec)
sys.modules["eplb_sim"] = sim
_spec.loader.exec_module(sim)


def _stat_dump(path: Path, lc: torch.Tensor, stamp: float) -> None:
    # what _StatAccumulator.dump(output_mode="file") writes on rank 0
    torch.save(
        dict(rank=0, logical_count=lc, average_utilization_rate_over_window=None),
        path / f"expert_distribution_recorder_{stamp}.pt",
    )


def _per_pass_dumps(path: Path, gpc: torch.Tensor, p2l: torch.Tensor, ranks: int) -> None:
    # what _DetailAccumulator.dump writes: one file per rank; each rank's records hold the
    # physical counts it saw (here: the global count split over ranks)
    parts = torch.stack([gpc // ranks] * (ranks - 1) + [gpc - (ranks - 1) * (gpc // ranks)])
    for rank in range(ranks):
        records = [
            dict(forward_pass_id=100 + i, rank=rank, gatherer_key="primary", global_physical_count=parts[rank, i])
            for i in range(gpc.shape[0])
        ]
        torch.save(dict(records=records, last_physical_to_logical_map=p2l),
                   path / f"expert_distribution_recorder_{1000.0 + rank}_{rank}.pt")


def test_load_stat_mode_file_and_directory(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 50, (4, 3, 8), generator=g, dtype=torch.int32)
    a[2] = 0  # unused slot of the circular buffer
    b = torch.randint(0, 50, (3, 8), generator=g, dtype=torch.int32)  # a [L, E] dump
    _stat_dump(tmp_path, a, 1.5)
    _stat_dump(tmp_path, b, 2.5)
    one = sim.load_expert_distribution_dump(tmp_path / "expert_distribution_recorder_1.5.pt")
    assert one.dtype == torch.float64 and one.shape == (3, 3, 8)
    assert torch.equal(one, a[[0, 1, 3]].double())
    both = sim.load_expert_distribution_dump(tmp_path)
    assert torch.equal(both, torch.cat([a[[0, 1, 3]], b[None]]).double())


def test_load_per_pass_mode_matches_sglang_reader(tmp_path):
    reader = pytest.importorskip("sglang.srt.eplb.eplb_simulator.reader")
    g = torch.Generator().manual_seed(1)
    L, E, R, S = 3, 8, 12, 5
    p2l = torch.stack([torch.cat([torch.randperm(E, generator=g), torch.randint(0, E, (R - E,), generator=g)]) for _ in range(L)])
    gpc = torch.randint(0, 30, (S, L, R), generator=g, dtype=torch.int32)
    _per_pass_dumps(tmp_path, gpc, p2l, ranks=2)
    ours = sim.load_expert_distribution_dump(tmp_path)
    up = reader.read_mode_per_pass(tmp_path)
    expect = reader.convert_global_physical_count_to_logical_count(
        up["global_physical_count_of_forward_pass"], num_layers=L, num_logical_experts=E,
        physical_to_logical_map=up["last_physical_to_logical_map"],
    )
    assert torch.equal(ours, expect.double())
    assert float(ours.sum()) == float(gpc.sum())


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        sim.load_expert_distribution_dump(tmp_path)
    torch.save({"foo": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unknown dump format"):
        sim.load_expert_distribution_dump(tmp_path / "x.pt")
    torch.save(dict(rank=0, logical_count=torch.zeros(2, 3, 4)), tmp_path / "z.pt")
    with pytest.raises(ValueError, match="all recorded counts are zero"):
        sim.load_expert_distribution_dump(tmp_path / "z.pt")


def test_synthetic_trace_shape_skew_and_shift():
    t = sim.synthetic_trace(200, 2, 16, 1000, 4, 1.0, 0.0, 100, 0.0, seed=0)
    assert t.shape == (200, 2, 16)
    assert float(t.sum(-1).mean()) == pytest.approx(4000, rel=0.05)
    before, after = t[:100].sum(0), t[100:].sum(0)
    corr = torch.corrcoef(torch.stack([before[0], after[0]]))[0, 1]
    assert float(corr) < 0.8  # an uncorrelated workload after the shift


def test_small_simulation_gains_on_heterogeneous_and_ties_on_homogeneous():
    trace = sim.synthetic_trace(300, 2, 32, 4096, 4, 1.0, 0.0, None, 0.9, seed=0)
    common = dict(num_gpus=4, num_slots=36, window=100, alphas=[0.0, 1.0], profile_interval=5, noise=0.02,
                  seed=0, progress=False)
    het = sim.summarize(sim.simulate(sim.SCENARIOS["mixed_w4_bf16"], trace, **common))
    assert het["ours a=1"]["balancedness"] > het["deepseek"]["balancedness"] + 0.05
    assert het["ours a=1"]["moe_time_us"] < het["deepseek"]["moe_time_us"]
    hom = sim.simulate(sim.SCENARIOS["homogeneous"], trace, **common)
    for ours, ds in zip(hom["ours a=1"], hom["deepseek"]):
        assert ours["balancedness"] == pytest.approx(ds["balancedness"], abs=1e-3)
    for ours, ds in zip(hom["ours a=0"], hom["deepseek"]):
        assert ours == ds  # alpha = 0 is upstream deepseek


def test_cost_model_gpu_time():
    L, E = 1, 4
    one = torch.ones(L, E, dtype=torch.float64)
    cls = torch.tensor([[0, 1, 0, 1]])
    m = sim.CostModel(a=1 * one, b=torch.tensor([[1.0, 2.0, 1.0, 2.0]]), tile=16 * one, cls=cls, c=10.0, num_classes=2)
    p2l = torch.tensor([[0, 2, 1, 3]])  # GPU0: experts 0, 2 (class 0); GPU1: 1, 3 (class 1)
    n = torch.tensor([[[17.0, 0.0, 16.0, 1.0]]])
    t = m.gpu_time(n, p2l, 2)
    # GPU0: (1 + 2) + 0 + 10 launch; GPU1: (1 + 2) + (1 + 2) + 10
    assert t.tolist() == [[[13.0, 16.0]]]


def test_speed_inputs_are_uniform_and_heavy_tailed():
    inputs = sim.speed_inputs()
    assert list(inputs) == ["uniform", "heavy-tailed"]
    for _, tokens in inputs.values():
        assert tokens.shape == (61, 256) and (tokens >= 0).all()
    peak = {k: float((t.amax(-1) / t.mean(-1)).median()) for k, (_, t) in inputs.items()}
    assert peak["heavy-tailed"] > 1.5 * peak["uniform"]
    assert "max/mean" in sim.describe_load(inputs["uniform"][1])


def test_speed_times_both_loads_and_policies(capsys):
    rows = sim.speed(repeats=1, goal_ms=1e9)
    out = capsys.readouterr().out
    assert [(r["load"], r["hierarchical"]) for r in rows] == [
        ("uniform", False), ("uniform", True), ("heavy-tailed", False), ("heavy-tailed", True)
    ]
    assert all(r["ours_ms"] > 0 and r["ours_alpha0_ms"] > 0 for r in rows)
    assert "randint(0, 20000)" in out and "rand^3 * 1e5" in out and "threads" in out
    assert out.count(": PASS") == 2  # the goal line of each policy
    if sim.upstream_deepseek() is not None:
        assert all(r["alpha0_equals_deepseek"] is True for r in rows)
