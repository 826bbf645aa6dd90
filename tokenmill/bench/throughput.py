"""``tokenmill bench throughput``: a seeded offline workload through the engine (and optionally HF)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from tokenmill.bench.report import print_table, write_json
from tokenmill.bench.workload import synthetic_workload
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams


def run_throughput(llm: LLM, args) -> dict[str, Any]:
    vocab = llm.engine.model_config.vocab_size
    workload = synthetic_workload(args.num_prompts, vocab, args.seed, args.input_len, args.output_len,
                                  (args.min_input_len, args.max_input_len), (args.min_output_len, args.max_output_len))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in workload]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_in = sum(len(r.prompt_token_ids) for r in workload)
    ttfts = [o.time_to_first_token for o in outputs if o.time_to_first_token is not None]
    tpots = [o.time_per_output_token for o in outputs if o.time_per_output_token is not None]
    result: dict[str, Any] = {
        "model": args.model, "dtype": str(next(llm.engine.core.runner.model.parameters()).dtype),
        "num_requests": len(workload), "input_tokens": num_in, "output_tokens": num_out, "elapsed_s": elapsed,
        "requests_per_s": len(workload) / elapsed, "output_tokens_per_s": num_out / elapsed,
        "total_tokens_per_s": (num_in + num_out) / elapsed,
        "mean_ttft_ms": 1000 * statistics.fmean(ttfts) if ttfts else None,
        "mean_tpot_ms": 1000 * statistics.fmean(tpots) if tpots else None,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "prefix_cache_hit_rate": llm.engine.core.kv_cache_manager.prefix_cache_hit_rate,
        "num_preemptions": llm.engine.core.scheduler.num_preemptions,
    }
    rows = [("requests", len(workload)), ("input tokens", num_in), ("output tokens", num_out),
            ("elapsed (s)", elapsed), ("requests/s", result["requests_per_s"]),
            ("output tokens/s", result["output_tokens_per_s"]), ("total tokens/s", result["total_tokens_per_s"]),
            ("mean TTFT (ms)", result["mean_ttft_ms"] or 0.0), ("mean TPOT (ms)", result["mean_tpot_ms"] or 0.0),
            ("preemptions", result["num_preemptions"])]
    if args.compare_hf:
        from tokenmill.bench.hf_baseline import load_hf_model, run_hf_static_batches

        dtype = next(llm.engine.core.runner.model.parameters()).dtype
        hf = load_hf_model(llm.engine.config.model, dtype, llm.engine.device)
        hf_result = run_hf_static_batches(hf, workload, args.hf_batch_size)
        result["hf"] = hf_result
        result["speedup_vs_hf"] = result["output_tokens_per_s"] / hf_result["output_tokens_per_s"]
        rows += [(f"HF generate output tokens/s (static batch {args.hf_batch_size})", hf_result["output_tokens_per_s"]),
                 ("speed-up over HF (output tokens/s)", result["speedup_vs_hf"])]
    print_table(f"throughput: {args.model} ({result['dtype']})", rows)
    write_json(args.output_json, result)
    return result
