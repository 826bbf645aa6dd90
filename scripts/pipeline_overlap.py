"""Throughput of pipeline parallelism with and without several batches in flight.

    .venv/bin/python scripts/pipeline_overlap.py MODEL [--dtype bfloat16] [--num-prompts 64]
        [--input-len 128] [--output-len 128] [--threads 2]

Runs the same batch of random prompts (ignore_eos) three ways and prints output tokens/s: one
process with all threads; two pipeline stages with one batch per stage in flight (the engine's
way); two stages with one batch at a time (each stage idles while the other works). With random
weights (a named shape) the stages draw their own weights, so the tokens differ between runs; the
amount of work does not.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from tokenmill import LLM, SamplingParams


def _throughput(args, pipeline_parallel_size: int, overlap: bool) -> float:
    llm = LLM(args.model, dtype=args.dtype, device="cpu", skip_tokenizer_init=True, kv_cache_memory="1GiB",
              pipeline_parallel_size=pipeline_parallel_size, max_num_seqs=args.num_prompts)
    if not overlap:  # one batch at a time: what the engine would do without a batch queue
        llm.engine.core.max_concurrent_batches = llm.engine.core.scheduler.max_concurrent_batches = 1
    rng = random.Random(0)
    vocab = llm.engine.core.model_config.vocab_size
    prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.input_len)]}
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    llm.shutdown()
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.model} {args.dtype}, {args.num_prompts} x ({args.input_len} + {args.output_len}), "
          f"{args.threads} threads in all")
    for label, pp, overlap in (("one process", 1, True), ("pp=2, a batch per stage in flight", 2, True),
                               ("pp=2, one batch at a time", 2, False)):
        print(f"{label:36s} {_throughput(args, pp, overlap):8.1f} output tokens/s", flush=True)


if __name__ == "__main__":
    main()
