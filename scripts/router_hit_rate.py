"""Prefix-cache hit rate of `tokenmill serve --data-parallel-size 2` under each router policy.

    .venv/bin/python scripts/router_hit_rate.py MODEL_FOLDER prefix|round_robin

A workload of 8 prompt prefixes of 48 tokens, 8 requests each with its own 8-token tail, shuffled,
sent one at a time; prints the servers' summed prefix-cache hits / queries.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx


def main(model: str, policy: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tokenmill", "serve", model, "--port", str(port),
                               "--kv-cache-memory", "64MiB", "--data-parallel-size", "2", "--router-policy", policy,
                               "--dtype", "float32"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(480):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        rng = random.Random(0)
        prefixes = [[1] + [rng.randrange(3, 380) for _ in range(48)] for _ in range(8)]
        work = [prefix + [rng.randrange(3, 380) for _ in range(8)] for prefix in prefixes for _ in range(8)]
        rng.shuffle(work)
        name = os.path.basename(model.rstrip("/"))
        for prompt in work:
            httpx.post(url + "/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 2,
                                                      "temperature": 0}, timeout=60)
        text = httpx.get(url + "/metrics").text

        def total(metric: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(f"tokenmill:{metric}{{"))

        hits, queries = total("prefix_cache_hits_total"), total("prefix_cache_queries_total")
        print(f"{policy}: prefix-cache hit rate {hits / queries:.1%} ({hits:.0f} of {queries:.0f} prompt tokens)")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
