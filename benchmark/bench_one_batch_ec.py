"""Expert choice vs token choice through SGLang's own ``bench_one_batch`` (issue 9's 3% goal).

Each run is one subprocess of ``sglang.benchmark.one_batch`` (a ModelRunner in-process, no
HTTP server, CUDA graphs as SGLang's defaults, a static batch per point): the plugin is
loaded first (``load_plugins()``; one_batch does not call it), the input ids are seeded
(``np.random.seed`` + ``--random-seed``: every run gets the same prompts), and one_batch
appends one JSON line per point to its ``--result-filename``. Runs, in this order:

    (TC, EC, EC, TC) x --repeats, then UP
    TC: plugin loaded, expert choice off       EC: + --enable-expert-choice
    UP: upstream alone (SGLANG_PLUGINS=__none__, no load_plugins): a control for TC
    ECIDLE (only through --order): EC on with --expert-choice-min-tokens 10^9, so it routes
        nothing and captures TC's graphs: what an EC process costs beyond its routing (its
        host time is in the host table; the verdicts compare TC and EC only)

so drift over the call hits TC and EC alike. Every run measures the batch sizes ``--passes``
times (``--batch-size 1 8 ... 1 8 ...``); the first pass is discarded when there are two or
more (one_batch warms up only the first batch size), the rest give the median per point.
Per run and point: prefill latency (one extend of B x --input-len tokens) and one_batch's
median decode-step latency (over --output-len - 1 steps).

Checks (a failed one refuses every EC/TC ratio, as ``harness.Checks`` does, exit status 1):
the run exited 0 and wrote every point; its log shows the plugin's CLI flags were there
(TC, EC) or absent (UP); EC runs log "expert choice routes X of Y MoE (TopK) layers" with
X > 0, TC and UP runs log no such line.

Verdicts per B and phase (tokens per forward pass: prefill B x L, decode B; EC routes a pass
by token choice below --expert-choice-min-tokens, resolved for the model as the plugin does:
``auto`` = max(32, 4 * E / k)), on device time when every TC and EC run has it (CUDA events
around the graph segments, ``one_batch_timing.py``: the work EC adds to the device, with the
run-to-run host noise left out), else on the wall clock; both tables are written. The device
time does not bound the wall-clock cost: in one call, EC processes spent ~20-27 us more host
time per decode step even where their graphs equal TC's, less than the host drifted within
that call (docs/benchmarks.md, "Late-night runs"); the host table below follows it up:
* tokens >= min-tokens: "met" when EC/TC throughput >= --goal (0.97), judged only when the
  TC-vs-TC spread ((max - min) / median of the TC runs) is below --noise-limit (1%). Above that
  limit a point is still decided when every pairing of a TC run with an EC run agrees
  (``harness.pair_bounds``: the fastest TC run against the slowest EC run >= --goal: "met
  (every run pair)"; the slowest TC against the fastest EC < --goal: "MISSED (every run
  pair)"), else "noise floor too high".
* tokens < min-tokens (same kernels on both sides): "nothing measurable" when |EC/TC - 1| is
  within the noise floor (the larger of the TC-vs-TC and EC-vs-EC spreads, itself below
  --noise-limit).
The goal rows are B >= 32 (both phases) and the decode rows below min-tokens.

Writes bench_one_batch_ec.{json,md,png} and run_<i>_<label>.{log,jsonl,gpu.jsonl} to --out
($OUT); the plot shows EC/TC by B with the goal line.

GPU (one H200; the ``onebatch`` stage of benchmark/gpu_serving_session.sh), 4 layers of
Qwen3-30B-A3B's shapes (128 experts, where expert choice touches more experts than token
choice at small batches):
    python3 benchmark/bench_one_batch_ec.py --qwen-size a3b --passes 2 --order tc,ec,ec,tc \
        --batch-sizes 1,8,32,64,128,512 --max-seconds 320
CPU smoke (tiny model, ~1 min a run):
    python benchmark/bench_one_batch_ec.py --qwen-size small --batch-sizes 1,8,32 \\
        --input-len 16 --output-len 4 --repeats 1 --no-upstream --out /tmp/ob_cpu
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import one_batch_runner as obr  # noqa: E402
from harness import (  # noqa: E402,F401 (spread: the tests')
    Checks, fmt, md_table, pair_bounds, pair_verdict, spread)
from one_batch_runner import CHILD, parse_jsonl, write_tokenizer  # noqa: E402,F401 (the tests)

NAME = "bench_one_batch_ec"
KINDS = {"tc": "TC (plugin, EC off)", "ec": "EC", "up": "upstream (no plugin)",
         "ecidle": "EC on with --expert-choice-min-tokens 10^9 (routes nothing: TC's graphs)"}
IDLE_MIN_TOKENS = 10 ** 9

COVERAGE_RE = re.compile(r"expert choice routes (\d+) of (\d+) MoE \(TopK\) layers")
LAYER_RE = re.compile(r"layer \S+ routes with expert choice")


# ----------------------------------------------------------------------------- plan


def run_order(repeats: int, upstream: bool, order: Optional[str] = None) -> List[Dict[str, str]]:
    """``[{"label", "kind"}]``: (TC, EC, EC, TC) x ``repeats``, then the upstream control; or
    the kinds of ``order`` ("tc,ec,up") as given."""
    if order:
        kinds = [k.strip() for k in order.split(",") if k.strip()]
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"--order: {bad or 'nothing'} not among {', '.join(KINDS)}")
    elif repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    else:
        kinds = ["tc", "ec", "ec", "tc"] * repeats + (["up"] if upstream else [])
    seen: Dict[str, int] = {}
    out = []
    for k in kinds:
        seen[k] = seen.get(k, 0) + 1
        out.append({"label": f"{k}{seen[k]}", "kind": k})
    return out


def one_batch_argv(model: str, tokenizer: str, batch_sizes: Sequence[int], passes: int,
                   input_len: int, output_len: int, result: str, seed: int, kind: str,
                   ec_args: Sequence[str], device_args: Sequence[str],
                   extra: Sequence[str]) -> List[str]:
    """one_batch's arguments for one run (``ec_args`` only for kind ``ec``)."""
    return obr.one_batch_argv(model, tokenizer, batch_sizes, passes, input_len, output_len,
                              result, seed, kind, list(device_args)
                              + (list(ec_args) if kind == "ec" else []) + list(extra))


