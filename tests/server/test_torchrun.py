"""Two "nodes" of two processes each on 127.0.0.1, launched by torchrun as a cluster would be: every
process runs `tokenmill serve --pipeline-parallel-size 2`; each node is a pipeline stage of two
tensor-parallel ranks; global rank 0 serves and the other three are workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tokenmill import SamplingParams


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(node_rank: int, master_port: int, http_port: int, model: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
           "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(master_port),
           "-m", "tokenmill", "serve", str(model), "--dtype", "float32", "--port", str(http_port),
           "--kv-cache-memory", "8MiB", "--pipeline-parallel-size", "2"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_torchrun_nodes_serve_a_completion_like_one_process(checkpoint, make_llm, tmp_path):
    model = checkpoint("llama3")  # 4 heads, 2 KV heads: one per tensor-parallel rank; 2 layers: one per stage
    master_port, http_port = _free_port(), _free_port()
    nodes = [_torchrun(rank, master_port, http_port, model, tmp_path / f"node{rank}.log") for rank in (1, 0)]
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert all(node.poll() is None for node in nodes), (tmp_path / "node0.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            raise AssertionError("the torchrun cluster did not become healthy:\n"
                                 + (tmp_path / "node0.log").read_text()[-3000:])
        expected = make_llm(model, dtype="float32")
        for prompt in ("Once upon a time", "The little dog"):
            body = {"model": model.name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            got = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            one = expected.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].text
            assert got == one
        log = (tmp_path / "node0.log").read_text()
        assert "tensor parallel 2 x pipeline parallel 2 = 4 ranks (gloo, launched by torchrun)" in log
        os.killpg(nodes[1].pid, signal.SIGINT)  # node 0: rank 0 serves; stopping it releases the workers
        for node in nodes:
            node.wait(timeout=60)
    finally:  # SIGTERM first: torchrun's agent passes it on to its workers (which run in sessions of their own)
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
