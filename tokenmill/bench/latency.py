"""``tokenmill bench latency``: batch-1 time to first token and ms per output token, beside the
memory-bandwidth floor (every weight byte a decode step reads, read once at the measured bandwidth)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from tokenmill.bench.report import print_table, write_json
from tokenmill.bench.workload import synthetic_workload
from tokenmill.llm import LLM
from tokenmill.models.loader import decode_read_bytes, weight_bytes
from tokenmill.sampling_params import SamplingParams


def measure_read_bandwidth(device: torch.device, num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second that a full read (a sum) of a large float32 tensor on ``device`` reaches,
    best of ``repeats`` (on CUDA: the GPU's memory, timed after a synchronize)."""
    data = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    data.sum()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        sync()
        best = min(best, time.perf_counter() - start)
    del data
    return num_bytes / best


def prepare_request(llm: LLM, seed: int, input_len: int, output_len: int) -> tuple[dict, SamplingParams]:
    """The benchmark's one request (a seeded synthetic prompt, greedy, exactly ``output_len`` tokens) and its
    sampling parameters, after a short warm-up generation on ``llm``."""
    vocab = llm.engine.model_config.vocab_size
    request = synthetic_workload(1, vocab, seed, input_len, output_len)[0]
    prompt = {"prompt_token_ids": request.prompt_token_ids}
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return prompt, params


def time_request(llm: LLM, prompt: dict, params: SamplingParams) -> tuple[float, float]:
    """(time to first token, time per output token) in seconds of one run of the request, its prompt
    computed afresh (the prefix cache is emptied first)."""
    llm.engine.core.kv_cache_manager.pool.reset_prefix_cache()
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    return out.time_to_first_token, out.time_per_output_token


def run_latency(llm: LLM, args) -> dict[str, Any]:
    prompt, params = prepare_request(llm, args.seed, args.input_len, args.output_len)
    ttfts, tpots = [], []
    for _ in range(args.num_iters):
        ttft, tpot = time_request(llm, prompt, params)
        ttfts.append(ttft)
        tpots.append(tpot)
    model = llm.engine.core.runner.model
    num_bytes = decode_read_bytes(model)
    bandwidth = measure_read_bandwidth(llm.engine.device)
    floor_ms = 1000 * num_bytes / bandwidth
    tpot_ms = 1000 * statistics.median(tpots)
    result = {
        "model": args.model, "dtype": str(next(model.parameters()).dtype), "input_len": args.input_len,
        "output_len": args.output_len, "ttft_ms": 1000 * statistics.median(ttfts), "tpot_ms": tpot_ms,
        "decode_tokens_per_s": 1000 / tpot_ms, "weight_bytes": weight_bytes(model), "decode_read_bytes": num_bytes, "read_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_floor_ms": floor_ms, "fraction_of_floor": floor_ms / tpot_ms,
        "num_scheduler_steps": llm.engine.core.scheduler.config.num_scheduler_steps,
    }
    print_table(f"latency, batch 1: {args.model} ({result['dtype']})", [
        ("prompt / output tokens", f"{args.input_len} / {args.output_len}"),
        ("decode steps per call", result["num_scheduler_steps"]),
        ("time to first token (ms)", result["ttft_ms"]), ("ms per output token", tpot_ms),
        ("decode tokens/s", result["decode_tokens_per_s"]),
        ("weights held (MB)", result["weight_bytes"] / 1e6), ("weights read per token (MB)", num_bytes / 1e6),
        ("measured read bandwidth (GB/s)", result["read_bandwidth_gb_s"]),
        ("bandwidth floor (ms/token)", floor_ms), ("floor / measured", result["fraction_of_floor"])])
    if getattr(args, "profile", None):
        from tokenmill.bench.profile import print_profile, profile_request

        ops = profile_request(llm, prompt, params, args.profile)
        print_profile(ops, args.profile, llm.engine.device.type == "cuda")
        result["profile"] = {"dir": args.profile, "ops": [vars(op) for op in ops]}
    write_json(args.output_json, result)
    return result