def resolved_min_tokens(value: str, num_experts: int, top_k: int) -> int:
    """The plugin's own reading of ``--expert-choice-min-tokens value`` for a layer."""
    from sglang_moe_routing.integration.expert_choice_flags import config_from_values

    return config_from_values(True, None, value, environ={}).min_tokens_for(num_experts, top_k)


# ----------------------------------------------------------------------------- parsing


def parse_log(text: str) -> Dict[str, object]:
    """What a run's log proves: ``plugin_flags`` (True/False/None: the child's marker line),
    ``coverage`` ([X, Y] from "expert choice routes X of Y MoE (TopK) layers", or None),
    ``ec_layer_lines`` (count of "layer N routes with expert choice" lines)."""
    cov = COVERAGE_RE.findall(text)
    return {"plugin_flags": obr.parse_flags(text),
            "coverage": [int(cov[-1][0]), int(cov[-1][1])] if cov else None,
            "ec_layer_lines": len(LAYER_RE.findall(text))}


def run_failure(kind: str, rc: Optional[int], log: Dict[str, object], points: Dict[int, dict],
                batch_sizes: Sequence[int]) -> Optional[str]:
    """None when the run is usable, else a one-line reason (expert choice silently off, the
    plugin missing where it should be, a crash, points missing)."""
    if rc != 0:
        return f"exit status {rc}"
    missing = obr.missing_points(points, batch_sizes)
    if missing:
        return missing
    flags, cov = log["plugin_flags"], log["coverage"]
    if flags is None:
        return "no 'ONEBATCH plugin_flags=' line in the log"
    if kind in ("tc", "ec", "ecidle") and not flags:
        return "the plugin did not load (its CLI flags are absent)"
    if kind == "up" and flags:
        return "the plugin loaded in the upstream run (SGLANG_PLUGINS=__none__ ignored?)"
    if kind in ("ec", "ecidle"):
        if cov is None:
            return "expert choice was OFF: no 'expert choice routes X of Y' line"
        if cov[0] == 0:
            return f"expert choice was OFF: it routes 0 of {cov[1]} MoE layers"
        if kind == "ecidle" and log["ec_layer_lines"]:
            return "expert choice routed a pass in an ecidle run (min-tokens 10^9 not applied?)"
    elif cov is not None or log["ec_layer_lines"]:
        return f"expert choice was ON in a {kind} run (coverage {cov})"
    return None


