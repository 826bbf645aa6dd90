"""`tokenmill serve --data-parallel-size 2`: two engine-core processes behind the prefix-aware router."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from server.conftest import StreamReader


def _replica_pids(server_pid: int) -> list[int]:
    """The engine-core children in start order (replica 0 first)."""
    children = [int(c) for c in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()]
    cores = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return sorted(cores, key=lambda pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]))


def _replica_metric(srv, name: str) -> list[float]:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(f"tokenmill:replica_{name}{{"):
            replica = int(line.split('replica="')[1].split('"')[0])
            values[replica] = float(line.rsplit(" ", 1)[1])
    return [values[i] for i in sorted(values)]


@pytest.fixture
def dp_server(start_server):
    return start_server("--data-parallel-size", "2")


def test_200_concurrent_requests_are_all_served_by_both_replicas(dp_server):
    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int) -> dict:
                body = {"model": dp_server.name, "prompt": [1, 7 + i % 50, 11, i % 97 + 3], "max_tokens": 4,
                        "temperature": 0, "ignore_eos": True}
                r = await client.post(dp_server.url + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(run())
    assert all(r["usage"]["completion_tokens"] == 4 for r in results)
    routed = _replica_metric(dp_server, "num_requests_routed")
    assert sum(routed) == 200 and min(routed) > 0, routed
    dp_server.wait_idle()
    assert _replica_metric(dp_server, "outstanding_tokens") == [0, 0]


def test_requests_sharing_a_prefix_land_on_one_replica_and_hit_its_cache(dp_server):
    shared = [1] + list(range(20, 60))  # more than one 16-token block
    before = _replica_metric(dp_server, "num_requests_routed")
    for tail in range(6):
        body = {"model": dp_server.name, "prompt": shared + [100 + tail], "max_tokens": 2, "temperature": 0,
                "ignore_eos": True}
        assert httpx.post(dp_server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    routed = [after - b for after, b in zip(_replica_metric(dp_server, "num_requests_routed"), before)]
    assert sorted(routed) == [0, 6], routed
    owner = routed.index(6)
    hits = _replica_metric(dp_server, "prefix_cache_hits")
    assert hits[owner] >= 5 * 32 and hits[1 - owner] == 0, hits  # 5 later requests reuse 2 full blocks


def test_a_dead_replica_fails_its_requests_fast_and_the_other_keeps_serving(dp_server):
    pids = _replica_pids(dp_server.proc.pid)
    routed_before = _replica_metric(dp_server, "num_requests_routed")
    try:
        for pid in pids:  # the tiny model writes 250 tokens in tens of ms: hold both replicas before the request
            os.kill(pid, signal.SIGSTOP)
        reader = StreamReader(dp_server.url, {"model": dp_server.name, "prompt": [1, 2, 3], "max_tokens": 250,
                                              "ignore_eos": True})
        deadline = time.monotonic() + 30
        while True:  # the router (in the server process) counts the request when it hands it to a replica
            routed = [a - b for a, b in zip(_replica_metric(dp_server, "num_requests_routed"), routed_before)]
            if sum(routed) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert sorted(routed) == [0, 1], routed
        victim = routed.index(1)
        os.kill(pids[victim], signal.SIGKILL)
        assert reader.thread.is_alive(), "the request finished on a replica that was stopped"
    finally:  # a failed check must not leave a stopped replica behind the server's shutdown
        for pid in pids:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGCONT)
    killed = time.monotonic()
    reader.thread.join(30)
    assert time.monotonic() - killed < 10
    errors = reader.errors()
    assert errors and errors[0]["code"] == "engine_dead"
    for i in range(8):  # every new request goes to the replica that is left
        body = {"model": dp_server.name, "prompt": [1, 5, i + 3], "max_tokens": 3, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(dp_server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
    assert _replica_metric(dp_server, "healthy")[victim] == 0 and _replica_metric(dp_server, "healthy")[1 - victim] == 1
    assert dp_server.metric("engine_healthy") == 1
