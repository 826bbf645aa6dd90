"""No request can stall, crash or mislead the server (issue 9): each test fails on the code before it.

Most run against the real trained stories260K (llama2.c tokenizer, 512-token context), the model
the attacks were found with; field checks run on the tiny Hugging Face model of the other tests.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers.shared_models import stories_dir
from server.conftest import Server, StreamReader

BODY_LIMIT = 4 * 2**20  # the server's default --max-body-bytes


def _stories_args() -> tuple[Path, list[str]]:
    folder = stories_dir()
    return folder / "stories260K.bin", ["--tokenizer", str(folder / "tok512.bin")]


@pytest.fixture(scope="module")
def stories_server():
    model, args = _stories_args()
    srv = Server(model, *args, "--kv-cache-memory", "16MiB")
    yield srv
    srv.stop()


def _engine_processes(pid: int) -> list[int]:
    """The server's engine-core child (not multiprocessing's resource tracker)."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _gone_or_reaped(pid: int) -> bool:
    """True when the process no longer exists (a zombie still has a /proc entry, in state Z)."""
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "Z" not in state.split()[1]


class _HealthProbe:
    """Polls /health from a thread and records the slowest answer."""

    def __init__(self, url: str):
        self.url, self.slowest, self.failures = url, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status = http.get(self.url + "/health").status_code
                    if status != 200:
                        self.failures.append(status)
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                self.slowest = max(self.slowest, time.monotonic() - start)
                time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)


def test_longest_prompts_are_refused_fast_while_health_and_a_small_completion_go_on(stories_server):
    """Defect 1: the tokenizer ran on the event loop, in time quadratic in the prompt's length, with
    the length check after it. A flood of the longest prompts the body limit allows, and of prompts
    that need real tokenizing, must leave /health answering within 0.5 s and a small completion
    running as usual."""
    srv = stories_server
    longest = "Once upon a time " * ((BODY_LIMIT - 64) // 17)  # the body stays under the limit
    medium = "Once upon a time " * 200  # 3,400 characters: under the cheap guard, so it is tokenized

    def post(prompt: str, results: list) -> None:
        body = json.dumps({"prompt": prompt, "max_tokens": 4}).encode()
        assert len(body) <= BODY_LIMIT
        r = httpx.post(srv.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=120)
        results.append((r.status_code, r.json()))

    with _HealthProbe(srv.url) as probe:
        time.sleep(0.2)
        results: list = []
        flood = [threading.Thread(target=post, args=(p, results)) for p in [longest] * 6 + [medium] * 6]
        for t in flood:
            t.start()
        small = httpx.post(srv.url + "/v1/completions", json={"prompt": "Lily", "max_tokens": 16, "ignore_eos": True},
                           timeout=60)
        for t in flood:
            t.join(120)
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 16
    assert len(results) == 12
    assert all(status == 400 for status, _ in results), results[:2]
    too_long = [body["error"]["message"] for _, body in results]
    assert sum("too long" in m for m in too_long) == 6  # the guard, before any tokenizing
    assert all("max_model_len" in m for m in too_long)  # the medium ones: tokenized, then over 512
    assert not probe.failures and probe.slowest < 0.5, (probe.slowest, probe.failures[:3])
    srv.wait_idle()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_busy_server_stops_within_5_seconds_of_sigterm_or_ctrl_c(sig):
    """Defect 1: SIGTERM could not stop a server whose loop was busy. Now the signal aborts every
    in-flight request (streams end with an error event), and the engine process is stopped too."""
    model, args = _stories_args()
    srv = Server(model, *args)
    try:
        engine_pids = _engine_processes(srv.proc.pid)
        assert engine_pids
        events: list[str] = []
        started = threading.Barrier(9)

        def stream(i: int) -> None:
            body = {"prompt": "Once", "max_tokens": 500, "ignore_eos": True, "stream": True, "seed": i,
                    "temperature": 1.0}
            try:
                with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
                    first = True
                    for line in r.iter_lines():
                        if first:
                            first = False
                            started.wait(30)
                        if line.startswith("data: "):
                            events.append(line)
            except httpx.HTTPError:
                pass

        streams = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(8)]
        for t in streams:
            t.start()
        started.wait(60)  # every stream is under way
        start = time.monotonic()
        srv.proc.send_signal(sig)
        srv.proc.wait(10)
        elapsed = time.monotonic() - start
        assert elapsed < 5, f"stopped after {elapsed:.1f} s"
        for t in streams:
            t.join(10)
        assert any('"server_shutting_down"' in e for e in events)
        deadline = time.monotonic() + 5
        while not all(_gone_or_reaped(pid) for pid in engine_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone_or_reaped(pid) for pid in engine_pids), "the engine process outlived the server"
    finally:
        srv.stop()


