"""The OpenAI-compatible server, as a real process, through the official client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from tokenizers import Tokenizer

PROMPT = "Once upon a time there was"
NO_EOS = {"extra_body": {"ignore_eos": True}}  # vLLM's extra fields go through the client's extra_body


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                         **kwargs)


def test_openai_client_completes_chats_and_streams_the_same_text(server):
    c = client(server)
    full = c.completions.create(model=server.name, prompt=PROMPT, max_tokens=24, temperature=0, **NO_EOS)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 24
    chunks = list(c.completions.create(model=server.name, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, **NO_EOS))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens

    messages = [{"role": "user", "content": "hello"}]
    chat = c.chat.completions.create(model=server.name, messages=messages, max_tokens=16, temperature=0, **NO_EOS)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 16
    stream = list(c.chat.completions.create(model=server.name, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, **NO_EOS))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == "length"
    assert [m.id for m in c.models.list().data] == [server.name]


@pytest.mark.parametrize("text, char, ngram", [("中文", "文", 0), ("🙂", "🙂", 3)])
def test_stream_equals_full_text_with_emoji_and_cjk_split_across_tokens(server, text, char, ngram):
    tokenizer = Tokenizer.from_file(f"{server.model}/tokenizer.json")
    pieces = tokenizer.encode(text, add_special_tokens=False).ids  # 文 is two byte-level tokens, 🙂 three
    assert len(pieces) >= 2
    # Allow only those tokens: the random model strings them together, whole characters and broken ones.
    body = {"model": server.name, "prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True,
            "no_repeat_ngram_size": ngram, "logit_bias": {str(t): 100 for t in pieces}}
    full = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert char in full, full
    streamed = ""
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed += json.loads(line[6:])["choices"][0]["text"]
    assert streamed == full


def test_stop_string_spanning_tokens_never_leaks_into_the_stream(server):
    c = client(server)
    text = c.completions.create(model=server.name, prompt=PROMPT, max_tokens=24, temperature=0,
                                **NO_EOS).choices[0].text
    tokenizer = Tokenizer.from_file(f"{server.model}/tokenizer.json")
    ids = tokenizer.encode(PROMPT + text, add_special_tokens=False).ids
    # A stop string made of the end of one generated token and the start of the next.
    first = tokenizer.decode(ids[:-6])
    second = tokenizer.decode(ids[:-5])
    third = tokenizer.decode(ids[:-4])
    stop = (second[len(first):] + third[len(second):])[-4:].strip() or third[len(first):]
    assert stop and stop in text
    full = c.completions.create(model=server.name, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop], **NO_EOS)
    assert full.choices[0].finish_reason == "stop" and stop not in full.choices[0].text
    assert text.startswith(full.choices[0].text)
    chunks = list(c.completions.create(model=server.name, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                       stream=True, **NO_EOS))
    assert "".join(ch.choices[0].text for ch in chunks) == full.choices[0].text


def test_every_sampling_parameter_is_reachable(server):
    body = {"model": server.name, "prompt": ["hello", "world"], "max_tokens": 6, "temperature": 0.8,
            "top_p": 0.9, "top_k": 20, "min_p": 0.01, "seed": 3, "presence_penalty": 0.5,
            "frequency_penalty": 0.5, "repetition_penalty": 1.2, "min_tokens": 2, "ignore_eos": True,
            "no_repeat_ngram_size": 2, "logit_bias": {"5": -100}, "stop_token_ids": [7], "n": 2, "best_of": 3,
            "logprobs": 2, "bad_words": ["fox"], "skip_special_tokens": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert [ch["index"] for ch in data["choices"]] == [0, 1, 2, 3]
    assert all(len(ch["logprobs"]["tokens"]) == len(ch["logprobs"]["token_logprobs"]) for ch in data["choices"])
    beam = httpx.post(server.url + "/v1/completions", json={
        "model": server.name, "prompt": "hello", "max_tokens": 6, "beam_width": 3, "n": 2, "length_penalty": 0.5,
        "early_stopping": "never"}, timeout=60)
    assert beam.status_code == 200, beam.text
    assert len(beam.json()["choices"]) == 2
    prompt_lp = httpx.post(server.url + "/v1/completions", json={
        "model": server.name, "prompt": [1, 40, 41, 42], "max_tokens": 2, "prompt_logprobs": 1}, timeout=60).json()
    entries = prompt_lp["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == 4 and "40" in entries[1]
    chat = httpx.post(server.url + "/v1/chat/completions", json={
        "model": server.name, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4,
        "logprobs": True, "top_logprobs": 2, "temperature": 0}, timeout=60).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(entry["top_logprobs"]) == 2 for entry in content)
    server.wait_idle()


async def _stream_one(http: httpx.AsyncClient, url: str, model: str, i: int) -> int:
    body = {"model": model, "prompt": [1, 20 + i % 50, 30, 40 + i % 7], "max_tokens": 8, "ignore_eos": True,
            "temperature": 0.7, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    usage = None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
    return usage["completion_tokens"]


def test_200_concurrent_streams_complete_and_free_every_block(server):
    async def run():
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.gather(*(_stream_one(http, server.url, server.name, i) for i in range(200)))

    assert asyncio.run(run()) == [8] * 200
    server.wait_idle()


def test_clients_that_disconnect_mid_stream_are_aborted_and_freed(server):
    async def leave_early(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": server.name, "prompt": [1, 50 + i], "max_tokens": 200, "ignore_eos": True,
                "temperature": 0, "stream": True}
        async with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = 0
            async for line in r.aiter_lines():
                lines += line.startswith("data: ")
                if lines == 3:
                    break  # closes the connection mid-stream

    async def leave_non_streaming(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": server.name, "prompt": [1, 60 + i], "max_tokens": 200, "ignore_eos": True}
        with pytest.raises(httpx.TimeoutException):
            await http.post(server.url + "/v1/completions", json=body, timeout=0.05)

    async def run():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as http:
            await asyncio.gather(*(leave_early(http, i) for i in range(50)),
                                 *(leave_non_streaming(http, i) for i in range(10)))

    asyncio.run(run())
    server.wait_idle()
    # Still serving.
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize("body, status, fragment", [
    ('{"prompt": "hi", "max_tokens": 3', 400, "JSON"),  # malformed JSON
    ('{"prompt": 5}', 400, "prompt"),
    ('{"prompt": "hi", "top_k": 2.5}', 400, "top_k"),
    ('{"prompt": "hi", "top_k": 2.0}', 400, "top_k"),
    ('{"prompt": "hi", "n": 100000}', 400, "n must be"),
    ('{"prompt": "hi", "best_of": 1000000}', 400, "best_of"),
    ('{"prompt": "hi", "logprobs": 1000}', 400, "logprobs"),
    ('{"prompt": []}', 400, "prompt"),
    ('{"prompt": "hi", "model": "gpt-4"}', 404, "does not exist"),
    ('{"prompt": "hi", "max_tokens": 100000}', 400, "max_model_len"),
    ('{"prompt": [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 130, 131, 132, 133, 134, 135, 136, 137, 138, 139, 140, 141, 142, 143, 144, 145, 146, 147, 148, 149, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160, 161, 162, 163, 164, 165, 166, 167, 168, 169, 170, 171, 172, 173, 174, 175, 176, 177, 178, 179, 180, 181, 182, 183, 184, 185, 186, 187, 188, 189, 190, 191, 192, 193, 194, 195, 196, 197, 198, 199, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217, 218, 219, 220, 221, 222, 223, 224, 225, 226, 227, 228, 229, 230, 231, 232, 233, 234, 235, 236, 237, 238, 239, 240, 241, 242, 243, 244, 245, 246, 247, 248, 249, 250, 251, 252, 253, 254, 255, 256, 257, 258, 259, 260]}', 400, "max_model_len"),  # noqa: E501
    ('{"prompt": [1, 100000]}', 400, "vocabulary"),
    ('{"prompt": "hi", "temperature": -1}', 400, "temperature"),
    ('{"prompt": "hi", "top_p": 7}', 400, "top_p"),
    ('{"prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    ('{"prompt": "hi", "logit_bias": {"abc": 1}}', 400, "logit_bias"),
    ('{"prompt": "hi", "beam_width": 2, "n": 5}', 400, "beam_width"),
    ('[1, 2, 3]', 400, ""),
    ('{"prompt": "hi", "stop": [""]}', 400, "stop"),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, fragment):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]


def test_bad_chat_requests_and_bodies(server):
    post = lambda path, **kw: httpx.post(server.url + path, timeout=30, **kw)  # noqa: E731
    assert post("/v1/chat/completions", json={"messages": []}).status_code == 400
    assert post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}).status_code == 400
    assert post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                               "top_logprobs": 3}).status_code == 400
    assert post("/v1/completions", content=b'{"prompt": "\xff\xfe"}',
                headers={"content-type": "application/json"}).status_code == 400
    big = post("/v1/completions", content=b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}',
               headers={"content-type": "application/json"})
    assert big.status_code == 413 and "larger than" in big.json()["error"]["message"]
    assert post("/v1/nothing", json={}).status_code == 404
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    assert httpx.get(server.url + "/health").status_code == 200


def test_schemathesis_finds_no_server_error(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def check(case):
            body = case.body if isinstance(case.body, dict) else None
            if body is not None:  # keep generated requests small and fast
                body["max_tokens"] = 2
                body.pop("max_completion_tokens", None)
                body["stream"] = False
            response = case.call(base_url=server.url, timeout=30)
            if response.status_code >= 500:
                failures.append((case.method, case.path, body, response.status_code, response.text[:300]))

        check()
    assert not failures, failures[:3]
    assert httpx.get(server.url + "/health").status_code == 200
    server.wait_idle()


def test_overload_gets_503_with_retry_after_and_admitted_requests_finish(start_server):
    srv = start_server("--max-num-seqs", "2", "--max-queued-requests", "1")

    async def one(http: httpx.AsyncClient, i: int):
        body = {"prompt": [1, 30 + i], "max_tokens": 40, "ignore_eos": True, "temperature": 0}
        r = await http.post(srv.url + "/v1/completions", json=body)
        return r.status_code, r.headers.get("retry-after"), r.json()

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(12)))

    results = asyncio.run(run())
    ok = [body for status, _, body in results if status == 200]
    rejected = [(retry, body) for status, retry, body in results if status == 503]
    assert len(ok) + len(rejected) == 12 and len(ok) >= 3 and rejected
    assert all(len(b["choices"][0]["text"]) >= 0 and b["usage"]["completion_tokens"] == 40 for b in ok)
    assert all(retry == "1" and b["error"]["code"] == "queue_full" for retry, b in rejected)
    srv.wait_idle()


def test_api_key(start_server):
    srv = start_server("--api-key", "sekret")
    body = {"prompt": "hi", "max_tokens": 2}
    assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 401
    wrong = httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.post(srv.url + "/v1/completions", content=b"{oops", headers={"content-type": "application/json"}
                      ).status_code == 401  # the key is checked before the body is read
    good = httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekret"}, timeout=30)
    assert good.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(srv, api_key="wrong").models.list()
    assert client(srv, api_key="sekret").models.list().data
    assert httpx.get(srv.url + "/health").status_code == 200  # health and metrics stay open for probes


def test_timeout_aborts_and_a_dead_engine_fails_fast(start_server):
    srv = start_server("--request-timeout", "0.05")
    body = {"prompt": [1, 2, 3], "max_tokens": 250, "ignore_eos": True}
    # 250 steps, each a model forward plus two pipe messages, take well over 50 ms.
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    srv.wait_idle()  # aborted, blocks freed
    # Kill the engine process: /health reports it and requests fail fast with 500, not hang.
    children = open(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read().split()
    import os
    import signal

    for child in children:
        os.kill(int(child), signal.SIGKILL)
    for _ in range(100):
        if httpx.get(srv.url + "/health").status_code == 500:
            break
        asyncio.run(asyncio.sleep(0.05))
    health = httpx.get(srv.url + "/health")
    assert health.status_code == 500 and "engine" in health.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=10)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"


def test_bench_serve_reports_latency_and_throughput(server, tmp_path):
    import subprocess
    import sys

    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"hello {i}"},
                                                       {"from": "gpt", "value": "x" * 40}]} for i in range(6)]))
    for extra in (["--input-len", "16", "--output-len", "8", "--request-rate", "50"], ["--dataset", str(sharegpt)]):
        out = tmp_path / "serve.json"
        result = subprocess.run([sys.executable, "-m", "tokenmill", "bench", "serve", "--base-url", server.url,
                                 "--num-prompts", "6", "--output-json", str(out), *extra],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        data = json.loads(out.read_text())
        assert data["completed"] == 6 and data["failed"] == 0 and data["output_tokens"] > 0
        assert data["ttft_ms"]["p99"] >= data["ttft_ms"]["median"] > 0
        assert "TTFT" in result.stdout and "ITL" in result.stdout
    server.wait_idle()


@pytest.mark.parametrize("option, layout", [("--tensor-parallel-size", "tensor parallel 2 x pipeline parallel 1"),
                                            ("--pipeline-parallel-size", "tensor parallel 1 x pipeline parallel 2")])
def test_a_two_rank_server_answers_like_a_single_process_one(option, layout, server, start_server):
    """`tokenmill serve --tensor-parallel-size 2` (or `--pipeline-parallel-size 2`): its core process starts a
    worker rank; the texts equal the one-process server's, and stopping the server stops the worker too."""
    tp = start_server(option, "2")
    for prompt in (PROMPT, "The little dog"):
        one = client(server).completions.create(model=server.name, prompt=prompt, max_tokens=16, temperature=0,
                                                **NO_EOS)
        two = client(tp).completions.create(model=tp.name, prompt=prompt, max_tokens=16, temperature=0, **NO_EOS)
        assert two.choices[0].text == one.choices[0].text and two.usage.completion_tokens == 16
    assert f"{layout} = 2 ranks" in tp.output()
    processes = _descendants(tp.proc.pid)
    assert len(processes) >= 2  # the core process and its worker rank (and multiprocessing's helper)
    tp.stop()
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in processes if Path(f"/proc/{pid}").exists()], "processes outlived the server"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            children = [int(c) for c in (task / "children").read_text().split()]
            found += children
            todo += children
    return found


