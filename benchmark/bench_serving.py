"""Serving benchmark through real SGLang HTTP servers (random weights, fixed seeds).

Parts (``--parts qwen,doge,eplb``), each server configuration started once, all its points
measured while it is up (``tools.server.Server``; checkpoints from ``tools.models``):

* ``qwen``: Qwen3-MoE (``--qwen-size big``: 64 experts, top-8), upstream token choice
  (no plugin) vs expert choice (``--enable-expert-choice --expert-capacity-factor 1.25
  --expert-choice-min-tokens 32``) at batch sizes 1, 8, 32, 128, 512.
* ``doge``: Doge CDMoE with the Omni router, ``--omni-router-backend`` triton / torch /
  reference at n = 64, 256, 512 (n*n experts, top-8), CUDA graphs on.
* ``eplb``: DeepSeek-V3-style model, ``--enable-eplb`` with ``deepseek`` vs ``compute_aware``
  (``--enable-expert-compute-profiling``). SGLang 0.5.23 asserts ep_size > 1 with EPLB, so
  this part needs ``--tp N`` (N >= 2 GPUs) and is skipped otherwise.

Each point: B prompts of ``--prompt-len`` token ids, i.i.d. uniform over [2, vocab) from
``torch.Generator`` seeded by (seed, B, repeat); the same prompts on every server. One warm-up
request, then ``--repeats`` repeats of: t1 = one batch request with max_new_tokens=1 (prefill
tok/s = B * L / t1) and t2 = the same prompts with max_new_tokens=1+N (decode tok/s =
B * N / (t2 - t1), so prefill is excluded); the median over repeats is reported (raw times in
the JSON). Every server runs with ``--disable-radix-cache`` (prefill is real; cached_tokens is
recorded), ``--max-running-requests >= 512`` and ``--max-total-tokens`` sized to the largest
point; Qwen/EPLB servers keep CUDA graphs on (SGLang's default) with
``--cuda-graph-max-bs-decode max(B) --cuda-graph-max-bs-prefill 512``.

Correctness checks (a failed check prints "CHECK FAILED" instead of the ratio):
* EC vs TC: 4 prompts of 16 tokens (< min-tokens, so EC routes as token choice), each sent
  alone, 8 greedy tokens; >= 3 of 4 sequences must be identical (ties may flip one).
* Doge: 4 prompts, 8 greedy tokens, each backend vs the reference backend (else the first one).

A failed check also makes the script exit with status 1 at the end.

Writes bench_serving.{json,md,png} and server_<name>.log to ``--out`` after every server.
How a server is started, paused, measured and stopped is ``serving_runner.py``; this file
holds the parts and the report.
``--max-seconds`` (default 540) stops starting servers whose estimated cost no longer fits.

GPU (one H200; one call per line keeps each under 600 s; start and run times measured: docs/benchmarks.md):
    python benchmark/bench_serving.py --parts qwen --out $OUT/qwen           # 3 servers
    python benchmark/bench_serving.py --parts doge --doge-n 64 --out $OUT/d64    # 3 servers
    python benchmark/bench_serving.py --parts doge --doge-n 256 --out $OUT/d256  # likewise
    python benchmark/bench_serving.py --parts doge --doge-n 512 --out $OUT/d512  # likewise
    python benchmark/bench_serving.py --parts eplb --tp 2 --out $OUT/eplb    # 2 GPUs
CPU smoke:
    python benchmark/bench_serving.py --parts qwen --qwen-size small --batch-sizes 1,8 \\
        --decode-tokens 4 --prompt-len 16 --repeats 1 --out /tmp/bs_cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_runner import (  # noqa: E402
    CHECK_LEN,
    CHECK_MIN_AGREE,
    CHECK_NEW,
    CHECK_PROMPTS,
    NAN,
    ServingRunner,
    build_model,
    device_name,
)

import harness  # noqa: E402
from sglang_moe_routing.tools import models  # noqa: E402
from sglang_moe_routing.tools.server import cuda_available  # noqa: E402



def fmt(x, spec=".1f"):
    """harness.fmt with one decimal by default ("n/a" for NaN: e.g. t(1+N) <= t(1), noise)."""
    return harness.fmt(x, spec)


class Bench(ServingRunner):
    """The three parts (qwen, doge, eplb) and their report, on ``ServingRunner``'s servers."""

    def __init__(self, args):
        super().__init__(args)
        self.res = {"qwen": {}, "doge": {}, "eplb": {}}
        self.meta = {
            "device": device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "sglang": version("sglang"),
            "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
            "prompts": (f"B prompts x {args.prompt_len} token ids, i.i.d. uniform over [2, vocab) "
                        f"(torch.Generator, seed = f({args.seed}, B, repeat)); same prompts on "
                        f"every server; --disable-radix-cache on every server"),
            "timing": (f"warm-up 1, median of {args.repeats}; prefill = B*L/t(max_new=1); decode = "
                       f"B*N/(t(max_new=1+N) - t(max_new=1)), N={args.decode_tokens}"),
        }

    # ------------------------------------------------------------------ parts
    def part_qwen(self):
        a = self.args
        path = Path(a.model_dir) / f"qwen3_moe_{a.qwen_size}"
        cfg = build_model("qwen3_moe", path, size=a.qwen_size)
        vocab = cfg["vocab_size"]
        common = self.common_args(a.batch_sizes)
        ec = ["--enable-expert-choice", "--expert-capacity-factor", str(a.ec_capacity_factor),
              "--expert-choice-min-tokens", str(a.ec_min_tokens)]

        def body(srv, name):
            out = {"check_ids": self.check_ids(srv, vocab, one_by_one=True)}
            out["points"] = self.points(srv, vocab, a.batch_sizes, name)
            out["ec_log_lines"] = sum("routes with expert choice" in ln
                                      for ln in srv.log().splitlines())
            return out

        q = self.res["qwen"]
        experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        q.update(vocab=vocab, batch_sizes=a.batch_sizes,
                 model=f"{a.qwen_size}: {experts} experts, top-{cfg['num_experts_per_tok']}, "
                       f"{cfg['num_hidden_layers']} layers")
        # tc: upstream alone (no plugin); tcp: plugin loaded, expert choice off (a control: it
        # runs the same kernels as tc, so tcp/tc shows what the plugin's presence and the
        # measurement's noise alone do); ec: the flag on
        runs = (("tc", False, common), ("tcp", True, common), ("ec", True, common + ec))
        if a.concurrent_start:
            ec_lines = lambda srv: {"ec_log_lines": sum(  # noqa: E731
                "routes with expert choice" in ln for ln in srv.log().splitlines())}
            got = self.run_group([(f"qwen_{k}", path, extra, plugin) for k, plugin, extra in runs],
                                 vocab, a.batch_sizes, one_by_one=True, extra=ec_lines)
            for key, _, _ in runs:
                q[key] = got[f"qwen_{key}"]
            self.write()
        else:
            for key, plugin, extra in runs:
                q[key] = self.server(f"qwen_{key}", path, extra, body, plugin=plugin)
                self.write()
        tc, ec_r = q.get("tc") or {}, q.get("ec") or {}
        if "check_ids" in tc and "check_ids" in ec_r:
            same = sum(x == y for x, y in zip(tc["check_ids"], ec_r["check_ids"]))
            ok = a.ec_min_tokens > CHECK_LEN and same >= CHECK_MIN_AGREE
            q["check"] = {"equal": same, "of": CHECK_PROMPTS, "ok": ok,
                          "what": f"{CHECK_PROMPTS} prompts x {CHECK_LEN} tokens (< min-tokens "
                                  f"{a.ec_min_tokens}), each alone, {CHECK_NEW} greedy tokens: "
                                  f"EC server == TC server"}
            self.log(f"qwen check: {same}/{CHECK_PROMPTS} greedy sequences identical -> "
                     f"{'ok' if ok else 'CHECK FAILED'}")
        if ec_r and not ec_r.get("error") and not ec_r.get("ec_log_lines"):
            self.note("qwen_ec: the server log has no 'routes with expert choice' line")
        self.write()  # with the check: the ratios are printed only when it passed

    def part_doge(self):
        a = self.args
        try:
            from sglang_moe_routing.integration.omni_hooks import BACKENDS
        except Exception:  # noqa: BLE001
            BACKENDS = ("auto", "triton", "torch", "reference")
        backends = []
        for b in a.doge_backends:
            if b not in BACKENDS:
                self.note(f"doge: backend {b!r} skipped: the server's --omni-router-backend "
                          f"accepts only {', '.join(BACKENDS)}")
            elif b == "triton" and not self.cuda:
                self.note("doge: backend 'triton' skipped: no CUDA device")
            else:
                backends.append(b)
        d = self.res["doge"]
        d.update(backends=backends, batch_sizes=a.doge_batch_sizes, top_k=a.doge_top_k, runs={})
        common = self.common_args(a.doge_batch_sizes)  # CUDA graphs on (folded DMA attention)
        vocabs = {}
        for n in a.doge_n:
            path = Path(a.model_dir) / f"doge_n{n}_k{a.doge_top_k}"
            if time.time() > self.deadline:
                self.note(f"doge n={n}: --max-seconds reached, not built")
                continue
            vocabs[n] = build_model("doge", path, n=n, top_k=a.doge_top_k)["vocab_size"]
        for n, vocab in vocabs.items():
            path = Path(a.model_dir) / f"doge_n{n}_k{a.doge_top_k}"
            runs = d["runs"].setdefault(str(n), {})
            specs = [(f"doge_n{n}_{b}", path, common + ["--omni-router-backend", b], True)
                     for b in backends]
            if a.concurrent_start:
                left, need = self.deadline - time.time(), max(self.group_s, default=0.0)
                if need > left:  # a group cut by the call's time limit would leave nothing
                    self.note(f"doge n={n}: skipped, the last group took {need:.0f} s and "
                              f"{left:.0f} s of --max-seconds are left")
                    continue
                t0 = time.time()
                got = self.run_group(specs, vocab, a.doge_batch_sizes, one_by_one=False)
                self.group_s.append(time.time() - t0)
                runs.update({b: got[f"doge_n{n}_{b}"] for b in backends})
            else:
                for b in backends:
                    name = f"doge_n{n}_{b}"

                    def body(srv, name):
                        return {"check_ids": self.check_ids(srv, vocab, one_by_one=False),
                                "points": self.points(srv, vocab, a.doge_batch_sizes, name)}

                    r = self.server(name, path, common + ["--omni-router-backend", b], body)
                    if r is not None:
                        runs[b] = r
                    self.write()
            base = "reference" if "check_ids" in runs.get("reference", {}) else next(
                (b for b in backends if "check_ids" in runs.get(b, {})), None)
            for b, r in runs.items():
                if b == base:
                    r["check"] = {"vs": base, "equal": CHECK_PROMPTS, "of": CHECK_PROMPTS, "ok": True}
                elif base and "check_ids" in r:
                    same = sum(x == y for x, y in zip(r["check_ids"], runs[base]["check_ids"]))
                    r["check"] = {"vs": base, "equal": same, "of": CHECK_PROMPTS,
                                  "ok": same >= CHECK_MIN_AGREE}
                    self.log(f"doge n={n} check {b} vs {base}: {same}/{CHECK_PROMPTS} equal")
            self.write()  # after every n: a run cut short by the call's limit keeps what it got

    def part_eplb(self):
        a = self.args
        if a.tp < 2:
            self.note("eplb: skipped. SGLang 0.5.23 refuses --enable-eplb with ep_size 1 "
                      "(assert ep_size > 1 in sglang/srt/arg_groups/parallel_hook.py); pass "
                      "--tp N (N >= 2 GPUs) to run deepseek vs compute_aware EPLB.")
            self.res["eplb"] = {"skipped": "needs --tp >= 2"}
            return
        path = Path(a.model_dir) / "deepseek_v3"
        vocab = build_model("deepseek_v3", path)["vocab_size"]
        common = self.common_args(a.eplb_batch_sizes) + [  # as test_gpu_server.py
            "--tp-size", str(a.tp), "--ep-size", str(a.tp), "--disable-shared-experts-fusion",
            "--enable-eplb", "--eplb-rebalance-num-iterations", str(a.eplb_iterations)]
        e = self.res["eplb"]
        e.update(tp=a.tp, batch_sizes=a.eplb_batch_sizes, iterations=a.eplb_iterations)
        # both with the plugin loaded: it leaves upstream's deepseek placement untouched and logs
        # the balancedness before/after every rebalance for either algorithm
        for algo, extra in (
                ("deepseek", ["--eplb-algorithm", "deepseek"]),
                ("compute_aware", ["--eplb-algorithm", "compute_aware",
                                   "--enable-expert-compute-profiling",
                                   "--expert-compute-profiling-warmup-steps", "2",
                                   "--expert-compute-profiling-interval", "2"])):
            name = f"eplb_{algo}"

            def body(srv, name):
                out = {"points": self.points(srv, vocab, a.eplb_batch_sizes, name)}
                lines = srv.log().splitlines()
                for key, pat in (("rebalances", "[EPLBManager] rebalance end"),
                                 ("rebalance_starts", "[EPLBManager] rebalance start"),
                                 ("rebalance_skipped", "Skipped ep rebalancing")):
                    hits = [ln for ln in lines if pat in ln]
                    tp0 = [ln for ln in hits if re.search(r"\bTP0\b", ln)]
                    out[key] = len(tp0 or hits)  # rank 0 where the log names ranks
                bal = [ln for ln in lines if "balancedness (mean/max per GPU" in ln]
                out["last_balancedness"] = bal[-1].split("] ", 1)[-1][:300] if bal else None
                self.log(f"  {name}: {out['rebalances']} rebalances done "
                         f"({out['rebalance_starts']} started, {out['rebalance_skipped']} skipped)")
                return out

            e[algo] = self.server(name, path, common + extra, body)
            self.write()

    # ------------------------------------------------------------------ output
    def failed_checks(self):
        """Names of the correctness checks that failed in this run (their ratios were refused)."""
        bad = ["qwen"] if (self.res["qwen"].get("check") or {}).get("ok") is False else []
        for n, runs in self.res["doge"].get("runs", {}).items():
            bad += [f"doge n={n} {b}" for b, r in runs.items()
                    if (r.get("check") or {}).get("ok") is False]
        return bad

    def tables(self):
        md = []
        q = self.res["qwen"]
        tc, ec = q.get("tc") or {}, q.get("ec") or {}
        if tc.get("points") or ec.get("points"):
            chk = q.get("check")
            ok = bool(chk and chk["ok"])
            md.append(f"### Qwen3-MoE ({q['model']}): token choice (upstream) vs expert choice\n")
            md.append(f"EC routes a forward pass with >= {self.args.ec_min_tokens} tokens by expert "
                      "choice, smaller ones by token choice (--expert-choice-min-tokens): prefill "
                      f"where B * {self.args.prompt_len} >= it, decode where B >= it.\n")
            md.append("check: " + (f"{chk['what']}: {chk['equal']}/{chk['of']} identical -> "
                                   f"{'ok' if ok else 'CHECK FAILED'}" if chk else
                                   "not run (a server failed) -> no ratios") + "\n")
            md.append("TC = upstream SGLang without the plugin; TC+p = plugin loaded, expert "
                      "choice off (same kernels as TC: TC+p/TC shows the plugin's presence plus "
                      "the measurement noise); spread = (max - min) / median of the repeats.\n")
            md.append("| B | phase | TC tok/s | TC+p tok/s | EC tok/s | TC+p/TC | EC/TC | EC/TC+p "
                      "| spread TC, TC+p, EC |")
            md.append("|---:|---|---:|---:|---:|---:|---:|---:|---|")
            byb = lambda r: {p["B"]: p for p in r.get("points", [])}  # noqa: E731
            t, c, e = byb(tc), byb(q.get("tcp") or {}), byb(ec)

            def spread(pt, ph):
                return harness.fmt(harness.spread(pt.get(ph.replace("tok_s", "samples"), [])), ".0%")

            ratio = lambda a, b: fmt(a / b, ".3f") if ok else "CHECK FAILED"  # noqa: E731
            for bs in sorted(set(t) | set(e)):
                for ph in ("prefill_tok_s", "decode_tok_s"):
                    x, z, y = (r.get(bs, {}).get(ph, NAN) for r in (t, c, e))
                    cells = [str(bs), ph.split("_")[0], fmt(x), fmt(z), fmt(y), ratio(z, x),
                             ratio(y, x), ratio(y, z),
                             ", ".join(spread(r.get(bs, {}), ph) for r in (t, c, e))]
                    md.append("| " + " | ".join(cells) + " |")
            md.append("")
        d = self.res["doge"]
        doge_runs = {n: runs for n, runs in d.get("runs", {}).items() if runs}
        rows = []
        for n, runs in doge_runs.items():
            for bs in d["batch_sizes"]:
                for ph in ("decode", "prefill"):
                    v = {b: next((p[ph + "_tok_s"] for p in r.get("points", []) if p["B"] == bs), NAN)
                         for b, r in runs.items()}
                    ok = {b: r.get("check", {}).get("ok", False) for b, r in runs.items()}
                    cells = [n, str(bs), ph] + [fmt(v.get(b, NAN)) for b in d["backends"]]
                    for other in ("reference", "torch"):
                        if "triton" not in runs or other not in runs:
                            cells.append("-")
                        elif not (ok["triton"] and ok[other]):
                            cells.append("CHECK FAILED")
                        else:
                            cells.append(fmt(v["triton"] / v[other], ".2f"))
                    rows.append("| " + " | ".join(cells) + " |")
        if rows:
            md.append(f"### Doge CDMoE, Omni router backends (top-{d['top_k']}, n*n experts, "
                      f"{'CUDA graphs' if self.cuda else 'CPU'}), tok/s\n")
            for n, runs in doge_runs.items():
                md.append(f"- n={n} check ({CHECK_PROMPTS} prompts, {CHECK_NEW} greedy tokens): "
                          + ", ".join(f"{b} (baseline)" if b == r["check"]["vs"] else
                                      f"{b} {r['check']['equal']}/{CHECK_PROMPTS} == {r['check']['vs']}"
                                      + ("" if r["check"]["ok"] else " CHECK FAILED")
                                      for b, r in runs.items() if "check" in r))
            md.append("\n| n | B | phase | " + " | ".join(d["backends"])
                      + " | triton/reference | triton/torch |")
            md.append("|---:|---:|---|" + "---:|" * (len(d["backends"]) + 2))
            md += rows + [""]
        e = self.res["eplb"]
        if any(isinstance(e.get(k), dict) for k in ("deepseek", "compute_aware")):
            md.append(f"### EPLB (deepseek_v3 model, tp=ep={e['tp']}, rebalance every "
                      f"{e['iterations']} iterations)\n")
            md.append("| algorithm | B | prefill tok/s | decode tok/s | rebalances done |")
            md.append("|---|---:|---:|---:|---:|")
            for algo in ("deepseek", "compute_aware"):
                r = e.get(algo) or {}
                for p in r.get("points", []):
                    md.append(f"| {algo} | {p['B']} | {fmt(p['prefill_tok_s'])} | "
                              f"{fmt(p['decode_tok_s'])} | {r.get('rebalances', '-')} |")
            md += [""] + [f"- {algo} last rebalance: {(e.get(algo) or {}).get('last_balancedness')}"
                   for algo in ("deepseek", "compute_aware")] + [""]
        elif e.get("skipped"):
            md.append(f"### EPLB\n\nskipped: {e['skipped']}\n")
        return "\n".join(md)

    def write(self):
        m = self.meta
        servers = [(f"{part} {k}", r) for part in ("qwen", "eplb") for k, r in self.res[part].items()
                   if isinstance(r, dict) and "args" in r]
        servers += [(f"doge n={n} {b}", r) for n, runs in self.res["doge"].get("runs", {}).items()
                    for b, r in runs.items()]
        head = [f"# Serving benchmark\n", f"- device: {m['device']}", f"- date: {m['date']}",
                f"- torch {m['torch']}, sglang {m['sglang']}", f"- command: `{m['command']}`",
                f"- prompts: {m['prompts']}", f"- timing: {m['timing']}", "- servers:"]
        head += [f"  - {k}: start {r.get('start_s', NAN):.0f} s, total {r.get('total_s', NAN):.0f} s, "
                 f"args `{' '.join(r['args'])}`" + (" (upstream, no plugin)" if not r["plugin"] else "")
                 + (" **FAILED**" if r.get("error") else "") for k, r in servers]
        text = "\n".join(head) + "\n\n" + self.tables()
        if self.notes:
            text += "\n### Notes\n\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        (self.out / "bench_serving.md").write_text(text)
        (self.out / "bench_serving.json").write_text(json.dumps(
            {"meta": m, "notes": self.notes, "elapsed_s": time.time() - self.t0, **self.res},
            indent=1, default=str))
        try:
            self.plot()
        except Exception as exc:  # noqa: BLE001
            print(f"plot failed: {exc}")
        return text

    def plot(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        q = self.res["qwen"]
        for key, color in (("tc", "tab:blue"), ("tcp", "tab:cyan"), ("ec", "tab:red")):
            pts = (q.get(key) or {}).get("points", [])
            for ph, style in (("prefill", "-"), ("decode", "--")):
                xs = [p["B"] for p in pts if p[ph + "_tok_s"] == p[ph + "_tok_s"]]
                ys = [p[ph + "_tok_s"] for p in pts if p[ph + "_tok_s"] == p[ph + "_tok_s"]]
                if xs:
                    ax1.plot(xs, ys, style, marker="o", color=color, label=f"{key.upper()} {ph}")
        ax1.set_xscale("log", base=2)
        ax1.set(yscale="log", xlabel="batch size B", ylabel="tokens/s",
                title=f"Qwen3-MoE {q.get('model', '(not run)')}: TC vs EC")
        d = self.res["doge"]
        colors = {"triton": "tab:orange", "torch": "tab:green", "reference": "tab:purple"}
        for bi, bs in enumerate(d.get("batch_sizes", [])):
            for b in d.get("backends", []):
                pts = sorted((int(n), p["decode_tok_s"]) for n, runs in d["runs"].items()
                             for p in runs.get(b, {}).get("points", []) if p["B"] == bs)
                if pts:
                    ax2.plot([p[0] for p in pts], [p[1] for p in pts], ["-", "--", ":", "-."][bi % 4],
                             marker="o", color=colors.get(b), label=f"{b} B={bs}")
        ax2.set_xscale("log", base=2)
        ax2.set(yscale="log", xlabel="n (n*n experts)", ylabel="decode tokens/s",
                title="Doge CDMoE decode: Omni router backend" if d.get("runs") else "Doge (not run)")
        for ax in (ax1, ax2):
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(f"{self.meta['device']}, sglang {self.meta['sglang']} (random weights)",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(self.out / "bench_serving.png", dpi=120)
        plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmark/out")
    ap.add_argument("--parts", default="qwen,doge,eplb", help="comma list of qwen, doge, eplb")
    ap.add_argument("--quick", action="store_true",
                    help="fewer points: B in 1,32,512 and Doge n in 64,512 (unless given)")
    ap.add_argument("--batch-sizes", default=None, help="Qwen batch sizes (default 1,8,32,128,512)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64, help="N decode tokens per point")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qwen-size", default="big", choices=list(models.QWEN3_SIZES))
    ap.add_argument("--ec-capacity-factor", type=float, default=1.25)
    ap.add_argument("--ec-min-tokens", type=int, default=32)
    ap.add_argument("--doge-n", default=None, help="Doge n values (default 64,256,512)")
    ap.add_argument("--doge-backends", default="triton,torch,reference")
    ap.add_argument("--doge-batch-sizes", default=None,
                    help="Doge batch sizes (default 1,128; --batch-sizes when that is given)")
    ap.add_argument("--doge-top-k", type=int, default=8)
    ap.add_argument("--tp", type=int, default=1, help="GPUs for the EPLB part (needs >= 2)")
    ap.add_argument("--eplb-batch-sizes", default="32,128")
    ap.add_argument("--eplb-iterations", type=int, default=50,
                    help="--eplb-rebalance-num-iterations (forward passes between rebalances)")
    ap.add_argument("--max-seconds", type=float, default=540,
                    help="start no server whose estimated cost exceeds the time left (default 540)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="render one md/png from the bench_serving.json files of several runs "
                    "(e.g. one device call per part) into --out; measures nothing")
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--concurrent-start", action=argparse.BooleanOptionalAction, default=None,
                    help="start a part's servers together, measure them one by one while the "
                    "others idle (default: on with CUDA: the servers' start-ups overlap)")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--model-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                        "bench_serving_models"))
    a = ap.parse_args()
    a.batch_sizes_given = a.batch_sizes is not None
    ints = harness.int_list
    try:
        a.batch_sizes = ints(a.batch_sizes or ("1,32,512" if a.quick else "1,8,32,128,512"),
                             "--batch-sizes")
        a.doge_n = ints(a.doge_n or ("64,512" if a.quick else "64,256,512"), "--doge-n")
        a.doge_batch_sizes = ints(a.doge_batch_sizes or (
            ",".join(map(str, a.batch_sizes)) if a.batch_sizes_given else "1,128"),
            "--doge-batch-sizes")
        a.eplb_batch_sizes = ints(a.eplb_batch_sizes, "--eplb-batch-sizes")
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    a.doge_backends = [b for b in a.doge_backends.split(",") if b]
    if a.concurrent_start is None:
        a.concurrent_start = cuda_available()
    parts = [p for p in a.parts.split(",") if p]
    bad = set(parts) - {"qwen", "doge", "eplb"}
    if bad:
        ap.error(f"unknown parts {sorted(bad)}")
    bench = Bench(a)
    if a.merge:
        commands, timings = [], []
        for f in a.merge:
            d = json.loads(Path(f).read_text())
            for part in ("qwen", "doge", "eplb"):
                if d.get(part):
                    bench.res[part] = d[part]
            bench.notes += d.get("notes", [])
            commands.append(d["meta"]["command"])
            timings.append(f"{d['meta']['date']}: {d['meta']['timing']}")
            bench.meta.update({k: d["meta"][k] for k in ("device", "torch", "sglang", "prompts")})
        bench.meta["command"] = "` and `".join(commands)
        bench.meta["date"] = ", ".join(t.split(": ", 1)[0] for t in timings)
        bench.meta["timing"] = " | ".join(timings)
        print(bench.write())
        return
    bench.log(f"device: {bench.meta['device']}; torch {bench.meta['torch']}, sglang "
              f"{bench.meta['sglang']}; parts {parts}; budget {a.max_seconds:.0f} s")
    bench.log(f"prompts: {bench.meta['prompts']}")
    for part in parts:
        getattr(bench, f"part_{part}")()
    text = bench.write()
    print("\n" + text)
    bench.log(f"wrote {bench.out}/bench_serving.{{json,md,png}}")
    bad = bench.failed_checks()
    if bad:
        bench.log(f"exit 1: correctness check failed ({', '.join(bad)}); those ratios read CHECK FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
