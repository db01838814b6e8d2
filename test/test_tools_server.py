"""``tools.server``'s start-up contract, which the GPU server suite relies on (a server that
never gets healthy must fail alone, within its ``timeout_s``, with its log kept, and not hold
up the servers started beside it). Fake servers (plain Python processes) stand in for
``launch_server``; no sglang needed."""

from __future__ import annotations

import os
import sys
import time

from sglang_moe_routing.tools.server import Server, start_all

HEALTHY = (
    "import http.server, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
    "    def log_message(self, *a): pass\n"
    "print('fake server up', flush=True)\n"
    "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
)


class Fake(Server):
    """A ``Server`` whose process is ``python -c CODE PORT`` instead of launch_server."""

    def __init__(self, code: str, tmp_path, name: str, timeout_s: float) -> None:
        super().__init__("unused", log_path=str(tmp_path / f"{name}.log"), timeout_s=timeout_s)
        self.code = code
        self.cuda = True  # no CPU shim: the fake imports nothing of sglang

    def command(self):
        return [sys.executable, "-c", self.code, str(self.port)]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(pid, 0); it has exited all the same
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


def test_a_server_that_never_gets_healthy_fails_alone_with_its_log(tmp_path):
    hang = Fake("import time; print('capturing graphs', flush=True); time.sleep(600)",
                tmp_path, "hang", timeout_s=3)
    ok = Fake(HEALTHY, tmp_path, "ok", timeout_s=60)
    t0 = time.time()
    errors = start_all([hang, ok], stagger_s=0.1)
    try:
        assert time.time() - t0 < 30  # bounded by the hung server's timeout_s, not 600 s
        assert errors[1] is None and ok.alive()
        assert errors[0] is not None and "not healthy after 3 s" in errors[0]
        assert "capturing graphs" in errors[0]  # the log tail rides in the error
        assert hang.proc is None  # stopped
        with open(tmp_path / "hang.log") as f:  # and the log stays where it was asked to be
            assert "capturing graphs" in f.read()
    finally:
        ok.stop()
        hang.stop()


def test_a_server_that_exits_reports_its_status_and_log(tmp_path):
    dead = Fake("import sys; print('error: bad flag --foo', flush=True); sys.exit(3)",
                tmp_path, "dead", timeout_s=60)
    (err,) = start_all([dead], stagger_s=0)
    assert err is not None and "exited with 3" in err and "bad flag --foo" in err


def test_stop_kills_the_whole_process_group(tmp_path):
    # the fake forks a child in its process group, as launch_server starts its scheduler
    code = ("import os, subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "print('child', c.pid, flush=True)\n" + HEALTHY)
    srv = Fake(code, tmp_path, "group", timeout_s=60)
    (err,) = start_all([srv], stagger_s=0)
    assert err is None
    child = int(srv.log().split("child ")[1].split()[0])
    pid = srv.proc.pid
    srv.stop()
    deadline = time.time() + 10
    while time.time() < deadline and not (_gone(pid) and _gone(child)):
        time.sleep(0.1)
    assert _gone(pid) and _gone(child)
