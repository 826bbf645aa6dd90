"""``tokenmill bench suite``: the whole engine-against-HF comparison in one command (one short run
on a lent GPU): batch-1 latency beside the bandwidth floor, a batch of equal requests, a mixed
workload, and decode-step time at KV lengths never seen before.

Both engines run the same checkpoint, on the same device, in the same dtype and process. HF runs
``generate`` in static batches (left-padded, each batch to its longest output); only useful
tokens are counted for it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from tokenmill.bench.hf_baseline import load_hf_model, run_hf_static_batches
from tokenmill.bench.latency import measure_read_bandwidth
from tokenmill.bench.report import print_table, write_json
from tokenmill.bench.workload import BenchRequest, synthetic_workload
from tokenmill.llm import LLM
from tokenmill.models.loader import decode_read_bytes
from tokenmill.sampling_params import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(llm: LLM, workload: list[BenchRequest]) -> tuple[float, list]:
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in workload]
    llm.engine.core.kv_cache_manager.pool.reset_prefix_cache()  # every prompt is computed
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outputs


def decode_step_times(llm: LLM, prompt: list[int], num_steps: int) -> list[float]:
    """Seconds of each of ``num_steps`` batch-1 decode steps after ``prompt``'s prefill: every step
    is at a KV length the engine has not seen before, as in real traffic."""
    engine = llm.engine
    engine.add_request({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=num_steps + 1, ignore_eos=True))
    engine.step()  # the prefill (and the first token)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()  # returns after the sampled token reached the host: the GPU is done
        times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def _hf_batch1_ms_per_token(hf, prompt: list[int], output_len: int) -> float:
    device = next(hf.parameters()).device
    ids = torch.tensor([prompt], device=device)

    def timed(new_tokens: int) -> float:
        _sync(device)
        start = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - start

    timed(2)  # warm-up
    return 1000 * (timed(output_len) - timed(1)) / (output_len - 1)


def run_suite(llm: LLM, args) -> dict[str, Any]:
    device = llm.engine.device
    model = llm.engine.core.runner.model
    vocab = model.config.vocab_size
    max_len = llm.engine.core.max_model_len
    llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)  # warm-up

    # 1. Decode steps at new KV lengths, first, before any other run has touched those lengths.
    kv_start = max(2, min(args.kv_length_start, max_len - args.kv_lengths - 2))
    kv_prompt = synthetic_workload(1, vocab, args.seed + 1, kv_start, 1)[0].prompt_token_ids
    steps = decode_step_times(llm, kv_prompt, args.kv_lengths)
    step_spread = max(steps) / min(steps)

    # 2. Batch 1: time to first token and ms per token, beside the bandwidth floor.
    single = synthetic_workload(1, vocab, args.seed, args.input_len, args.output_len)
    latencies = [_generate(llm, single)[1][0] for _ in range(3)]
    ttft_ms = 1000 * statistics.median(o.time_to_first_token for o in latencies)
    tpot_ms = 1000 * statistics.median(o.time_per_output_token for o in latencies)
    floor_ms = 1000 * decode_read_bytes(model) / measure_read_bandwidth(device)

    # 3. A batch of equal requests, and 4. a mixed workload.
    batch = synthetic_workload(args.batch_prompts, vocab, args.seed, args.input_len, args.output_len)
    mixed = synthetic_workload(args.mixed_prompts, vocab, args.seed, None, None, (16, min(512, max_len // 2)),
                               (16, min(256, max_len // 2)))
    batch_s, _ = _generate(llm, batch)
    mixed_s, _ = _generate(llm, mixed)
    batch_tps = sum(r.output_len for r in batch) / batch_s
    mixed_tps = sum(r.output_len for r in mixed) / mixed_s

    dtype = next(model.parameters()).dtype
    result: dict[str, Any] = {
        "model": args.model, "dtype": str(dtype), "device": str(device),
        "batch1": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "bandwidth_floor_ms": floor_ms,
                   "fraction_of_floor": floor_ms / tpot_ms, "input_len": args.input_len, "output_len": args.output_len},
        "kv_lengths": {"first": kv_start + 1, "count": len(steps), "median_ms": 1000 * statistics.median(steps),
                       "min_ms": 1000 * min(steps), "max_ms": 1000 * max(steps), "max_over_min": step_spread},
        "batch": {"num_requests": len(batch), "output_tokens_per_s": batch_tps},
        "mixed": {"num_requests": len(mixed), "output_tokens_per_s": mixed_tps},
    }
    rows = [("batch 1: time to first token (ms)", ttft_ms), ("batch 1: ms per output token", tpot_ms),
            ("bandwidth floor (ms/token)", floor_ms), ("floor / measured", floor_ms / tpot_ms),
            (f"decode step at {len(steps)} new KV lengths: median (ms)", 1000 * statistics.median(steps)),
            ("  slowest / fastest step", step_spread),
            (f"{len(batch)} x ({args.input_len} + {args.output_len}): output tokens/s", batch_tps),
            (f"mixed, {len(mixed)} requests: output tokens/s", mixed_tps)]
    if not args.no_hf:
        hf = load_hf_model(llm.engine.config.model, dtype, device)
        hf_tpot = _hf_batch1_ms_per_token(hf, single[0].prompt_token_ids, args.output_len)
        hf_batch = run_hf_static_batches(hf, batch, len(batch))["output_tokens_per_s"]
        hf_mixed = run_hf_static_batches(hf, mixed, args.hf_batch_size)["output_tokens_per_s"]
        result["hf"] = {"tpot_ms": hf_tpot, "batch_output_tokens_per_s": hf_batch,
                        "mixed_output_tokens_per_s": hf_mixed, "mixed_batch_size": args.hf_batch_size}
        result["speedup_vs_hf"] = {"batch1": hf_tpot / tpot_ms, "batch": batch_tps / hf_batch,
                                   "mixed": mixed_tps / hf_mixed}
        rows += [("HF batch 1: ms per output token", hf_tpot),
                 (f"HF {len(batch)} x ({args.input_len} + {args.output_len}): output tokens/s", hf_batch),
                 (f"HF mixed (static batches of {args.hf_batch_size}): output tokens/s", hf_mixed),
                 ("speed-up: batch 1 / batch / mixed", " / ".join(f"{x:.2f}x" for x in result["speedup_vs_hf"].values()))]
    print_table(f"bench suite: {args.model} ({dtype}, {device})", rows)
    write_json(args.output_json, result)
    return result
