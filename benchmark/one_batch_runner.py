"""The machinery shared by the drivers of SGLang's ``bench_one_batch`` (``sglang.benchmark.one_batch``):
bench_one_batch_ec.py (EC vs TC, Qwen3-MoE) and bench_one_batch_doge.py (Omni router backends,
Doge). Each run is one subprocess: the child seeds numpy (every run gets the same prompts),
loads the plugin when asked (one_batch does not call ``load_plugins()``), prints a marker line
saying whether the plugin's CLI flag ``ONEBATCH_FLAG_DEST`` exists, on CUDA installs the
device-time probes of ``one_batch_timing.py`` (``run_<i>_<label>.gpu.jsonl``), then runs
one_batch's own CLI, which appends one JSON line per point to ``--result-filename``.

Here: the child, the argv, the JSONL parsing (first pass discarded), the checkpoint build in a
subprocess, and :class:`Runner` (device arguments, child environment, one run with its log,
the ``--max-seconds`` budget that skips runs the last run's time says will not fit, progress
lines with elapsed seconds).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import one_batch_timing  # noqa: E402

# The child: seed, plugins, proof of the plugin's presence, then one_batch's own CLI.
CHILD = r"""
import json, os, sys, argparse
import numpy as np
np.random.seed(int(os.environ["ONEBATCH_SEED"]))
if os.environ["ONEBATCH_PLUGIN"] == "1":
    from sglang.srt.plugins import load_plugins
    load_plugins()
from sglang.srt.server_args import ServerArgs
p = argparse.ArgumentParser()
ServerArgs.add_cli_args(p)
dest = os.environ.get("ONEBATCH_FLAG_DEST", "enable_expert_choice")
has = any(a.dest == dest for a in p._actions)
print("ONEBATCH plugin_flags=" + ("yes" if has else "no"), flush=True)
if os.environ.get("ONEBATCH_GPU_TIME_FILE"):
    try:  # device times are extra: one_batch's own numbers still come without them
        sys.path.insert(0, os.environ["ONEBATCH_BENCH_DIR"])
        import one_batch_timing
        one_batch_timing.install(os.environ["ONEBATCH_GPU_TIME_FILE"])
        print("ONEBATCH gpu_time=on", flush=True)
    except Exception as exc:
        print(f"ONEBATCH gpu_time=off ({type(exc).__name__}: {exc})", flush=True)
sys.argv = ["sglang.benchmark.one_batch"] + json.loads(os.environ["ONEBATCH_ARGV"])
from sglang.benchmark.one_batch import cli_main
cli_main()
"""

FLAGS_RE = re.compile(r"^ONEBATCH plugin_flags=(yes|no)\s*$", re.M)


def parse_flags(text: str) -> Optional[bool]:
    """The child's marker: True (the plugin's flag exists), False, or None (no marker line)."""
    flags = FLAGS_RE.findall(text)
    return (flags[-1] == "yes") if flags else None


def one_batch_argv(model: str, tokenizer: str, batch_sizes: Sequence[int], passes: int,
                   input_len: int, output_len: int, result: str, seed: int, run_name: str,
                   args: Sequence[str]) -> List[str]:
    """one_batch's arguments: every batch size ``passes`` times, then ``args``."""
    return ["--model-path", model, "--tokenizer-path", tokenizer,
            "--batch-size", *[str(b) for b in list(batch_sizes) * passes],
            "--input-len", str(input_len), "--output-len", str(output_len),
            "--result-filename", result, "--random-seed", str(seed),
            "--run-name", run_name] + list(args)


def parse_jsonl(text: str, batch_sizes: Sequence[int], passes: int) -> Dict[int, dict]:
    """one_batch's result lines -> ``{B: {"prefill_latency", "decode_latency", "samples"}}``
    (seconds; median over the passes after the first when ``passes`` >= 2). A B with fewer
    than ``passes`` records is left out (the run did not finish it)."""
    out = {}
    records = one_batch_timing.json_lines(text)
    for b, used in one_batch_timing.counted_passes(records, batch_sizes, passes).items():
        pre = [float(r["prefill_latency"]) for r in used]
        dec = [float(r["median_decode_latency"]) for r in used if "median_decode_latency" in r]
        out[b] = {"prefill_latency": statistics.median(pre),
                  "decode_latency": statistics.median(dec) if dec else None,
                  "samples": {"prefill": pre, "decode": dec}}
    return out