# ----------------------------------------------------------------------------- analysis


def verdict(ratio: Optional[float], tc_spread: Optional[float], ec_spread: Optional[float],
            tokens: int, min_tokens: int, goal: float, noise_limit: float,
            bounds: Optional[tuple] = None) -> str:
    """The per-point verdict (see the module docstring). ``bounds``: ``harness.pair_bounds``
    of the TC and EC runs (worst, best EC/TC over every run pair), which decide a point
    above min-tokens whose noise floor is too high when every pair agrees."""
    if ratio is None:
        return "n/a"
    if tc_spread is None:
        return "not judged: needs >= 2 TC runs (noise floor)"
    if tokens < min_tokens:
        floor = max(tc_spread, ec_spread or 0.0)
        if floor >= noise_limit:
            return f"noise floor too high ({floor:.1%})"
        if abs(ratio - 1.0) <= floor:
            return "nothing measurable"
        return f"MEASURABLE: |EC/TC - 1| = {abs(ratio - 1):.1%} > noise {floor:.1%}"
    if tc_spread >= noise_limit:
        return (pair_verdict(bounds, goal, "EC/TC", ".3f")
                or f"noise floor too high (TC-vs-TC {tc_spread:.1%})")
    return "met" if ratio >= goal else f"MISSED (EC/TC {ratio:.3f} < {goal})"


def analyse(runs: Sequence[dict], batch_sizes: Sequence[int], input_len: int, min_tokens: int,
            goal: float = 0.97, noise_limit: float = 0.01, goal_min_batch: int = 32,
            measure: str = "latency") -> dict:
    """Rows per (B, phase) from ``runs`` ([{"label", "kind", "failure", "points"}]) and the
    overall goal verdict. Ratios are throughputs (EC/TC = TC time / EC time) of the medians
    over the runs of each kind; refused when any TC or EC run failed. ``measure``: "latency"
    (one_batch's wall clock) or "gpu" (device time, ``one_batch_timing``)."""
    checks = Checks()
    for r in runs:
        checks.record(r["label"], r.get("failure"))
    tc_ec = [r["label"] for r in runs if r["kind"] in ("tc", "ec")]
    up = [r["label"] for r in runs if r["kind"] == "up"]
    refusal = checks.refusal(*tc_ec)
    rows = []
    for b in batch_sizes:
        for phase in ("prefill", "decode"):
            key = f"{phase}_{measure}"
            lat = {k: [r["points"][b][key] for r in runs
                       if r["kind"] == k and not r.get("failure") and b in r.get("points", {})
                       and r["points"][b].get(key) is not None]
                   for k in KINDS}
            med = {k: statistics.median(v) if v else None for k, v in lat.items()}
            tokens = b * input_len if phase == "prefill" else b
            ratio = None
            if not refusal and med["tc"] and med["ec"] and lat["tc"] and lat["ec"]:
                ratio = med["tc"] / med["ec"]
            tcs, ecs = spread(lat["tc"]), spread(lat["ec"])
            goal_row = b >= goal_min_batch or (phase == "decode" and tokens < min_tokens)
            rows.append({
                "B": b, "phase": phase, "tokens": tokens, "ec_routes": tokens >= min_tokens,
                "latency_s": lat, "median_s": med, "ec_over_tc": ratio,
                "ec_over_tc_text": refusal or (fmt(ratio, ".3f") if ratio else "-"),
                "tc_spread": tcs, "ec_spread": ecs,
                "tc_over_up": (med["up"] / med["tc"]) if (med["up"] and med["tc"]
                                                          and not checks.refusal(*up)) else None,
                "goal_row": goal_row,
                "verdict": refusal or verdict(ratio, tcs, ecs, tokens, min_tokens, goal,
                                              noise_limit, pair_bounds(lat["tc"], lat["ec"]))})
    judged = [r["verdict"] for r in rows if r["goal_row"]]
    if refusal:
        overall = refusal
    elif any(v.startswith(("MISSED", "MEASURABLE")) for v in judged):
        overall = "MISSED"
    elif judged and all(v.startswith("met") or v == "nothing measurable" for v in judged):
        overall = "met"
    else:
        overall = "not judged (noise floor too high or too few runs at some goal rows)"
    return {"rows": rows, "overall": overall, "checks": checks.to_json(),
            "exit_code": checks.exit_code(), "measure": measure}


