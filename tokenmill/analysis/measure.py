"""``--measure``: run the engine on this machine at the analysed shapes, and compare with the prediction."""

from __future__ import annotations

import random
import statistics

from tokenmill.analysis.analyzer import AnalysisReport


def measure_engine(model_dir: str, r: AnalysisReport) -> dict:
    """Runs ``batch_size`` requests of ``input_len`` + ``output_len`` tokens; returns measured vs predicted."""
    from tokenmill import LLM, SamplingParams

    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "bfloat16"}.get(r.dtype, "bfloat16")
    llm = LLM(model_dir, dtype=dtype, skip_tokenizer_init=True,
              max_num_batched_tokens=max(2048, r.batch_size * r.input_len))
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(r.input_len)]}
               for _ in range(r.batch_size)]
    params = SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    llm.engine.core.kv_cache_manager.pool.reset_prefix_cache()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    ttft = max(o.time_to_first_token for o in outputs)
    tpot = statistics.fmean(o.time_per_output_token for o in outputs if o.time_per_output_token)
    return {"measured_ttft_s": ttft, "predicted_ttft_s": r.prefill_time_s, "ttft_ratio": ttft / r.prefill_time_s,
            "measured_ms_per_token": 1000 * tpot, "predicted_ms_per_token": 1000 * r.decode_time_s,
            "ms_per_token_ratio": tpot / r.decode_time_s}


def measure_offload(model_dir: str, plan) -> dict:
    """Runs the engine with ``plan``'s placement (an OffloadPlan): its batch of ``input_len`` + ``output_len``
    token requests at once; returns measured vs predicted output tokens/s."""
    import tempfile
    import time

    import torch

    from tokenmill import LLM, SamplingParams

    cuda = torch.cuda.is_available()
    dtype, quantization = {"fp32": ("float32", None), "fp16": ("float16" if cuda else "bfloat16", None),
                           "bf16": ("bfloat16", None), "int8": ("bfloat16", "int8"),
                           "int4": ("bfloat16", "int4")}[plan.dtype]
    options = plan.engine_options()
    with tempfile.TemporaryDirectory(prefix="tokenmill-analyze-") as folder:
        if "max_weight_memory" in options:
            options["offload_folder"] = folder
        llm = LLM(model_dir, dtype=dtype, quantization=quantization, skip_tokenizer_init=True,
                  max_num_batched_tokens=plan.budgets.max_num_batched_tokens, offload_prefetch=plan.budgets.prefetch,
                  kv_cache_dtype="auto", **options)
        vocab = llm.engine.model_config.vocab_size
        rng = random.Random(0)
        batch = plan.best.batch_size
        prompts = [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(plan.input_len)]}
                   for _ in range(batch)]
        params = SamplingParams(temperature=0, max_tokens=plan.output_len, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        llm.engine.core.kv_cache_manager.pool.reset_prefix_cache()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        llm.shutdown()
    measured = sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed
    return {"batch_size": batch, "engine_options": options, "measured_tokens_per_s": measured,
            "predicted_tokens_per_s": plan.best.tokens_per_s, "tokens_per_s_ratio": measured / plan.best.tokens_per_s}
