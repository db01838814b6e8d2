"""Serving-benchmark machinery: SGLang servers started, measured and stopped on a time budget.

``ServingRunner`` starts each server configuration (alone, or a part's servers together and
paused while another is measured), sends the prompt batches, turns the request times into
prefill / decode throughput per batch size, and measures servers interleaved (A B, then B A)
so drift over a run hits them alike. ``bench_serving.py`` holds the parts (which servers,
which checks) and the report; this file holds how any server is measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from sglang_moe_routing.tools.server import Server, cuda_available, start_all  # noqa: E402

CHECK_PROMPTS, CHECK_LEN, CHECK_NEW, CHECK_MIN_AGREE = 4, 16, 8, 3
NAN = float("nan")


def prompts(vocab, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g).tolist()


def build_model(kind, path, **kw):
    """tools.models.build in a subprocess: this process must not hold a CUDA context
    (Server.stop waits until no process uses the GPU)."""
    if (Path(path) / "config.json").exists():
        return json.loads((Path(path) / "config.json").read_text())
    t0 = time.time()
    code = ("import sys, json; from sglang_moe_routing.tools import models; "
            "models.build(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))")
    path_env = [str(REPO / "python")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path_env)}
    subprocess.run([sys.executable, "-c", code, kind, str(path), json.dumps(kw)], check=True, env=env)
    print(f"  built {kind} {kw} at {path} in {time.time() - t0:.0f} s", flush=True)
    return json.loads((Path(path) / "config.json").read_text())


def device_name():
    if not cuda_available():
        return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                       capture_output=True, text=True)
    names = r.stdout.strip().splitlines()
    return f"{len(names)} x {names[0]}" if names else "CUDA device"


@contextlib.contextmanager
def _running(srv):
    srv.resume()
    try:
        yield srv
    finally:
        srv.pause()


class ServingRunner:
    """Servers on a ``--max-seconds`` budget, measured point by point; subclasses add parts."""

    def __init__(self, args):
        self.args = args
        self.cuda = cuda_available()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.deadline = self.t0 + args.max_seconds
        self.costs = []  # seconds per finished server (start + measurement)
        self.group_s = []  # seconds per group of servers started together (start + measurement)
        self.prestarted = {}  # name -> (Server, error) started together by prestart()
        self.notes = []

    def log(self, msg):
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def note(self, msg):
        self.log(msg)
        self.notes.append(msg)

    def common_args(self, batch_sizes, graphs=True):
        # a KV pool sized to the largest point (as test_gpu_server.py): on a CPU the default
        # pool takes most of the free RAM per server, so servers started together are OOM-killed
        kv = max(65536, max(batch_sizes) * (self.args.prompt_len + self.args.decode_tokens + 16))
        a = ["--disable-radix-cache", "--max-running-requests", str(max(512, *batch_sizes)),
             "--max-total-tokens", str(kv)]
        if self.cuda and graphs:  # CUDA graphs stay on; decode at max(B) inside a graph
            a += ["--cuda-graph-max-bs-decode", str(max(batch_sizes)),
                  "--cuda-graph-max-bs-prefill", "512"]
        return a

    def generate(self, srv, ids, max_new):
        """One batch request; returns (seconds, outputs, cached tokens, short outputs)."""
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new,
                                                      "temperature": 0.0, "ignore_eos": True}}
        t0 = time.perf_counter()
        out = srv.post("/generate", body, timeout=self.args.request_timeout)
        dt = time.perf_counter() - t0
        out = out if isinstance(out, list) else [out]
        cached = sum(o.get("meta_info", {}).get("cached_tokens", 0) or 0 for o in out)
        short = sum(len(o["output_ids"]) != max_new for o in out)
        return dt, [o["output_ids"] for o in out], cached, short

    def _prompts_for(self, vocab, bs, r):
        return prompts(vocab, bs, self.args.prompt_len, self.args.seed * 1_000_003 + bs * 1000 + r)

    def _repeat(self, srv, vocab, bs, r):
        """One repeat: (t1, t2, cached tokens, short outputs)."""
        ids = self._prompts_for(vocab, bs, r)
        t1, _, c1, s1 = self.generate(srv, ids, 1)
        t2, _, c2, s2 = self.generate(srv, ids, 1 + self.args.decode_tokens)
        return t1, t2, c1 + c2, s1 + s2

    def _point(self, bs, reps, name):
        L, N = self.args.prompt_len, self.args.decode_tokens
        pre = [bs * L / t1 for t1, _, _, _ in reps]
        dec = [bs * N / (t2 - t1) if t2 > t1 else NAN for t1, t2, _, _ in reps]
        good = [d for d in dec if d == d]
        cached, short = sum(r[2] for r in reps), sum(r[3] for r in reps)
        p = {"B": bs, "prefill_tok_s": statistics.median(pre),
             "decode_tok_s": statistics.median(good) if good else NAN,
             "prefill_samples": pre, "decode_samples": dec,
             "t1_t2_s": [[round(r[0], 4), round(r[1], 4)] for r in reps], "cached_tokens": cached,
             "short_outputs": short}
        self.log(f"  {name} B={bs:4d}: prefill {p['prefill_tok_s']:10.1f} tok/s  decode "
                 f"{p['decode_tok_s']:10.1f} tok/s" + (f"  cached_tokens={cached}" if cached else "")
                 + (f"  WARNING {short} outputs of the wrong length" if short else ""))
        return p

    def measure(self, srv, vocab, bs, name):
        self._repeat(srv, vocab, bs, 999)  # warm-up
        return self._point(bs, [self._repeat(srv, vocab, bs, r) for r in range(self.args.repeats)],
                           name)

    def measure_interleaved(self, group, vocab, batch_sizes):
        """Pre-started, paused servers ``group`` ([(name, srv)]) measured point by point in
        alternating order (A B, then B A, ...), each resumed only for its own requests, so
        that drift over the run (clocks, caches, other processes) hits every server alike."""
        reps = {name: {} for name, _ in group}
        for bs in batch_sizes:
            if time.time() > self.deadline:
                self.note(f"--max-seconds reached, B={bs} not measured")
                continue
            for name, srv in group:
                with _running(srv):
                    self._repeat(srv, vocab, bs, 999)  # warm-up
            for r in range(self.args.repeats):
                for name, srv in (group if r % 2 == 0 else group[::-1]):
                    with _running(srv):
                        # the first request after SIGCONT pays the wake-up (scheduler loop,
                        # caches): a small untimed one takes it, so t(1) does not
                        self.generate(srv, self._prompts_for(vocab, 1, 998), 1)
                        reps[name].setdefault(bs, []).append(self._repeat(srv, vocab, bs, r))
            for name, _ in group:
                reps[name][bs] = self._point(bs, reps[name][bs], name)
        return {name: list(pts.values()) for name, pts in reps.items()}

    def points(self, srv, vocab, batch_sizes, name):
        pts = []
        for bs in batch_sizes:
            if time.time() > self.deadline:
                self.note(f"{name}: --max-seconds reached, B={bs} not measured")
                continue
            pts.append(self.measure(srv, vocab, bs, name))
        return pts

    def check_ids(self, srv, vocab, one_by_one):
        ids = prompts(vocab, CHECK_PROMPTS, CHECK_LEN, self.args.seed + 7)
        if one_by_one:
            return [self.generate(srv, [p], CHECK_NEW)[1][0] for p in ids]
        return self.generate(srv, ids, CHECK_NEW)[1]

    def _new_server(self, name, model, extra, plugin, concurrent=False):
        log_path = self.out / f"server_{name}.log"
        kw = {} if concurrent else {"wait_gpu_free": True}  # alone: one server at a time
        return Server(str(model), extra, log_path=str(log_path), plugin=plugin,
                      timeout_s=self.args.start_timeout, **kw)

    def prestart(self, specs):
        """Start the servers of a part together (``--concurrent-start``): their imports and
        graph captures overlap; then all are paused (SIGSTOP: an idle SGLang scheduler
        busy-polls a CPU core) and each is resumed, measured alone and stopped in turn.
        ``specs``: [(name, model, extra, plugin)]."""
        if not self.args.concurrent_start or len(specs) < 2:
            return
        servers = [self._new_server(n, m, e, p, concurrent=True) for n, m, e, p in specs]
        self.log(f"starting {len(servers)} servers together: {', '.join(s[0] for s in specs)}")
        t0 = time.time()
        errors = start_all(servers)
        for (name, *_), srv, err in zip(specs, servers, errors):
            self.prestarted[name] = (srv, err)
            srv.pause()  # idle SGLang schedulers busy-poll a core each: stopped until measured
        self.log(f"  all up in {time.time() - t0:.0f} s" + "".join(
            f"; {n} FAILED" for (n, *_), e in zip(specs, errors) if e))

    def server(self, name, model, extra, body, plugin=True):
        """Start one server (or take the pre-started one), run ``body(srv, name)`` (a dict),
        stop it. None when skipped."""
        if name in self.prestarted:
            return self._measure_prestarted(name, extra, body, plugin)
        est = max(self.costs) if self.costs else (120 if self.cuda else 150)
        left = self.deadline - time.time()
        if est > left:
            self.note(f"skip server {name}: about {est:.0f} s needed, {left:.0f} s of "
                      f"--max-seconds left")
            return None
        log_path = self.out / f"server_{name}.log"
        srv = self._new_server(name, model, extra, plugin)
        self.log(f"starting server {name}{'' if plugin else ' (upstream, no plugin)'}: "
                 f"{' '.join(extra)}")
        res = {"args": extra, "plugin": plugin, "log": log_path.name}
        t0 = time.time()
        try:
            srv.start()
            res["start_s"] = srv.start_s
            self.log(f"  {name} up in {srv.start_s:.0f} s")
            res.update(body(srv, name))
        except Exception as exc:  # noqa: BLE001  (server failure: record it, go on)
            res["error"] = str(exc)[-3000:]
            self.note(f"server {name} FAILED: {str(exc)[:300]} (log: {log_path})")
        finally:
            srv.stop()
        res["total_s"] = time.time() - t0
        self.costs.append(res["total_s"])
        self.log(f"  {name} done in {res['total_s']:.0f} s")
        return res

    def _measure_prestarted(self, name, extra, body, plugin):
        srv, err = self.prestarted.pop(name)
        res = {"args": extra, "plugin": plugin, "log": Path(srv.log_path).name,
               "start_s": srv.start_s, "started": "together with the part's other servers"}
        t0 = time.time()
        try:
            if err:
                raise RuntimeError(err)
            if time.time() > self.deadline:
                raise RuntimeError("--max-seconds reached before this server was measured")
            srv.resume()
            time.sleep(1)
            res.update(body(srv, name))
        except Exception as exc:  # noqa: BLE001
            res["error"] = str(exc)[-3000:]
            self.note(f"server {name} FAILED: {str(exc)[:300]}")
        finally:
            srv.stop()
        res["total_s"] = time.time() - t0
        self.log(f"  {name} measured in {res['total_s']:.0f} s")
        return res

    def run_group(self, specs, vocab, batch_sizes, one_by_one, extra=None):
        """Concurrent start + interleaved measurement of ``specs`` ([(name, model, extra,
        plugin)]); returns {name: result} shaped like ``server()``'s. ``extra(srv)`` adds
        fields from a server before it stops."""
        self.prestart(specs)
        group, res = [], {}
        for name, _model, args, plugin in specs:
            srv, err = self.prestarted.pop(name)
            res[name] = {"args": args, "plugin": plugin, "log": Path(srv.log_path).name,
                         "start_s": srv.start_s, "started": "together, measured interleaved"}
            if err:
                res[name]["error"] = err[-3000:]
                self.note(f"server {name} FAILED to start: {err[:300]}")
                srv.stop()
                continue
            try:
                with _running(srv):
                    res[name]["check_ids"] = self.check_ids(srv, vocab, one_by_one=one_by_one)
                group.append((name, srv))
            except Exception as exc:  # noqa: BLE001
                res[name]["error"] = str(exc)[-3000:]
                self.note(f"server {name} FAILED: {str(exc)[:300]}")
                srv.stop()
        t0 = time.time()
        try:
            for name, pts in self.measure_interleaved(group, vocab, batch_sizes).items():
                res[name]["points"] = pts
        except Exception as exc:  # noqa: BLE001
            self.note(f"interleaved measurement FAILED: {str(exc)[:300]}")
            for name, _ in group:
                res[name].setdefault("error", str(exc)[-3000:])
        finally:
            for name, srv in group:
                if extra is not None:
                    res[name].update(extra(srv))
                srv.stop()
                res[name]["total_s"] = (time.time() - t0) / max(1, len(group))
        self.log(f"  group measured in {time.time() - t0:.0f} s")
        return res