MEASURES = {
    "gpu": ("device time per pass (one_batch_timing.py: CUDA events around each CUDA-graph "
            "segment -- decode is one graph; a prefill of up to 8192 tokens is a breakable "
            "graph whose eager attention between segments is left out -- or around the eager "
            "forward of larger prefills): the work EC adds to the device. The wall-clock step "
            "can carry more: host time also differs between processes (docs/benchmarks.md, "
            "Late-night runs)"),
    "latency": "one_batch's wall clock (perf_counter around each synchronised step)",
}


def judged(runs: Sequence[dict], batch_sizes: Sequence[int], input_len: int, min_tokens: int,
           goal: float, noise_limit: float) -> dict:
    """:func:`analyse` on device time where every run has it (the verdict), with the wall
    clock beside it (``other``); on the wall clock alone otherwise."""
    wall = analyse(runs, batch_sizes, input_len, min_tokens, goal, noise_limit)
    if not obr.has_device_time([r for r in runs if r["kind"] in ("tc", "ec")]):
        return {**wall, "measure_name": "wall clock", "other": None}
    gpu = analyse(runs, batch_sizes, input_len, min_tokens, goal, noise_limit, measure="gpu")
    return {**gpu, "measure_name": "device time", "other": wall}


# ----------------------------------------------------------------------------- report


def _ms(xs):
    return ", ".join(fmt(x * 1e3, ".2f") for x in xs) if xs else "-"


def _pct(x):
    return "-" if x is None else f"{x:.2%}"


def markdown(meta: dict, runs: Sequence[dict], result: dict) -> str:
    head = obr.report_head(
        "EC vs TC through SGLang bench_one_batch", meta, runs,
        lambda r: (f" (EC on {r['log']['coverage'][0]}/{r['log']['coverage'][1]} layers)"
                   if r["kind"] == "ec" and (r.get("log") or {}).get("coverage") else "")) + [
            f"\n**Goal (EC costs <= {1 - meta['goal']:.0%} at B >= 32, nothing measurable "
            f"below min-tokens), judged on {result['measure_name']}: {result['overall']}**\n",
            "Times in ms, one value per run (TC runs, then EC runs, in run order). "
            "EC/TC = throughput ratio of the medians; spread = (max - min) / median over the "
            "runs of one configuration (TC-vs-TC is the noise floor); TC/UP = plugin loaded "
            "with EC off vs upstream.\n"]
    tables = [(result, True)] + ([(result["other"], False)] if result.get("other") else [])
    body = []
    for res, is_judged in tables:
        body.append(f"### {'Judged' if is_judged else 'Shown, not judged'}: "
                    f"{MEASURES[res['measure']]}\n")
        body.append(_table(res) + "\n")
    cols = [(k.upper(), [r for r in runs if r["kind"] == k]) for k in KINDS
            if any(r["kind"] == k for r in runs)]
    rows = obr.host_table(sorted({r["B"] for r in result["rows"]}), cols)
    if rows:
        body.append(f"### Shown, not judged: {obr.HOST_NOTE}\n")
        body.append(md_table(obr.host_header([c[0] for c in cols]), rows) + "\n")
    return "\n".join(h for h in head if h) + "\n" + "\n".join(body)