def missing_points(points: Dict[int, dict], batch_sizes: Sequence[int]) -> Optional[str]:
    missing = [b for b in batch_sizes if b not in points]
    return f"no result for B={missing}" if missing else None


def has_device_time(runs: Sequence[dict]) -> bool:
    """Every run that passed its checks has device times (``one_batch_timing``) for both
    phases at every point it measured."""
    used = [r for r in runs if not r.get("failure")]
    return bool(used) and all(p.get("decode_gpu") is not None and p.get("prefill_gpu") is not None
                              for r in used for p in r["points"].values())


def report_head(title: str, meta: dict, runs: Sequence[dict],
                run_note: Callable[[dict], str] = lambda r: "") -> List[str]:
    """The report's title and the lines every driver starts with: device, date, versions,
    command, model, timing, the runs in order (a failure in bold, then ``run_note(run)``) and
    the runs the budget skipped (an empty string when none)."""
    from harness import fmt

    return [f"# {title}\n",
            f"- device: {meta['device']}", f"- date: {meta['date']}",
            f"- torch {meta['torch']}, sglang {meta['sglang']}",
            f"- command: `{meta['command']}`", f"- model: {meta['model']}",
            f"- per point: {meta['timing']}",
            "- runs (in order): " + ", ".join(
                f"{r['label']} {fmt(r.get('wall_s'), '.0f')} s"
                + (f" **FAILED: {r['failure']}**" if r.get("failure") else "") + run_note(r)
                for r in runs),
            f"- skipped: {', '.join(meta['skipped'])}" if meta.get("skipped") else "",
            f"- re-judged: {meta['rejudged']}" if meta.get("rejudged") else ""]


PHASES = ("prefill", "decode")


def host_table(batch_sizes: Sequence[int], columns: Sequence[tuple], lead: Sequence = ()) -> List[list]:
    """Rows of the host-time table, one per (B, phase) where a column has that phase's host
    time: each column's host time per run (ms, ``<phase>_host`` of ``one_batch_timing.parse``:
    ``time.perf_counter`` around ``ModelRunner.forward``, a prefill's steps summed), then each
    later column's median minus the first's (us), first for that host time, then for its
    on-CPU part (``<phase>_host_cpu``, ``time.thread_time``), then each column's CUDA-graph
    segments per step (``<phase>_segments``: the distinct counts of its runs, "-" where not
    recorded; one "-" where no column has them). ``columns``: ``[(name, runs)]``; ``lead``:
    cells put before B (e.g. Doge's n)."""
    from harness import fmt

    def used(runs, b):
        return [r["points"][b] for r in runs
                if not r.get("failure") and b in (r.get("points") or {})]

    def values(runs, b, key):
        return [p[key] * 1e3 for p in used(runs, b) if p.get(key) is not None]

    def median(v):
        return statistics.median(v) if v else None

    def diffs(meds):
        return [fmt((m - meds[0]) * 1e3, "+.0f") if m is not None and meds[0] is not None
                else "-" for m in meds[1:]]

    def segments(runs, b, key):
        return "/".join(str(x) for x in sorted({p[key] for p in used(runs, b)
                                                if p.get(key) is not None})) or "-"

    rows = []
    for b in batch_sizes:
        for phase in PHASES:
            vals = [values(runs, b, f"{phase}_host") for _, runs in columns]
            if not any(vals):
                continue
            med = [median(v) for v in vals]
            cmed = [median(values(runs, b, f"{phase}_host_cpu")) for _, runs in columns]
            segs = [segments(runs, b, f"{phase}_segments") for _, runs in columns]
            rows.append(list(lead) + [b, phase]
                        + [", ".join(f"{x:.3f}" for x in v) or "-" for v in vals]
                        + diffs(med) + diffs(cmed)
                        + [", ".join(f"{n} {s}" for (n, _), s in zip(columns, segs))
                           if any(s != "-" for s in segs) else "-"])
    return rows


def host_header(names: Sequence[str], lead: Sequence[str] = ()) -> List[str]:
    return (list(lead) + ["B", "phase"] + [f"{n} host ms per step (runs)" for n in names]
            + [f"{n} - {names[0]} (us)" for n in names[1:]]
            + [f"{n} - {names[0]} on CPU (us)" for n in names[1:]]
            + ["graph segments per step"])