def test_kv_tiers_show_in_usage_metrics_and_the_start_up_line(start_server):
    """A prefix pushed out of a 20-block pool comes back from the CPU tier: the usage counts its tokens as
    cached (OpenAI's prompt_tokens_details) and /metrics counts the tier's blocks and hits."""
    import random

    srv = start_server("--kv-cache-memory", "80KiB", "--kv-offload-memory", "256KiB")  # 4 KiB blocks of 16 tokens
    rng = random.Random(1)
    prefix = [1] + [rng.randrange(3, 380) for _ in range(99)]
    fillers = [[1] + [rng.randrange(3, 380) for _ in range(99)] for _ in range(3)]

    def complete(prompt: list[int]) -> dict:
        body = {"model": srv.name, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    first = complete(prefix + [5])
    for filler in fillers:
        complete(filler)
    again = complete(prefix + [5])
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 96  # 6 of the 7 blocks; the last is computed
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert srv.metric("kv_offload_hits_total") == 6 and srv.metric("kv_offload_failures_total") == 0
    assert srv.metric("kv_offload_capacity_blocks") == 64 and 0 < srv.metric("kv_offload_blocks") <= 64
    assert srv.metric("kv_offload_stores_total") >= 6
    assert 'tier="cpu"' in httpx.get(srv.url + "/metrics", timeout=10).text
    assert "KV offload tiers: cpu (CPU memory): 0.2 MiB = 64 blocks of 4 KiB" in srv.output()


def test_multi_step_scheduling_serves_and_streams_the_same_text(server, start_server):
    """``--num-scheduler-steps 4``: greedy tokens come four decode steps per call, in bursts; the text, whole
    or streamed, and where a stop string cuts it, equals the one-step server's."""
    multi = start_server("--num-scheduler-steps", "4")
    body = {"prompt": PROMPT, "max_tokens": 23, "temperature": 0, "ignore_eos": True}
    one = httpx.post(server.url + "/v1/completions", json={"model": server.name, **body}, timeout=60).json()
    full = httpx.post(multi.url + "/v1/completions", json={"model": multi.name, **body}, timeout=60).json()
    assert full["choices"][0]["text"] == one["choices"][0]["text"] and full["usage"]["completion_tokens"] == 23
    streamed = ""
    with httpx.stream("POST", multi.url + "/v1/completions", json={"model": multi.name, **body, "stream": True},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed += json.loads(line[6:])["choices"][0]["text"]
    assert streamed == one["choices"][0]["text"]
    text = one["choices"][0]["text"]  # a stop string from its middle: found inside a burst, cut the same way
    middle = next(i for i in sorted(range(len(text) - 1), key=lambda i: abs(i - len(text) // 2))
                  if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2])
    stop = {**body, "stop": [text[middle:middle + 2]]}
    want = httpx.post(server.url + "/v1/completions", json={"model": server.name, **stop}, timeout=60).json()
    got = httpx.post(multi.url + "/v1/completions", json={"model": multi.name, **stop}, timeout=60).json()
    assert want["choices"][0]["finish_reason"] == "stop" and got["choices"][0] == want["choices"][0]
    assert got["usage"] == want["usage"]
    multi.wait_idle()
    assert "multi-step scheduling: up to 4 greedy decode steps per call" in multi.output()