def _table(result: dict) -> str:
    rows = [[r["B"], r["phase"], r["tokens"], "EC" if r["ec_routes"] else "TC (< min)",
             _ms(r["latency_s"]["tc"]), _ms(r["latency_s"]["ec"]), _ms(r["latency_s"]["up"]),
             r["ec_over_tc_text"], _pct(r["tc_spread"]), _pct(r["ec_spread"]),
             fmt(r["tc_over_up"], ".3f") if r["tc_over_up"] else "-",
             ("**" + r["verdict"] + "**") if r["goal_row"] else r["verdict"] + " (not a goal row)"]
            for r in result["rows"]]
    return md_table(["B", "phase", "tokens/pass", "EC routes", "TC ms", "EC ms", "UP ms",
                     "EC/TC", "TC-vs-TC", "EC-vs-EC", "TC/UP", "verdict"], rows)


def plot(runs: Sequence[dict], batch_sizes: Sequence[int], path: Path, title: str,
         result: Optional[dict] = None, goal: float = 0.97, min_tokens: int = 32) -> None:
    """EC/TC throughput vs B per phase (device time solid, wall clock dashed) with the goal
    line, when ``result`` has ratios; else the latencies of every run."""
    tables = [t for t in ([result, (result or {}).get("other")]) if t]
    if not any(r["ec_over_tc"] for t in tables for r in t["rows"]):
        colors = {"tc": "tab:blue", "ec": "tab:red", "up": "tab:gray", "ecidle": "tab:orange"}
        obr.plot_latency(runs, batch_sizes, path, title,
                         lambda r: ("o-" if r["kind"] != "up" else "s--", colors[r["kind"]]))
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, phase in zip(axes, ("prefill", "decode")):
        for t in tables:
            pts = [(r["B"], r["ec_over_tc"]) for r in t["rows"]
                   if r["phase"] == phase and r["ec_over_tc"]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts],
                        "o-" if t["measure"] == "gpu" else "s--",
                        label="device time" if t["measure"] == "gpu" else "wall clock")
        ax.axhline(goal, color="tab:red", lw=0.8, ls=":", label=f"goal {goal}")
        ax.axhline(1.0, color="gray", lw=0.5)
        if phase == "decode":
            ax.axvline(min_tokens, color="gray", lw=0.8, ls="-.",
                       label=f"min-tokens {min_tokens}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{phase}: EC/TC throughput")
        ax.set_xlabel("batch size B")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("EC / TC (1 = no cost)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- running


class Bench(obr.Runner):
    NAME = NAME

    def __init__(self, args):
        super().__init__(args, flag_dest="enable_expert_choice")
        self.meta.update(goal=args.goal, noise_limit=args.noise_limit)
        self.min_tokens = 32  # resolved for the model in main(), before the first write()

    def one(self, i: int, spec: dict, model: str, tok: str) -> dict:
        a, kind = self.a, spec["kind"]
        ec = ["--enable-expert-choice", "--expert-capacity-factor", str(a.ec_capacity_factor),
              "--expert-choice-min-tokens", str(a.ec_min_tokens)]
        if kind == "ecidle":  # EC on, routing nothing: the same graphs as TC's
            ec[-1] = str(IDLE_MIN_TOKENS)
        # --mem-fraction-static 0.8: room beside the KV pool for the activations of the largest
        # prefill (a3b at B = 512 allocates 4 GiB blocks; at SGLang's default fraction it ran
        # out of memory: docs/benchmarks.md, "Night runs")
        args = (self.device_args(["--mem-fraction-static", "0.8"])
                + (ec if kind in ("ec", "ecidle") else [])
                + list(a.extra_args))
        return self.checked_run(
            i, spec, model, tok, args, parse_log,
            lambda rc, log, pts: run_failure(kind, rc, log, pts, a.batch_sizes),
            lambda log: f"EC coverage {log['coverage']}, plugin flags {log['plugin_flags']}",
            plugin=kind != "up")

    def main(self) -> int:
        a = self.a
        if a.rejudge:
            self.rejudge(a.rejudge)
            m = re.search(r"\(= (\d+) tokens", self.meta.get("model", ""))
            self.min_tokens = int(self.meta.get("min_tokens") or (m and m.group(1)) or 32)
            return self.finish(lambda r: f"goal: {r['overall']}")
        mdir = Path(a.model_dir)
        model = mdir / f"qwen3_moe_{a.qwen_size}"
        kw = {"size": a.qwen_size}
        if not self.cuda:
            kw["dtype"] = "float32"
        if a.qwen_size == "small":  # one_batch's random ids are < 10000
            kw["vocab_size"] = 10000
        cfg = obr.build_checkpoint("qwen3_moe", model, kw)
        tok = write_tokenizer(mdir / "tokenizer")
        n_exp = int(cfg.get("num_experts", cfg.get("num_local_experts")))
        top_k = int(cfg.get("num_experts_per_tok"))
        self.min_tokens = resolved_min_tokens(a.ec_min_tokens, n_exp, top_k)
        self.meta["min_tokens"] = self.min_tokens
        self.meta["model"] = (f"Qwen3-MoE {a.qwen_size}: {n_exp} experts, top-{top_k}, "
                              f"{cfg.get('num_hidden_layers')} layers, random weights; EC = "
                              f"--expert-capacity-factor {a.ec_capacity_factor} "
                              f"--expert-choice-min-tokens {a.ec_min_tokens} (= "
                              f"{self.min_tokens} tokens for this model)")
        plan = run_order(a.repeats, a.upstream, a.order)
        self.run_plan(plan, lambda i, spec: self.one(i, spec, str(model), tok),
                      lambda spec: KINDS[spec["kind"]])
        return self.finish(lambda r: f"goal: {r['overall']}")

    def write(self) -> dict:
        a = self.a
        result = judged(self.runs, a.batch_sizes, a.input_len, self.min_tokens, a.goal,
                        a.noise_limit)
        title = f"{self.meta['device']}: TC vs EC, sglang bench_one_batch"
        return self.save(result, markdown(self.meta, self.runs, result),
                         lambda path: plot(self.runs, a.batch_sizes, path, title, result,
                                           a.goal, self.min_tokens))


def parse_args(argv=None):
    from sglang_moe_routing.tools import models

    ap = harness.base_parser(__doc__)
    obr.add_common_args(ap, "1,8,32,64,128,512", input_len=256, output_len=64, max_seconds=540)
    ap.add_argument("--order", default=None,
                    help="the runs' kinds in order, e.g. tc,ec,up (instead of --repeats/--upstream)")
    ap.add_argument("--upstream", action=argparse.BooleanOptionalAction, default=True,
                    help="end with an upstream-only control run (SGLANG_PLUGINS=__none__)")
    ap.add_argument("--qwen-size", default="a3b", choices=list(models.QWEN3_SIZES),
                    help="a3b: 4 layers of Qwen3-30B-A3B's shapes (GPU-bound decode); big: "
                         "8 small layers, 64 experts; small: the CPU smoke's")
    ap.add_argument("--ec-capacity-factor", type=float, default=1.25)
    ap.add_argument("--ec-min-tokens", default="auto",
                    help="--expert-choice-min-tokens of the EC runs: an integer or auto (the "
                         "plugin's default)")
    ap.add_argument("--goal", type=float, default=0.97, help="EC/TC throughput at least this")
    ap.add_argument("--noise-limit", type=float, default=0.01,
                    help="judge a point only when the TC-vs-TC spread is below this")
    a = ap.parse_args(argv)
    obr.check_common_args(ap, a)
    try:
        resolved_min_tokens(a.ec_min_tokens, 64, 8)
    except ValueError as exc:
        ap.error(f"--ec-min-tokens: {exc}")
    try:
        run_order(a.repeats, a.upstream, a.order)
    except ValueError as exc:
        ap.error(str(exc))
    return a


if __name__ == "__main__":
    sys.exit(Bench(parse_args()).main())