def test_surrogates_and_odd_digits_get_400_naming_the_field_and_the_connection_survives(server):
    """Defect 2: a lone surrogate raised UnicodeEncodeError (500, and the keep-alive connection
    reset); logit_bias keys "²" crashed int() and "５" was taken as 5."""
    cases = [
        ('{"prompt": "a \\ud800 b"}', "prompt"),
        ('{"prompt": ["fine", "a \\udfff b"]}', "prompt"),
        ('{"prompt": "hi", "bad_words": ["x\\ud800"]}', "bad_words"),
        ('{"prompt": "hi", "stop": ["\\ud83d"]}', "stop"),
        ('{"prompt": "hi", "logit_bias": {"\\u00b2": 1}}', "logit_bias"),
        ('{"prompt": "hi", "logit_bias": {"\\uff15": 1}}', "logit_bias"),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as http:  # one keep-alive connection for all
        for body, field in cases:
            r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == field and field in error["message"], (body, error)
        chat = http.post("/v1/chat/completions",
                         content='{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
                         headers={"content-type": "application/json"})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
        assert "surrogate" in chat.json()["error"]["message"]
        ok = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200  # the same connection still serves


def test_offline_api_refuses_surrogates_and_unicode_digits(make_llm, checkpoint):
    from tokenmill import RequestError, SamplingParams

    llm = make_llm(checkpoint("llama"))
    with pytest.raises(RequestError, match="prompt contains a lone surrogate"):
        llm.generate("a \ud800 b", SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="logit_bias keys must be token ids"):
        SamplingParams(logit_bias={"５": 1.0})
    with pytest.raises(RequestError, match="bad_words contains a lone surrogate"):
        SamplingParams(bad_words=["x\udc00"])


def test_more_sequences_than_the_server_holds_is_400_not_503(start_server):
    """Defect 3: such a request got 503 + Retry-After on an idle server, and a client obeying
    Retry-After retried forever."""
    srv = start_server("--max-num-seqs", "2", "--max-queued-requests", "1")
    for body in ({"prompt": ["a", "b", "c", "d"], "max_tokens": 2},
                 {"prompt": "a", "n": 4, "max_tokens": 2, "temperature": 1.0},
                 {"prompt": "a", "beam_width": 4, "max_tokens": 2}):
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and "retry-after" not in r.headers, r.text
        error = r.json()["error"]
        assert error["code"] == "request_too_large" and "max_num_seqs 2" in error["message"]
    assert httpx.post(srv.url + "/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2},
                      timeout=30).status_code == 200


def test_admission_counts_sequences_not_prompts(start_server):
    """Defect 4: `n` (and best_of, beams) were not counted: 8 prompts x n=128 went in as 8."""
    srv = start_server("--max-num-seqs", "2", "--max-queued-requests", "2")  # 4 sequences at once
    first_chunk = threading.Event()

    def long_stream() -> None:
        body = {"prompt": "a", "n": 3, "temperature": 1.0, "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    first_chunk.set()

    runner = threading.Thread(target=long_stream)
    runner.start()
    assert first_chunk.wait(60)
    busy = httpx.post(srv.url + "/v1/completions", json={"prompt": ["b", "c"], "max_tokens": 2}, timeout=30)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text  # 3 + 2 > 4
    assert "3 of 4 sequences" in busy.json()["error"]["message"]
    fits = httpx.post(srv.url + "/v1/completions", json={"prompt": "b", "max_tokens": 2}, timeout=60)
    assert fits.status_code == 200  # 3 + 1 = 4
    runner.join(120)
    srv.wait_idle()


def test_echo_returns_the_prompt_with_its_logprobs_for_text_and_token_prompts(server):
    """Defect 5: echo was dropped for token-id prompts; with logprobs, text_offset ignored the echoed
    prompt and the prompt's tokens had no logprobs."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(f"{server.model}/tokenizer.json")
    ids = tokenizer.encode("Once upon a time", add_special_tokens=True).ids
    echoed = tokenizer.decode(ids)
    for prompt, text in ((ids, echoed), ("Once upon a time", "Once upon a time")):
        body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "echo": True, "logprobs": 2}
        choice = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]
        plain = httpx.post(server.url + "/v1/completions", json={**body, "echo": False}, timeout=30).json()
        generated = plain["choices"][0]["text"]
        assert choice["text"] == text + generated
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 5 == len(lp["token_logprobs"]) == len(lp["text_offset"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
        assert all(len(top) <= 3 for top in lp["top_logprobs"][1:])
        assert lp["text_offset"][len(ids)] == len(text)  # the first generated token starts after the echo
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
        assert lp["token_logprobs"][len(ids):] == plain["choices"][0]["logprobs"]["token_logprobs"]
        assert "prompt_logprobs" not in choice  # vLLM's extra field only when asked for
        # Streamed: the first chunk leads with the prompt, and the pieces add up to the same text.
        streamed, offsets = "", []
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])["choices"][0]
                    streamed += chunk["text"]
                    offsets += chunk["logprobs"]["text_offset"]
        assert streamed == choice["text"] and offsets == lp["text_offset"]


def test_a_dead_engine_shows_in_metrics_is_reaped_and_streams_say_engine_dead(start_server):
    """Defect 6: /metrics kept the last values, the engine process stayed a zombie, and the stream's
    error event had code null."""
    srv = start_server()
    assert srv.metric("engine_healthy") == 1
    engine_pids = _engine_processes(srv.proc.pid)
    reader = StreamReader(srv.url, {"prompt": [1, 2, 3], "max_tokens": 250, "ignore_eos": True, "n": 4,
                                    "temperature": 1.0})
    assert reader.started.wait(60)
    for pid in engine_pids:  # the tiny model can write 4 x 250 tokens within one metrics read: hold it
        os.kill(pid, signal.SIGSTOP)
    assert reader.thread.is_alive(), "the request finished before the engine could be killed under it"
    assert srv.metric("num_requests_running") > 0
    for pid in engine_pids:
        os.kill(pid, signal.SIGKILL)
    reader.thread.join(30)
    errors = reader.errors()
    assert errors and errors[0]["code"] == "engine_dead" and errors[0]["type"] == "internal_server_error"
    assert srv.metric("engine_healthy") == 0
    assert srv.metric("num_requests_running") == 0 and srv.metric("kv_cache_usage_perc") == 0
    deadline = time.monotonic() + 10
    while not all(_gone_or_reaped(pid) for pid in engine_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone_or_reaped(pid) for pid in engine_pids), "the dead engine process is a zombie"


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": "hi", "suffix": "and then"}, 400, "suffix"),
    ({"prompt": "hi", "logit_bias": {"99999": 5}}, 400, "logit_bias"),
    ({"prompt": "hi", "stop_token_ids": [99999]}, 400, "stop_token_ids"),
    ({"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
])
def test_fields_that_would_be_ignored_are_refused_by_name(server, body, status, field):
    """Defect 8 (and OpenAI's temperature range): accepted and silently ignored before."""
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"]


@pytest.mark.parametrize("extra, field", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
])
def test_chat_fields_that_would_be_ignored_are_refused_by_name(server, extra, field):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_a_request_chat_template_is_rendered_and_used(server, stories_server):
    """Defect 8: chat_template in the body was ignored. Here it is rendered (sandboxed) and used, also
    for a tokenizer with no template of its own, whose error no longer points server users at generate()."""
    from tokenizers import Tokenizer

    template = "{% for m in messages %}[{{ m['role'] }}: {{ m['content'] }}]{% endfor %}"
    messages = [{"role": "user", "content": "Once upon a time"}]
    tokenizer = Tokenizer.from_file(f"{server.model}/tokenizer.json")
    expected = len(tokenizer.encode("[user: Once upon a time]", add_special_tokens=False).ids)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2,
                                                              "chat_template": template}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == expected, r.text
    default = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=30)
    assert default.json()["usage"]["prompt_tokens"] != expected  # the model's own template otherwise

    without = httpx.post(stories_server.url + "/v1/chat/completions", json={"messages": messages}, timeout=30)
    assert without.status_code == 400
    assert "chat_template" in without.json()["error"]["message"] and "generate()" not in without.text
    bad = httpx.post(stories_server.url + "/v1/chat/completions",
                     json={"messages": messages, "chat_template": "{{ ''.__class__.__mro__ }}"}, timeout=30)
    assert bad.status_code == 400  # the sandbox refuses it
    ok = httpx.post(stories_server.url + "/v1/chat/completions",
                    json={"messages": messages, "chat_template": "{{ messages[0]['content'] }}", "max_tokens": 4,
                          "temperature": 0}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 4  # " Once upon a time", no BOS


def test_empty_prompt_is_bos_alone_everywhere(stories_server):
    """Defect 9, the one rule: an empty string encodes like any text, to BOS alone with these
    tokenizers, and generates from it (as llama2.c's run does); an empty token list is refused."""
    r = httpx.post(stories_server.url + "/v1/completions", json={"prompt": "", "max_tokens": 8, "temperature": 0},
                   timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1
    expected = (stories_dir() / "expected_greedy.txt").read_text()
    assert expected.startswith(r.json()["choices"][0]["text"])
    for body in ({"prompt": []}, {"prompt": [[]]}):
        assert httpx.post(stories_server.url + "/v1/completions", json=body, timeout=30).status_code == 400


def test_protocol_details(server, start_server):
    """Usability: the 401 names its scheme, a wrong content type says so, the model is named by its
    folder, not its path."""
    plain = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi"}',
                       headers={"content-type": "text/plain"}, timeout=30)
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]["message"]
    models = httpx.get(server.url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [Path(server.model).name]
    srv = start_server("--api-key", "k")
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"}, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_the_real_model_through_the_openai_client_knows_paris():
    """SmolLM2-135M-Instruct served by its known name: a chat through the official client."""
    import openai

    from helpers.shared_models import smollm2_gguf

    smollm2_gguf()
    srv = Server(Path("smollm2-135m-instruct"), "--kv-cache-memory", "64MiB")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        chat = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=24, temperature=0,
                                              messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"
    finally:
        srv.stop()


def test_a_dead_tensor_parallel_worker_fails_streams_fast_and_marks_the_engine_unhealthy(start_server):
    """Killing the worker rank of a `--tensor-parallel-size 2` server mid-stream: rank 0's next
    collective fails at once, the stream ends with engine_dead naming the rank in the log, and
    /metrics says unhealthy; no hang until a timeout."""
    srv = start_server("--tensor-parallel-size", "2")
    core = _engine_processes(srv.proc.pid)[0]
    workers = _engine_processes(core)
    assert len(workers) == 1, "the core process should have started one worker rank"
    reader = StreamReader(srv.url, {"prompt": [1, 2, 3], "max_tokens": 250, "ignore_eos": True})
    assert reader.started.wait(60)
    killed = time.monotonic()
    os.kill(workers[0], signal.SIGKILL)
    reader.thread.join(30)
    assert time.monotonic() - killed < 15, "the stream did not end promptly"
    errors = reader.errors()
    assert errors and errors[0]["code"] == "engine_dead"
    assert srv.metric("engine_healthy") == 0
    assert "distributed worker rank 1 (exit code -9) died" in srv.output()
