"""Compute-aware EPLB vs DeepSeek EPLB vs expert choice on N GPUs of one host (issue 14).

Launches ``python -m sglang.launch_server --tp N --ep-size N`` (``tools.server.Server``) on a
random-weight DeepSeek-V3-style MoE (``tools.models.deepseek_v3``: MLA, sigmoid scoring, grouped
top-k, correction bias, one shared expert) whose correction bias favours a seeded
``--hot-fraction`` of each layer's experts by ``--hot-bias`` (a skewed load), and drives it with
a fixed-seed workload. Runs (``--runs``), all with CUDA graphs on (SGLang's default):

* ``tc``        token choice, no EPLB (static placement)
* ``deepseek``  ``--enable-eplb --eplb-algorithm deepseek``
* ``ca05``      ``--enable-eplb --eplb-algorithm compute_aware --eplb-compute-cost-alpha 0.5``
* ``ca10``      the same at alpha 1.0
* ``ec``        ``--enable-expert-choice``, no EPLB

Every run: ``--moe-runner-backend triton --disable-shared-experts-fusion``, the compute profiler
(``--enable-expert-compute-profiling``, 1 pass in ``--profile-interval`` runs eagerly in every run,
so all runs pay it alike) and ``--expert-moe-time-window`` (each GPU logs its measured MoE time).
Cost modes (``--costs``): ``hetero`` adds ``--expert-cost-slow-factor F`` (a seeded
``--slow-fraction`` of the experts runs as its own fused-MoE launch, F times: see
docs/compute_aware_eplb.md, "Heterogeneous expert cost"), ``homo`` leaves every expert equal.
With ``--tp 1`` the EPLB runs are skipped: SGLang 0.5.23 refuses ``--enable-eplb`` on one GPU.

Workload per run: a probe (``PROBE_N`` prompts, ``PROBE_NEW`` greedy tokens), ``--rounds``
rounds of one batch request of ``--batch`` prompts x ``--prompt-len`` ids (i.i.d. uniform, seed
``--seed`` and the round: the same prompts in every run) with ``--decode`` new tokens each
(ignore_eos), then the probe again. Measured per run:

* throughput: output tokens / wall time over the rounds after ``--warmup-rounds``;
* GPU MoE-time balancedness: per window of ``--moe-time-window`` profiled passes, mean over MoE
  layers of mean/max over GPUs of the measured MoE time (``expert-cost moe-time`` lines);
  reported as the mean over all windows and over the second half of them;
* rebalances: started / done / skipped and upstream's ``time=`` per rebalance (rank 0), and this
  plugin's modelled balancedness before/after each rebalance;
* correctness: no lost request (every output has ``--decode`` tokens), no crash (server alive,
  no traceback in its log), and probe outputs: the first probe (before any rebalance, every run
  on the trivial placement) must be identical across the token-choice runs of a cost mode; the
  last probe is compared with it (placement changes only the order of bf16 sums).

Servers of one cost mode start together (``tools.server.start_all``) and are paused (SIGSTOP)
except the one measured. Writes multi_gpu_eplb.{json,md,png} and server logs to ``--out`` after
every run, progress on stdout. ``--render JSON`` redraws md/png from a recorded JSON.

GPU: the exact device commands are in docs/compute_aware_eplb.md, "Multi-GPU run (issue 14)":
    python benchmark/multi_gpu_eplb.py --tp 2 --costs hetero --out $OUT/mg   # nvidia-h200-x2
    python benchmark/multi_gpu_eplb.py --tp 1 --start-together --out $OUT/dry  # one GPU: tc, ec
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "benchmark"))

from harness import fmt  # noqa: E402
from serving_runner import build_model as build_in_subprocess, device_name, prompts  # noqa: E402
from sglang_moe_routing.eplb.expert_cost import parse_moe_time_lines, window_balancedness  # noqa: E402
from sglang_moe_routing.tools import serverlog  # noqa: E402
from sglang_moe_routing.tools.server import Server, ServerError, start_all  # noqa: E402

RUNS = {
    "tc": [],
    "deepseek": ["--enable-eplb", "--eplb-algorithm", "deepseek"],
    "ca05": ["--enable-eplb", "--eplb-algorithm", "compute_aware", "--eplb-compute-cost-alpha", "0.5"],
    "ca10": ["--enable-eplb", "--eplb-algorithm", "compute_aware", "--eplb-compute-cost-alpha", "1.0"],
    "ec": ["--enable-expert-choice"],
}
EPLB_RUNS = ("deepseek", "ca05", "ca10")
TC_RUNS = ("tc",) + EPLB_RUNS  # token choice: routing independent of placement
COSTS = ("hetero", "homo")
PROBE_N, PROBE_LEN, PROBE_NEW = 8, 16, 16
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# DeepSeek-V3 layout with DeepSeek-V2-Lite's expert shape (64 experts of 2048 -> 1408, top-6 of
# 8 groups), 4 layers (first dense, 3.3 GB in bf16): a prefill chunk of 8192 tokens gives each
# MoE layer milliseconds of GPU work, more than the host needs to launch it. The one-GPU dry run
# of 2026-11-29 with 1024 -> 512 experts and 64-prompt rounds was host-bound (see the docs).
BENCH_MODEL = dict(hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1408,
                   num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                   n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2, help="GPUs: --tp N --ep-size N (default 2)")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--costs", default=",".join(COSTS), help="comma list of hetero, homo")
    ap.add_argument("--model-size", default="bench", choices=("bench", "small"),
                    help="bench: BENCH_MODEL (64 experts of 2048x1408, 4 layers); small: tools.models.DEEPSEEK_V3")
    ap.add_argument("--hot-fraction", type=float, default=0.25, help="hot experts per layer (share)")
    ap.add_argument("--hot-bias", type=float, default=0.3, help="correction-bias addend of hot experts")
    ap.add_argument("--slow-factor", type=int, default=3, help="hetero: slow experts cost F x per token")
    ap.add_argument("--slow-fraction", type=float, default=0.25, help="hetero: slow experts per layer (share)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup-rounds", type=int, default=3, help="rounds not timed (EPLB's first window)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=32, help="new tokens per request")
    ap.add_argument("--rebalance-iterations", type=int, default=150,
                    help="--eplb-rebalance-num-iterations (forward passes between rebalances)")
    ap.add_argument("--redundant-experts", type=int, default=0, help="--ep-num-redundant-experts")
    ap.add_argument("--profile-interval", type=int, default=10,
                    help="--expert-compute-profiling-interval (1 pass in N runs eagerly)")
    ap.add_argument("--moe-time-window", type=int, default=5, help="profiled passes per MoE-time window")
    ap.add_argument("--ec-backend", default="auto", help="--expert-choice-backend of the ec run")
    ap.add_argument("--start-together", action="store_true",
                    help="start the servers of all cost modes at once (default: one cost mode at a time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem-fraction", type=float, default=0.12)
    ap.add_argument("--start-timeout", type=float, default=420)
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--max-seconds", type=float, default=440,
                    help="stop starting rounds/runs past this (a device call is 600 s)")
    ap.add_argument("--out", default="benchmark/out/multi_gpu_eplb")
    ap.add_argument("--model-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "multi_gpu_eplb_models"))
    ap.add_argument("--render", metavar="JSON", nargs="+",
                    help="redraw md/png into --out from recorded JSONs (several: their cost modes merged, "
                    "e.g. one device call per cost mode); measures nothing")
    a = ap.parse_args(argv)
    a.runs = [r for r in a.runs.split(",") if r]
    a.costs = [c for c in a.costs.split(",") if c]
    bad = [r for r in a.runs if r not in RUNS] + [c for c in a.costs if c not in COSTS]
    if bad:
        ap.error(f"unknown --runs/--costs value(s) {bad}: runs are {', '.join(RUNS)}, costs {', '.join(COSTS)}")
    for name, v, lo in (("--tp", a.tp, 1), ("--rounds", a.rounds, 1), ("--batch", a.batch, 1),
                        ("--prompt-len", a.prompt_len, 1), ("--decode", a.decode, 1),
                        ("--slow-factor", a.slow_factor, 1), ("--profile-interval", a.profile_interval, 1),
                        ("--moe-time-window", a.moe_time_window, 1), ("--warmup-rounds", a.warmup_rounds, 0),
                        ("--redundant-experts", a.redundant_experts, 0)):
        if v < lo:
            ap.error(f"{name} must be >= {lo}, got {v}")
    if a.warmup_rounds >= a.rounds:
        ap.error(f"--warmup-rounds ({a.warmup_rounds}) must be < --rounds ({a.rounds})")
    for name, v in (("--hot-fraction", a.hot_fraction), ("--slow-fraction", a.slow_fraction)):
        if not 0.0 <= v <= 1.0:
            ap.error(f"{name} must be in [0, 1], got {v}")
    if a.redundant_experts % a.tp:
        ap.error(f"--redundant-experts ({a.redundant_experts}) must be a multiple of --tp ({a.tp})")
    return a


def server_args(a: argparse.Namespace, run: str, cost: str) -> List[str]:
    """launch_server flags of one run (plus Server's own: model, port, triton attention, mem)."""
    kv = max(65536, a.batch * (a.prompt_len + a.decode + 16))
    args = ["--tp-size", str(a.tp), "--ep-size", str(a.tp), "--moe-runner-backend", "triton",
            "--disable-shared-experts-fusion", "--disable-radix-cache",
            "--max-running-requests", str(max(a.batch, PROBE_N)), "--max-total-tokens", str(kv),
            "--cuda-graph-max-bs-decode", str(max(a.batch, PROBE_N)),
            "--enable-expert-compute-profiling", "--expert-compute-profiling-warmup-steps", "10",
            "--expert-compute-profiling-interval", str(a.profile_interval),
            "--expert-moe-time-window", str(a.moe_time_window)]
    args += RUNS[run]
    if run == "ec" and a.ec_backend != "auto":
        args += ["--expert-choice-backend", a.ec_backend]
    if run in EPLB_RUNS:
        args += ["--eplb-rebalance-num-iterations", str(a.rebalance_iterations)]
        if a.redundant_experts:
            args += ["--ep-num-redundant-experts", str(a.redundant_experts)]
    if cost == "hetero":
        args += ["--expert-cost-slow-factor", str(a.slow_factor),
                 "--expert-cost-slow-fraction", str(a.slow_fraction), "--expert-cost-seed", str(a.seed)]
    return args


def planned_runs(a: argparse.Namespace) -> List[str]:
    return [r for r in a.runs if not (a.tp < 2 and r in EPLB_RUNS)]


def build_model(a: argparse.Namespace) -> Dict:
    """tools.models.deepseek_v3 in a subprocess (this process must hold no CUDA context)."""
    kw = dict(hot_fraction=a.hot_fraction, hot_bias=a.hot_bias, seed=a.seed)
    if a.model_size == "bench":
        kw.update(BENCH_MODEL)
    path = Path(a.model_dir) / f"ds_{a.model_size}_hot{a.hot_fraction:g}_{a.hot_bias:g}_s{a.seed}"
    cfg = build_in_subprocess("deepseek_v3", path, **kw)
    return {"path": str(path), "vocab": cfg["vocab_size"], "config": {k: cfg.get(k) for k in (
        "hidden_size", "moe_intermediate_size", "num_hidden_layers", "first_k_dense_replace",
        "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "n_shared_experts")}, **kw}


# ----------------------------------------------------------------------------- analysis


def analyse_log(text: str, num_gpus: int) -> Dict:
    """Everything a run's server log tells: rebalances, modelled balancedness lines, measured
    MoE-time windows and their balancedness, errors."""
    windows = parse_moe_time_lines(text)
    bal = window_balancedness(windows, num_gpus)
    series = [bal[w] for w in sorted(bal)]
    half = series[len(series) // 2:]
    return {
        "rebalances": serverlog.rebalances(text),
        "balancedness_lines": serverlog.balancedness_lines(text),
        "moe_windows": len(windows),
        "moe_balancedness_series": series,
        "moe_balancedness_mean": statistics.fmean(series) if series else None,
        "moe_balancedness_last_half": statistics.fmean(half) if half else None,
        "errors": serverlog.errors(text),
    }


def probe_checks(runs: Dict[str, Dict]) -> Dict:
    """First probes of the token-choice runs identical; last vs first probe per run."""
    tc = {r: d["probe_first"] for r, d in runs.items() if r in TC_RUNS and d.get("probe_first")}
    ref = next(iter(tc.values()), None)
    same_first = {r: sum(x == y for x, y in zip(p, ref)) for r, p in tc.items()} if ref else {}
    last_vs_first = {r: sum(x == y for x, y in zip(d["probe_last"], d["probe_first"]))
                     for r, d in runs.items() if d.get("probe_first") and d.get("probe_last")}
    return {"first_probe_equal_tc": same_first, "last_vs_first_equal": last_vs_first, "of": PROBE_N,
            "ok": bool(same_first) and all(v == PROBE_N for v in same_first.values())}


def table(res: Dict) -> str:
    m = res["meta"]
    md = [f"# Multi-GPU EPLB run (issue 14)\n", f"- device: {m['device']}", f"- date: {m['date']}",
          f"- command: `{m['command']}`", f"- model: {m['model']}", f"- workload: {m['workload']}", ""]
    for cost, runs in res["costs"].items():
        if not runs:
            continue
        chk = probe_checks(runs)
        base = (runs.get("deepseek") or {}).get("throughput_tok_s")
        md.append(f"## cost mode: {cost}" + (f" (slow experts x{m['slow_factor']}, {m['slow_fraction']:g} of "
                                               "each layer)" if cost == "hetero" else " (all experts equal)") + "\n")
        md.append("| run | tok/s | vs deepseek | GPU MoE-time balancedness mean / 2nd half (windows) "
                  "| modelled after last rebalance | rebalances done/started/skipped | rebalance s mean/max "
                  "| lost req. | crash | last probe == first |")
        md.append("|---|---:|---:|---|---|---|---|---:|---|---:|")
        for run, d in runs.items():
            if d.get("error") and d.get("throughput_tok_s") is None:
                md.append(f"| {run} | FAILED: {d['error'][:120]} | | | | | | | | |")
                continue
            tp = d.get("throughput_tok_s")
            rb = d.get("rebalances") or {}
            dur = rb.get("durations_s") or []
            last = (d.get("balancedness_lines") or [{}])[-1].get("after", {})
            md.append(
                f"| {run} | {fmt(tp, '.0f')} | {fmt(tp / base if tp and base else None, '.3f')} | "
                f"{fmt(d.get('moe_balancedness_mean'), '.3f')} / {fmt(d.get('moe_balancedness_last_half'), '.3f')} "
                f"({d.get('moe_windows', 0)}) | {' '.join(f'{k}={v:.3f}' for k, v in last.items()) or '-'} | "
                f"{rb.get('done', 0)}/{rb.get('started', 0)}/{rb.get('skipped', 0)} | "
                f"{fmt(statistics.fmean(dur) if dur else None, '.2f')}/{fmt(max(dur) if dur else None, '.2f')} | "
                f"{d.get('lost_requests', 'n/a')} | {'yes' if d.get('crashed') else 'no'} | "
                f"{chk['last_vs_first_equal'].get(run, 'n/a')}/{PROBE_N} |")
        md.append("")
        md.append(f"First probe identical across token-choice runs: {chk['first_probe_equal_tc']} of {PROBE_N} "
                  f"-> {'ok' if chk['ok'] else 'CHECK FAILED'}\n")
    if res.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(md)


def plot(res: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    costs = [c for c, r in res["costs"].items() if r]
    names = list(dict.fromkeys(r for c in costs for r in res["costs"][c]))
    width = 0.8 / max(1, len(costs))
    for i, cost in enumerate(costs):
        ys = [(res["costs"][cost].get(n) or {}).get("throughput_tok_s") or 0 for n in names]
        ax1.bar([j + i * width for j in range(len(names))], ys, width, label=cost)
        for n in names:
            s = (res["costs"][cost].get(n) or {}).get("moe_balancedness_series") or []
            if s:
                ax2.plot(range(len(s)), s, "-" if cost == "hetero" else "--", marker=".", label=f"{n} {cost}")
    ax1.set_xticks([j + width * (len(costs) - 1) / 2 for j in range(len(names))], names)
    ax1.set(ylabel="output tokens/s", title="throughput")
    ax2.set(xlabel=f"window ({res['meta']['moe_time_window']} profiled passes)", ylabel="mean/max GPU MoE time",
            title="measured GPU MoE-time balancedness", ylim=(0, 1.05))
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{res['meta']['device']} (random weights)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: Dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "multi_gpu_eplb.json").write_text(json.dumps(res, indent=1, default=str))
    text = table(res)
    (out / "multi_gpu_eplb.md").write_text(text)
    try:
        plot(res, out / "multi_gpu_eplb.png")
    except Exception as exc:  # noqa: BLE001
        print(f"plot failed: {exc}", flush=True)
    return text


# ----------------------------------------------------------------------------- running


def merge(results: List[Dict]) -> Dict:
    """One result from several recorded ones: cost modes with runs are taken from each (a later
    file wins), notes concatenated, commands and dates joined."""
    out = json.loads(json.dumps(results[0]))
    for r in results[1:]:
        out["costs"].update({c: runs for c, runs in r["costs"].items() if runs})
        out["notes"] += r.get("notes", [])
    if len(results) > 1:
        out["meta"]["command"] = "` and `".join(r["meta"]["command"] for r in results)
        out["meta"]["date"] = ", ".join(r["meta"]["date"] for r in results)
    return out


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.out = Path(a.out)
        self.t0 = time.time()
        self.deadline = self.t0 + a.max_seconds
        self.res = {"meta": {}, "costs": {c: {} for c in a.costs}, "notes": []}

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def note(self, msg: str) -> None:
        self.log(msg)
        self.res["notes"].append(msg)

    def generate(self, srv: Server, ids: List[List[int]], new: int):
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": new, "temperature": 0.0,
                                                      "ignore_eos": True}}
        out = srv.post("/generate", body, timeout=self.a.request_timeout)
        return [o["output_ids"] for o in (out if isinstance(out, list) else [out])]

    def measure(self, srv: Server, name: str, vocab: int) -> Dict:
        a = self.a
        d: Dict = {"rounds": []}
        probe = prompts(vocab, PROBE_N, PROBE_LEN, a.seed + 99)
        d["probe_first"] = self.generate(srv, probe, PROBE_NEW)
        lost, tokens, secs = 0, 0, 0.0
        for r in range(a.rounds):
            if time.time() > self.deadline:
                self.note(f"{name}: --max-seconds reached after {r} rounds")
                break
            ids = prompts(vocab, a.batch, a.prompt_len, a.seed * 1000 + r)
            t = time.perf_counter()
            try:
                outs = self.generate(srv, ids, a.decode)
            except Exception as exc:  # noqa: BLE001  (a failed request is a lost request)
                outs = []
                d.setdefault("request_errors", []).append(str(exc)[:300])
            dt = time.perf_counter() - t
            bad = a.batch - sum(len(o) == a.decode for o in outs)
            lost += bad
            got = sum(len(o) for o in outs)
            d["rounds"].append({"s": dt, "tokens": got, "lost": bad})
            if r >= a.warmup_rounds:
                tokens, secs = tokens + got, secs + dt
            self.log(f"  {name} round {r + 1}/{a.rounds}: {got / dt:9.0f} tok/s{' (warm-up)' if r < a.warmup_rounds else ''}"
                     + (f"  LOST {bad}" if bad else ""))
        d["probe_last"] = self.generate(srv, probe, PROBE_NEW)
        d["lost_requests"] = lost
        d["throughput_tok_s"] = tokens / secs if secs else None
        return d

    def run_group(self, costs: List[str], model: Dict) -> None:
        """Start the servers of ``costs`` x runs together, then measure them one at a time
        (the others paused)."""
        a = self.a
        keys = [(c, r) for c in costs for r in planned_runs(a)]
        servers = {(c, r): Server(model["path"], server_args(a, r, c), log_path=str(self.out / f"server_{c}_{r}.log"),
                                  env=NO_MULTICAST, timeout_s=a.start_timeout, mem_fraction=a.mem_fraction)
                   for c, r in keys}
        self.log(f"starting {len(servers)} servers together: {', '.join(f'{c}/{r}' for c, r in keys)}")
        errors = start_all(list(servers.values()))
        for srv in servers.values():
            srv.pause()
        self.log("up: " + ", ".join(f"{c}/{r} {s.start_s:.0f} s" if e is None else f"{c}/{r} FAILED"
                                    for ((c, r), s), e in zip(servers.items(), errors)))
        for ((cost, run), srv), err in zip(servers.items(), errors):
            d: Dict = {"args": server_args(a, run, cost), "log": Path(srv.log_path).name}
            try:
                if err:
                    raise ServerError(err)
                if time.time() > self.deadline:
                    raise ServerError("--max-seconds reached before this run")
                srv.resume()
                self.log(f"[{cost}] {run}: measuring")
                d.update(self.measure(srv, f"{cost}/{run}", model["vocab"]))
            except Exception as exc:  # noqa: BLE001
                d["error"] = str(exc)[-3000:]
                self.note(f"{cost}/{run} FAILED: {str(exc)[:300]}")
            finally:
                d["alive_at_end"] = srv.alive()
                srv.stop()
            d.update(analyse_log(srv.log(), a.tp))
            d["crashed"] = not d["alive_at_end"] or bool(d["errors"])
            rb = d["rebalances"]
            self.log(f"[{cost}] {run}: {fmt(d.get('throughput_tok_s'), '.0f')} tok/s, MoE balancedness "
                     f"{fmt(d['moe_balancedness_mean'], '.3f')} ({d['moe_windows']} windows), rebalances "
                     f"{rb['done']}/{rb['started']} (skipped {rb['skipped']}), lost {d.get('lost_requests')}, "
                     f"errors {len(d['errors'])}")
            self.res["costs"][cost][run] = d
            write(self.res, self.out)

    def main(self) -> None:
        a = self.a
        self.out.mkdir(parents=True, exist_ok=True)
        model = build_model(a)
        self.res["meta"] = {
            "device": device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable)] + sys.argv), "tp": a.tp,
            "model": (f"deepseek_v3 {a.model_size} {model['config']}, hot experts: {a.hot_fraction:g} of each "
                      f"layer, correction bias +{a.hot_bias:g} (seed {a.seed})"),
            "workload": (f"{a.rounds} rounds (first {a.warmup_rounds} untimed) of {a.batch} prompts x "
                         f"{a.prompt_len} ids (uniform, seed {a.seed}), {a.decode} new tokens; rebalance every "
                         f"{a.rebalance_iterations} passes; profiling 1 pass in {a.profile_interval}"),
            "slow_factor": a.slow_factor, "slow_fraction": a.slow_fraction, "moe_time_window": a.moe_time_window,
        }
        skipped = [r for r in a.runs if r not in planned_runs(a)]
        if skipped:
            self.note(f"runs {skipped} skipped: SGLang 0.5.23 refuses --enable-eplb with ep_size 1 "
                      "(assert ep_size > 1); they need --tp >= 2")
        self.log(f"device {self.res['meta']['device']}; tp=ep={a.tp}; runs {planned_runs(a)}; costs {a.costs}")
        for group in ([a.costs] if a.start_together else [[c] for c in a.costs]):
            if time.time() > self.deadline:
                self.note(f"cost mode(s) {group} not run: --max-seconds reached")
                continue
            self.run_group(group, model)
        print("\n" + write(self.res, self.out), flush=True)
        self.log(f"wrote {self.out}/multi_gpu_eplb.{{json,md,png}}")


def main(argv: Optional[List[str]] = None) -> None:
    a = parse_args(argv)
    if a.render:
        print(write(merge([json.loads(Path(f).read_text()) for f in a.render]), Path(a.out)))
        return
    Bench(a).main()


if __name__ == "__main__":
    main()