HOST_NOTE = ("host time of each prefill and decode step's `ModelRunner.forward` call "
             "(`time.perf_counter` around the call; a prefill's calls summed) and its on-CPU "
             "part (`time.thread_time`: host time above it was spent descheduled, e.g. by "
             "other load on the machine). A CUDA-graph segment's replay is asynchronous, so "
             "this is the host's work, not device time: in a prefill that replays a breakable "
             "graph, the eager attention between its segments is launched from the host and "
             "counts here as host launch work; a prefill above the captured sizes runs eagerly "
             "(every kernel launched from the host). one_batch's wall-clock latencies also "
             "hold the work outside this call (batch preparation, sampling, the "
             "synchronisation). \"graph segments per step\": the most CUDA-graph segments a "
             "step of that phase replayed, per column (its runs' distinct counts; 0: no graph "
             "replayed; -: not recorded, e.g. by older runs), so a mode that adds graph "
             "breaks shows. Not judged: it shows whether a mode costs host time where its "
             "graphs cost nothing")


def write_tokenizer(path: Path) -> str:
    """A one-word tokenizer: one_batch loads a tokenizer though it feeds token ids."""
    if not (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer, models as tok_models
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(tok_models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(path))
    return str(path)


def build_checkpoint(kind: str, path: Path, kw: dict) -> dict:
    """``tools.models.build(kind, ...)`` in a subprocess (this process holds no CUDA context
    while the runs measure); ``kw["dtype"]`` by name (it crosses as JSON)."""
    if (path / "config.json").exists():
        return json.loads((path / "config.json").read_text())
    code = ("import sys, json, torch; from sglang_moe_routing.tools import models; "
            "kw = json.loads(sys.argv[3]); kw['dtype'] = getattr(torch, kw.get('dtype', 'bfloat16')); "
            "models.build(sys.argv[1], sys.argv[2], **kw)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "python")] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    subprocess.run([sys.executable, "-c", code, kind, str(path), json.dumps(kw)], check=True,
                   env=env)
    return json.loads((path / "config.json").read_text())


def plot_latency(runs: Sequence[dict], batch_sizes: Sequence[int], path: Path, title: str,
                 style: Callable[[dict], tuple]) -> None:
    """Prefill and decode latency vs B, one line per run that passed its checks;
    ``style(run)`` -> (matplotlib format, color)."""
    import harness

    panels = []
    for phase in ("prefill", "decode"):
        lines = []
        for r in runs:
            pts = [(b, r["points"][b][phase + "_latency"] * 1e3) for b in batch_sizes
                   if r["points"].get(b, {}).get(phase + "_latency")]
            if pts and not r.get("failure"):
                lines.append((r["label"], [p[0] for p in pts], [p[1] for p in pts], *style(r)))
        panels.append({"title": f"{phase} latency", "xlabel": "batch size B", "lines": lines})
    harness.line_panels(panels, path, suptitle=title, ylabel="ms", sharey=False, legend="panel")


class Runner:
    """One benchmark's runs: ``self.runs`` grows by :meth:`run_plan`; subclasses give
    ``write()`` (the report so far, called after every run)."""

    NAME = "bench_one_batch"

    def __init__(self, args, flag_dest: str):
        from importlib.metadata import version

        import torch
        from serving_runner import device_name
        from sglang_moe_routing.tools.server import cuda_available

        self.a = args
        self.flag_dest = flag_dest
        self.t0 = time.time()
        self.deadline = self.t0 + args.max_seconds
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cuda = cuda_available()
        self.meta = {"device": device_name(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "torch": torch.__version__, "sglang": version("sglang"),
                     "command": shlex.join(["python3"] + sys.argv), "skipped": [],
                     "timing": (f"B x {args.input_len} seeded random ids (seed {args.seed}), "
                                f"{args.output_len} output tokens; {args.passes} passes over the "
                                f"batch sizes per run" + (", the first discarded"
                                                          if args.passes > 1 else ""))}
        self.runs: List[dict] = []

    def log(self, msg: str) -> None:
        print(f"[{self.NAME} +{time.time() - self.t0:5.0f} s] {msg}", flush=True)

    def device_args(self, cuda_defaults: Sequence[str] = ()) -> List[str]:
        """``--attention-backend triton`` (+ ``cuda_defaults``) on CUDA; SGLang's CPU paths
        otherwise. A flag given in ``--extra-args`` wins."""
        given = " ".join(self.a.extra_args)
        if self.cuda:
            pairs = [("--attention-backend", "triton")] + list(zip(cuda_defaults[::2],
                                                                   cuda_defaults[1::2]))
        else:
            pairs = [("--device", "cpu"), ("--attention-backend", "torch_native"),
                     ("--dtype", "float32"), ("--max-total-tokens", "8192")]
        return [x for flag, v in pairs if flag not in given for x in (flag, v)]

    def env(self, plugin: bool) -> Dict[str, str]:
        env = {**os.environ, "ONEBATCH_SEED": str(self.a.seed),
               "ONEBATCH_PLUGIN": "1" if plugin else "0", "ONEBATCH_FLAG_DEST": self.flag_dest}
        env.setdefault("SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND", "python")
        paths = [str(REPO / "python")] + [p for p in [env.get("PYTHONPATH")] if p]
        if not self.cuda:  # SGLang's RoPE imports vllm._custom_ops off CUDA (never calls it)
            from sglang_moe_routing.tools.server import _cpu_shim

            paths.insert(0, _cpu_shim(str(self.out / "cpu_shim")))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if not plugin:
            env["SGLANG_PLUGINS"] = "__none__"
        return env

    def run_child(self, i: int, label: str, model: str, tok: str, args: Sequence[str],
                  plugin: bool = True) -> dict:
        """One one_batch subprocess (``args`` after the common ones); its log is
        ``run_<i>_<label>.log``. ``{"args", "rc", "wall_s", "text", "points"}``."""
        a = self.a
        stem = self.out / f"run_{i}_{label}"
        result = Path(str(stem) + ".jsonl")
        result.unlink(missing_ok=True)
        argv = one_batch_argv(model, tok, a.batch_sizes, a.passes, a.input_len, a.output_len,
                              str(result), a.seed, label, args)
        env = self.env(plugin)
        env["ONEBATCH_ARGV"] = json.dumps(argv)
        gpu_file = Path(str(stem) + ".gpu.jsonl")
        gpu_file.unlink(missing_ok=True)
        if self.cuda:
            env.update({one_batch_timing.ENV: str(gpu_file), "ONEBATCH_BENCH_DIR": str(HERE)})
        t0 = time.time()
        with open(str(stem) + ".log", "w") as logf:
            try:
                rc = subprocess.run([sys.executable, "-c", CHILD], env=env, stdout=logf,
                                    stderr=subprocess.STDOUT,
                                    timeout=max(self.deadline - time.time(), 1)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout (--max-seconds)"
        text = Path(str(stem) + ".log").read_text(errors="replace")
        points = parse_jsonl(result.read_text(), a.batch_sizes, a.passes) if result.exists() else {}
        if gpu_file.exists():
            gpu = one_batch_timing.parse(gpu_file.read_text(), a.batch_sizes, a.passes)
            for b, p in points.items():
                p.update(gpu.get(b, {}))
        return {"args": argv, "rc": rc, "wall_s": time.time() - t0, "text": text,
                "points": points}

    def checked_run(self, i: int, spec: dict, model: str, tok: str, args: Sequence[str],
                    parse: Callable[[str], dict], failure: Callable[[object, dict, dict],
                                                                     Optional[str]],
                    note: Callable[[dict], str], plugin: bool = True) -> dict:
        """:meth:`run_child`, then ``log = parse(text)`` and ``failure(rc, log, points)``;
        a progress line with ``note(log)`` and the decode latencies."""
        got = self.run_child(i, spec["label"], model, tok, args, plugin)
        text, rc = got.pop("text"), got["rc"]
        log = parse(text)
        run = {**spec, **got, "log": log}
        run["failure"] = failure(rc, log, got["points"])
        if run["failure"] and rc != 0:
            run["log_tail"] = text[-3000:]
        self.log(f"{spec['label']}: {'FAILED: ' + run['failure'] if run['failure'] else 'ok'} "
                 f"in {run['wall_s']:.0f} s; {note(log)}; decode ms "
                 + " ".join(f"B{b}={(p['decode_latency'] or 0) * 1e3:.3f}"
                            for b, p in got["points"].items()))
        return run

    def save(self, result: dict, text: str, plot: Callable[[Path], None]) -> dict:
        """``<NAME>.md`` (``text``), ``<NAME>.json`` (meta, runs, result), ``plot(<NAME>.png)``."""
        (self.out / f"{self.NAME}.md").write_text(text)
        (self.out / f"{self.NAME}.json").write_text(json.dumps(
            {"meta": self.meta, "elapsed_s": time.time() - self.t0, "runs": self.runs,
             "result": result}, indent=1, default=str))
        try:
            plot(self.out / f"{self.NAME}.png")
        except Exception as exc:  # noqa: BLE001
            self.log(f"plot failed: {exc}")
        result["markdown"] = text
        return result

    def rejudge(self, path: str) -> None:
        """``--rejudge``: take the meta and runs of a saved ``<NAME>.json`` instead of running
        (no new measurement), so that ``write()`` judges them by this version's rules into
        --out. The batch sizes and --input-len come from the saved runs and meta."""
        try:
            saved = json.loads(Path(path).read_text())
            runs = saved["runs"]
            self.runs = [dict(r, points={int(b): p for b, p in (r.get("points") or {}).items()})
                         for r in runs]
            meta = saved["meta"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SystemExit(f"error: --rejudge {path}: not a saved {self.NAME}.json report "
                             f"({type(exc).__name__}: {exc})") from None
        self.meta = dict(meta, rejudged=(
            f"{self.meta['date']}: the saved runs of {Path(path).name} judged again by "
            f"`{self.meta['command']}` (no new measurement)"))
        self.a.batch_sizes = sorted({b for r in self.runs for b in r["points"]})
        m = re.search(r"B x (\d+) ", self.meta.get("timing", ""))
        if m:
            self.a.input_len = int(m.group(1))
        self.log(f"re-judging {len(self.runs)} saved runs of {path}")

    def finish(self, goals: str) -> int:
        """The final report on stdout; the exit status (1 when a check failed)."""
        result = self.write()
        print("\n" + result["markdown"], flush=True)
        self.log(f"{goals(result)}; wrote {self.out}/{self.NAME}.{{json,md,png}}")
        return result["exit_code"]

    def run_plan(self, plan: Sequence[dict], one: Callable[[int, dict], dict],
                 what: Callable[[dict], str]) -> None:
        """``one(i, spec)`` for each run of ``plan`` that fits the budget (a run is skipped
        when 1.1 x the last run's time is more than what is left); ``write()`` after each."""
        self.log(f"{self.meta['device']}; plan {[p['label'] for p in plan]}; budget "
                 f"{self.a.max_seconds:.0f} s")
        for i, spec in enumerate(plan):
            left = self.deadline - time.time()
            last = max((r["wall_s"] for r in self.runs), default=0.0)
            if last * 1.1 > left:
                self.meta["skipped"].append(f"{spec['label']} (last run took {last:.0f} s, "
                                            f"{left:.0f} s left of --max-seconds)")
                self.log(f"{spec['label']}: skipped, {left:.0f} s left, the last run took "
                         f"{last:.0f} s")
                continue
            self.log(f"{spec['label']}: starting ({what(spec)})")
            self.runs.append(one(i, spec))
            self.write()

    def write(self) -> dict:  # pragma: no cover (abstract)
        raise NotImplementedError


def add_common_args(ap, batch_sizes: str, input_len: int, output_len: int, max_seconds: float):
    """The arguments every one_batch driver takes."""
    import harness

    ap.add_argument("--batch-sizes", type=lambda s: harness.int_list(s, "--batch-sizes"),
                    default=harness.int_list(batch_sizes))
    ap.add_argument("--input-len", type=int, default=input_len)
    ap.add_argument("--output-len", type=int, default=output_len,
                    help="decode steps + 1 (one_batch's median decode latency is over the steps)")
    ap.add_argument("--passes", type=int, default=2,
                    help="passes over the batch sizes per run; the first is discarded when >= 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-args", type=shlex.split, default=[],
                    help="more one_batch/server arguments for every run (one string)")
    ap.add_argument("--max-seconds", type=float, default=max_seconds,
                    help="start no run the last run's time says will not fit (default "
                         "%(default)s)")
    ap.add_argument("--model-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                        "bench_one_batch_models"))
    ap.add_argument("--repeats", type=int, default=1, help="blocks of the run order")
    ap.add_argument("--rejudge", default=None, metavar="JSON",
                    help="run nothing: judge the runs saved in this report JSON again (this "
                         "version's verdict rules) and write the report to --out")


def check_common_args(ap, a) -> None:
    for flag, v, lo in (("--input-len", a.input_len, 1), ("--output-len", a.output_len, 2),
                        ("--passes", a.passes, 1), ("--repeats", a.repeats, 1)):
        if v < lo:
            ap.error(f"{flag} must be >= {lo}, got {v}")
