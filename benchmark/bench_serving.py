"""Serving benchmark through real SGLang HTTP servers (random weights, fixed seeds).

Parts (``--parts qwen,doge,eplb``), each server configuration started once, all its points
measured while it is up (``tools.server.Server``; checkpoints from ``tools.models``):

* ``qwen``: Qwen3-MoE (``--qwen-size big``: 64 experts, top-8), upstream token choice
  (no plugin) vs expert choice (``--enable-expert-choice --expert-capacity-factor 1.25
  --expert-choice-min-tokens 32``) at batch sizes 1, 8, 32, 128, 512.
* ``doge``: Doge CDMoE with the Omni router, ``--omni-router-backend`` triton / torch /
  reference at n = 64, 256, 512 (n*n experts, top-8), ``--disable-cuda-graph``.
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

Writes bench_serving.{json,md,png} and server_<name>.log to ``--out`` after every server.
``--max-seconds`` (default 540) stops starting servers whose estimated cost no longer fits.

GPU (one H200; a server start takes ~70 s; one call per line keeps each under 600 s):
    python benchmark/bench_serving.py --parts qwen --out $OUT/qwen           # 2 servers, ~4 min
    python benchmark/bench_serving.py --parts doge --doge-n 64 --out $OUT/d64    # 3 servers, ~6 min
    python benchmark/bench_serving.py --parts doge --doge-n 256 --out $OUT/d256  # likewise
    python benchmark/bench_serving.py --parts doge --doge-n 512 --out $OUT/d512  # likewise
    python benchmark/bench_serving.py --parts eplb --tp 2 --out $OUT/eplb    # 2 GPUs, ~4 min
CPU smoke (servers start in ~25 s each here):
    python benchmark/bench_serving.py --parts qwen --qwen-size small --batch-sizes 1,8 \\
        --decode-tokens 4 --prompt-len 16 --repeats 1 --out /tmp/bs_cpu
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from sglang_moe_routing.tools import models  # noqa: E402
from sglang_moe_routing.tools.server import Server, cuda_available, start_all  # noqa: E402

CHECK_PROMPTS, CHECK_LEN, CHECK_NEW, CHECK_MIN_AGREE = 4, 16, 8, 3
NAN = float("nan")


def fmt(x, spec=".1f"):
    return "n/a" if x != x else format(x, spec)  # nan: e.g. t(1+N) <= t(1) (timing noise)


def parse_ints(s):
    return [int(x) for x in str(s).split(",") if x.strip()]


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


class Bench:
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

    # ------------------------------------------------------------------ helpers
    def log(self, msg):
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def note(self, msg):
        self.log(msg)
        self.notes.append(msg)

    def common_args(self, batch_sizes, graphs=True):
        # a KV pool sized to the largest point (as test_gpu_server.py): on a CPU the default
        # pool takes ~70 % of free RAM per server (OOM-killed on a shared 23 GB machine)
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
        common = self.common_args(a.doge_batch_sizes, graphs=False) + ["--disable-cuda-graph"]
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
                xs = [x for x in pt.get(ph.replace("tok_s", "samples"), []) if x == x]
                return fmt((max(xs) - min(xs)) / statistics.median(xs), ".0%") if xs else "-"

            for bs in sorted(set(t) | set(e)):
                for ph in ("prefill_tok_s", "decode_tok_s"):
                    x, z, y = (r.get(bs, {}).get(ph, NAN) for r in (t, c, e))
                    ratio = lambda a, b: fmt(a / b, ".3f") if ok else "CHECK FAILED"  # noqa: E731
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
                      "--disable-cuda-graph), tok/s\n")
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
                    "others idle (default: on with CUDA; saves ~60 s per server)")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--model-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                        "bench_serving_models"))
    a = ap.parse_args()
    a.batch_sizes_given = a.batch_sizes is not None
    a.batch_sizes = parse_ints(a.batch_sizes or ("1,32,512" if a.quick else "1,8,32,128,512"))
    a.doge_n = parse_ints(a.doge_n or ("64,512" if a.quick else "64,256,512"))
    a.doge_backends = [b for b in a.doge_backends.split(",") if b]
    a.doge_batch_sizes = parse_ints(a.doge_batch_sizes or (
        ",".join(map(str, a.batch_sizes)) if a.batch_sizes_given else "1,128"))
    a.eplb_batch_sizes = parse_ints(a.eplb_batch_sizes)
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


if __name__ == "__main__":
    main()
