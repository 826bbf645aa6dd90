"""The ``tokenmill bench`` subcommands: their arguments and what each runs.

Benchmarks print tables and write JSON (``--output-json``); they are never part of the tests.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable


def add_bench_commands(sub, engine_args: Callable[[argparse.ArgumentParser], None], make_llm: Callable) -> None:
    """Adds ``bench`` and its subcommands to the top-level subparsers ``sub``; ``engine_args`` adds
    the engine's options to a parser and ``make_llm(args, skip_tokenizer_init)`` builds the LLM."""
    bench = sub.add_parser("bench", help="benchmarks (tables and JSON; never part of the tests)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    thr = bench_sub.add_parser("throughput", help="offline throughput on a seeded synthetic workload")
    engine_args(thr)
    thr.add_argument("--num-prompts", type=int, default=64)
    thr.add_argument("--input-len", type=int, help="fixed prompt length (default: random in the range)")
    thr.add_argument("--output-len", type=int, help="fixed output length (default: random in the range)")
    thr.add_argument("--min-input-len", type=int, default=16)
    thr.add_argument("--max-input-len", type=int, default=512)
    thr.add_argument("--min-output-len", type=int, default=8)
    thr.add_argument("--max-output-len", type=int, default=256)
    thr.add_argument("--compare-hf", action="store_true", help="also run transformers generate, same workload")
    thr.add_argument("--hf-batch-size", type=int, default=16, help="static batch size for --compare-hf")
    thr.add_argument("--no-progress", action="store_true")
    thr.add_argument("--output-json")
    thr.set_defaults(func=lambda args: _bench(args, make_llm))
    lat = bench_sub.add_parser("latency", help="batch-1 TTFT and ms/token beside the memory-bandwidth floor")
    engine_args(lat)
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--num-iters", type=int, default=3)
    lat.add_argument("--profile", metavar="DIR", help="after timing, run the request once more under torch.profiler: "
                     "DIR/trace.json, DIR/ops.txt and a table of time per output token by kernel or operator")
    lat.add_argument("--output-json")
    lat.set_defaults(func=lambda args: _bench(args, make_llm))
    sui = bench_sub.add_parser("suite", help="the whole comparison with HF on this device in one run: batch-1 "
                                             "latency and floor, a batch, a mixed workload, new KV lengths")
    engine_args(sui)
    sui.add_argument("--input-len", type=int, default=128)
    sui.add_argument("--output-len", type=int, default=128)
    sui.add_argument("--batch-prompts", type=int, default=64, help="requests of input-len + output-len tokens")
    sui.add_argument("--mixed-prompts", type=int, default=128, help="requests of 16-512 prompt, 16-256 output tokens")
    sui.add_argument("--hf-batch-size", type=int, default=32, help="HF's static batch size for the mixed workload")
    sui.add_argument("--kv-lengths", type=int, default=50, help="decode steps timed, each at a new KV length")
    sui.add_argument("--kv-length-start", type=int, default=1000, help="prompt length before those steps")
    sui.add_argument("--no-hf", action="store_true", help="skip the transformers runs")
    sui.add_argument("--output-json")
    sui.set_defaults(func=lambda args: _bench(args, make_llm))
    kvo = bench_sub.add_parser("kv-offload", help="time to first token after a long prefix: recomputed, from the "
                                                  "device prefix cache, from the KV tiers (give their options)")
    engine_args(kvo)
    kvo.add_argument("--prefix-len", type=int, default=2048)
    kvo.add_argument("--num-iters", type=int, default=3)
    kvo.add_argument("--output-json")
    kvo.set_defaults(func=lambda args: _bench(args, make_llm))
    ppl = bench_sub.add_parser("perplexity", help="perplexity on a held-out text (built in, or --text FILE)")
    engine_args(ppl)
    ppl.add_argument("--text", help="a UTF-8 text file (default: the built-in held-out text)")
    ppl.add_argument("--window", type=int, help="tokens per scoring window (default: the model's context)")
    ppl.add_argument("--output-json")
    ppl.set_defaults(func=lambda args: _bench(args, make_llm))
    qual = bench_sub.add_parser("quality", help="perplexity under each weight scheme (int8, int4, GPTQ) beside "
                                                "float32, on the held-out text")
    qual.add_argument("model", help="the float model (Hugging Face folder, GGUF, llama2.c .bin, smollm2-135m-instruct)")
    qual.add_argument("--tokenizer", help="tokenizer path when not in the model folder (llama2.c tokenizer.bin)")
    qual.add_argument("--device", default="cpu")
    qual.add_argument("--variants", nargs="+", metavar="DTYPE[:SCHEME]",
                      help="e.g. float32 float32:int8 bfloat16:int4-g64 float32:int4-channel float32:gptq=FOLDER "
                           "(default: a standard set; the first is the baseline)")
    qual.add_argument("--text", help="a UTF-8 text file (default: the built-in held-out text)")
    qual.add_argument("--window", type=int, help="tokens per scoring window (default 512)")
    qual.add_argument("--output-json")
    qual.set_defaults(func=_bench_quality)
    cmp = bench_sub.add_parser("compare", help="batch-1 decode of several variants (as bench quality names them) "
                                               "loaded together and timed in turn, round by round")
    cmp.add_argument("model", help="Hugging Face folder, GGUF, llama2.c .bin, or a named shape (smollm2-135m)")
    cmp.add_argument("--variants", nargs="+", required=True, metavar="DTYPE[:SCHEME][@K]",
                     help="e.g. bfloat16 bfloat16:int8 bfloat16:int4-g64 bfloat16:int4@8 (the first is the baseline; "
                          "@K: K decode steps per call)")
    cmp.add_argument("--rounds", type=int, default=6, help="rounds; each times every variant once (default 6)")
    cmp.add_argument("--input-len", type=int, default=128)
    cmp.add_argument("--output-len", type=int, default=128)
    cmp.add_argument("--tokenizer", help="tokenizer path when not in the model folder (llama2.c tokenizer.bin)")
    cmp.add_argument("--device", default="cpu")
    cmp.add_argument("--kv-cache-memory", default="256MiB", help="each variant's KV cache (default 256MiB)")
    cmp.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    cmp.add_argument("--num-scheduler-steps", type=int, default=1,
                     help="greedy decode steps per call of the C++ decode step for variants without '@K' "
                          "(default 1); e.g. --variants bfloat16 bfloat16@8 times both")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--output-json")
    cmp.set_defaults(func=_bench_compare)
    bsv = bench_sub.add_parser("serve", help="load a running server: TTFT, TPOT, ITL, E2E and throughput")
    bsv.add_argument("--base-url", default="http://127.0.0.1:8000")
    bsv.add_argument("--model", help="model name to send (default: the server's first)")
    bsv.add_argument("--num-prompts", type=int, default=200)
    bsv.add_argument("--request-rate", type=float, default=float("inf"),
                     help="Poisson arrivals per second (default inf: all at once)")
    bsv.add_argument("--input-len", type=int, default=128, help="synthetic prompt length in tokens")
    bsv.add_argument("--output-len", type=int, default=128, help="synthetic output length (ShareGPT: the cap)")
    bsv.add_argument("--dataset", help="ShareGPT-format JSON file instead of the synthetic workload")
    bsv.add_argument("--seed", type=int, default=0)
    bsv.add_argument("--output-json")
    bsv.set_defaults(func=_bench_serve)


def _bench(args, make_llm) -> None:
    if getattr(args, "compare_hf", False) or (args.bench_command == "suite" and not args.no_hf):
        from tokenmill.bench.hf_baseline import materialize_shape
        from tokenmill.config import parse_dtype
        from tokenmill.models.shapes import SHAPES

        if args.model in SHAPES and not os.path.exists(args.model):
            dtype = parse_dtype("float32" if args.dtype == "auto" else args.dtype)
            args.model = str(materialize_shape(args.model, dtype))  # one checkpoint that both engines load
    llm = make_llm(args, skip_tokenizer_init=args.bench_command != "perplexity")
    if args.bench_command == "throughput":
        from tokenmill.bench.throughput import run_throughput

        run_throughput(llm, args)
    elif args.bench_command == "suite":
        from tokenmill.bench.suite import run_suite

        run_suite(llm, args)
    elif args.bench_command == "kv-offload":
        from tokenmill.bench.kv_offload import run_kv_offload

        run_kv_offload(llm, args)
    elif args.bench_command == "perplexity":
        from tokenmill.bench.perplexity import run_perplexity

        run_perplexity(llm, args)
    else:
        from tokenmill.bench.latency import run_latency

        run_latency(llm, args)


def _bench_quality(args) -> None:
    from tokenmill.bench.quality import run_quality
    from tokenmill.models.fetch import resolve_model

    args.model = resolve_model(args.model)
    run_quality(args)


def _bench_compare(args) -> None:
    import torch

    from tokenmill.bench.compare import run_compare
    from tokenmill.models.fetch import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = resolve_model(args.model)
    run_compare(args)


def _bench_serve(args) -> None:
    from tokenmill.bench.serve import run_serve_bench

    run_serve_bench(args)


