"""The tokenmill command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers.shared_models import stories_dir


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "tokenmill", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_generate_streams_golden_continuation():
    folder = stories_dir()
    result = _run("generate", str(folder / "stories260K.bin"), "--tokenizer", str(folder / "tok512.bin"),
                  "--prompt", "Once upon a time", "--max-tokens", "32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time, there was a little girl named Lily.")
    assert "finish_reason=length" in result.stderr


def test_generate_reports_bad_model_clearly(tmp_path):
    result = _run("generate", str(tmp_path / "nope"), "--prompt", "hi")
    assert result.returncode == 2
    assert "tokenmill: error:" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_throughput_and_latency_write_json(checkpoint, tmp_path):
    model = str(checkpoint("llama"))
    out = tmp_path / "thr.json"
    result = _run("bench", "throughput", model, "--num-prompts", "6", "--min-input-len", "4", "--max-input-len", "40",
                  "--min-output-len", "2", "--max-output-len", "12", "--no-progress", "--output-json", str(out),
                  "--kv-cache-memory", "8MiB", "--compare-hf", "--hf-batch-size", "4")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["num_requests"] == 6 and data["output_tokens"] > 0 and data["output_tokens_per_s"] > 0
    assert data["hf"]["output_tokens_per_s"] > 0 and data["speedup_vs_hf"] > 0
    assert "output tokens/s" in result.stdout
    lat = tmp_path / "lat.json"
    result = _run("bench", "latency", model, "--input-len", "16", "--output-len", "8", "--num-iters", "1",
                  "--output-json", str(lat), "--kv-cache-memory", "8MiB", "--profile", str(tmp_path / "prof"))
    assert result.returncode == 0, result.stderr
    data = json.loads(lat.read_text())
    assert data["tpot_ms"] > 0 and data["bandwidth_floor_ms"] > 0 and data["weight_bytes"] > 0
    assert data["num_scheduler_steps"] == 1 and "decode steps per call" in result.stdout
    # --profile: a trace, the profiler's table, and time per output token by operator and engine phase
    assert json.loads((tmp_path / "prof" / "trace.json").read_text())["traceEvents"]
    assert "Self CPU" in (tmp_path / "prof" / "ops.txt").read_text()
    ops = {op["name"]: op for op in data["profile"]["ops"]}
    # greedy: the prompt's step samples; the decode steps take the C++ step's argmax
    assert ops["tokenmill.sample"]["calls_per_token"] == 1 / 8
    assert ops["tokenmill.decode_step"]["calls_per_token"] == 7 / 8  # the 7 steps after the prompt's
    assert any(name.startswith("aten::") and op["us_per_token"] > 0 for name, op in ops.items())
    assert "profile: operator CPU time" in result.stdout


def test_demo_chats_with_the_real_default_model():
    from helpers.shared_models import smollm2_gguf

    smollm2_gguf()  # fetched once into the user's cache (skips if it cannot be)
    result = _run("demo")
    assert result.returncode == 0, result.stderr
    assert "SmolLM2-135M-Instruct" in result.stdout and "assistant: " in result.stdout
    assert "'What is the capital of France?' [greedy] -> 'The capital of France is Paris.'" in result.stdout
    assert "12 requests" in result.stdout and "output tokens/s" in result.stdout
    assert "KV blocks free after the batch: 364/364" in result.stdout


def test_demo_falls_back_to_random_weights_when_it_cannot_fetch(tmp_path):
    env = {**os.environ, "TOKENMILL_CACHE": str(tmp_path), "TOKENMILL_NO_DOWNLOAD": "1"}
    result = subprocess.run([sys.executable, "-m", "tokenmill", "demo"], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert "could not be fetched" in result.stdout and "downloads are off" in result.stdout
    assert "RANDOM" in result.stdout and "output tokens/s" in result.stdout
    assert "KV blocks free after the batch: 1024/1024" in result.stdout


def test_generate_beam_search_n_and_logprobs_flags(checkpoint):
    model = str(checkpoint("llama"))
    common = ("generate", model, "--prompt", "hello world", "--max-tokens", "6", "--kv-cache-memory", "8MiB")
    result = _run(*common, "--beam-width", "3", "--n", "2", "--length-penalty", "0.5", "--early-stopping", "true")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- completion") == 2 and "cumulative logprob" in result.stdout
    result = _run(*common, "--temperature", "1", "--n", "2", "--logprobs", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- logprobs of completion") == 2
    result = _run(*common, "--prompt-logprobs", "1", "--bad-word-ids", "5,6", "--keep-special-tokens",
                  "--ignore-eos", "--min-tokens", "2", "--stop-token-id", "9")
    assert result.returncode == 0, result.stderr
    assert "--- logprobs of the prompt ---" in result.stdout and "--- logprobs of completion" not in result.stdout
    result = _run(*common, "--beam-width", "2", "--n", "3")
    assert result.returncode == 2 and "n (3) must not exceed beam_width (2)" in result.stderr


def test_generate_from_an_empty_prompt_is_run_c_golden_output():
    """The one rule for empty prompts: "" encodes to BOS alone, as in llama2.c's run, and generates
    the same story byte for byte."""
    folder = stories_dir()
    result = _run("generate", str(folder / "stories260K.bin"), "--tokenizer", str(folder / "tok512.bin"),
                  "--prompt", "", "--max-tokens", "256", "--ignore-eos", "--stop-token-id", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.encode() == (folder / "expected_greedy.txt").read_bytes()


def test_checkpoint_without_tokenizer_says_to_pass_one():
    result = _run("generate", str(stories_dir() / "stories260K.bin"), "--prompt", "hi")
    assert result.returncode == 2
    assert "is a checkpoint file without a tokenizer" in result.stderr and "--tokenizer" in result.stderr
    assert "piece runs past the end" not in result.stderr


def test_sampling_flags_are_checked_before_the_model_loads(tmp_path):
    # The model does not exist: had it loaded first, the error would be "not found".
    result = _run("generate", str(tmp_path / "nope"), "--prompt", "hi", "--temperature", "-1")
    assert result.returncode == 2 and "temperature must be >= 0" in result.stderr


def test_logprobs_k_lists_k_tokens(checkpoint):
    result = _run("generate", str(checkpoint("llama")), "--prompt", "hello", "--max-tokens", "4",
                  "--kv-cache-memory", "8MiB", "--logprobs", "3")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "| top 3:" in line]
    assert len(lines) == 4
    for line in lines:  # greedy: the chosen token is the most likely, listed first and marked
        listed = line.split("| top 3:", 1)[1]
        assert listed.count(",") == 2 and listed.strip().startswith("*")


def test_bench_suite_runs_the_whole_comparison(checkpoint, tmp_path):
    """The one-command comparison for a lent GPU, here on CPU at toy sizes."""
    out = tmp_path / "suite.json"
    result = _run("bench", "suite", str(checkpoint("llama")), "--kv-cache-memory", "8MiB", "--batch-prompts", "4",
                  "--mixed-prompts", "6", "--input-len", "16", "--output-len", "8", "--kv-lengths", "6",
                  "--kv-length-start", "40", "--hf-batch-size", "3", "--output-json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["kv_lengths"]["count"] == 6 and data["kv_lengths"]["first"] == 41
    assert data["batch1"]["tpot_ms"] > 0 and data["batch1"]["bandwidth_floor_ms"] > 0
    assert data["batch"]["output_tokens_per_s"] > 0 and data["mixed"]["num_requests"] == 6
    assert set(data["speedup_vs_hf"]) == {"batch1", "batch", "mixed"}
    assert "speed-up: batch 1 / batch / mixed" in result.stdout


def test_generate_chat_with_the_real_model_knows_paris():
    from helpers.shared_models import smollm2_gguf

    smollm2_gguf()  # fetched once (skips if it cannot be)
    result = _run("generate", "smollm2-135m-instruct", "--chat", "--prompt", "What is the capital of France?",
                  "--max-tokens", "24", "--kv-cache-memory", "64MiB")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "finish_reason=stop" in result.stderr


def test_analyze_a_model_beyond_one_device_prints_the_seeds_memory_and_the_devices_it_needs():
    result = _run("analyze", "--model", "opt-175b", "--hardware", "a10", "--batch-size", "512", "--input-len", "512",
                  "--output-len", "32")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "weights                           325.23" in out and "KV cache                         1224.00" in out
    assert "the smallest layout that holds it is tp 8 x pp 20 = 160 x a10" in out
    assert "all-reduce 8.26 MB" in out
