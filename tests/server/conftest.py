"""A real `tokenmill serve` process on 127.0.0.1 per test module (or per test, for special settings)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str, env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(model)
        self.name = Path(model).name  # the served model name: the folder's name
        cmd = [sys.executable, "-m", "tokenmill", "serve", self.model, "--port", str(self.port),
               "--kv-cache-memory", "8MiB", "--threads", "1", *args]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"tokenmill-server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-5000:]

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(f"tokenmill:{name}{{") or line.startswith(f"tokenmill:{name} "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no sequence runs or waits and no KV block is held (aborts may land a moment later)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.metric("num_requests_running") == 0 and self.metric("num_requests_waiting") == 0
                    and self.metric("kv_cache_usage_perc") == 0):
                return
            time.sleep(0.1)
        raise AssertionError(f"server not idle: running {self.metric('num_requests_running')}, "
                             f"waiting {self.metric('num_requests_waiting')}, "
                             f"KV usage {self.metric('kv_cache_usage_perc')}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = Server(checkpoint("llama"))
    yield srv
    srv.stop()


@pytest.fixture
def start_server(checkpoint):
    started = []

    def start(*args: str, **kwargs) -> Server:
        srv = Server(checkpoint("llama"), *args, **kwargs)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


class StreamReader:
    """A streaming completion read on a thread: ``events`` collects its JSON chunks; ``started`` is set
    at the first one."""

    def __init__(self, url: str, body: dict):
        import json
        import threading

        self.events: list[dict] = []
        self.started = threading.Event()

        def read() -> None:
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        self.events.append(json.loads(line[6:]))
                        self.started.set()

        self.thread = threading.Thread(target=read)
        self.thread.start()

    def errors(self) -> list[dict]:
        return [e["error"] for e in self.events if "error" in e]
