"""The ``tokenmill`` command: generate, demo, bench throughput, bench latency."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from tokenmill.analysis.commands import add_analyze_command
from tokenmill.bench.commands import add_bench_commands
from tokenmill.config import QUANTIZATION_CHOICES


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face folder, GGUF file, llama2.c .bin checkpoint, smollm2-135m-instruct "
                                 "(a real model, fetched once), or a named shape (smollm2-135m, llama-1b, "
                                 "tiny-llama) with random weights")
    p.add_argument("--tokenizer", help="tokenizer path when not in the model folder (llama2.c tokenizer.bin)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--kv-cache-memory", help="KV cache budget, e.g. 2GiB or 512MiB (default: from free memory)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests per step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="most tokens per step")
    p.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's context)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    p.add_argument("--attention-backend", default="auto", help="auto, torch (portable) or cpu (C++ decode kernel)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES,
                   help="quantize a float checkpoint's weights at load: int8 (per channel) or int4 (groups); "
                        "GPTQ checkpoints and GGUF Q8_0/Q4_0 matrices run as stored without it (gptq, gguf); "
                        "none dequantizes a GGUF file")
    p.add_argument("--quantization-group-size", type=int, help="int4: 32, 64 (default), 128 or -1 (per channel)")
    p.add_argument("--no-quantize-lm-head", action="store_true", help="keep the LM head in the model dtype")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8_e4m3"],
                   help="auto (the model's dtype), int8 (a float16 scale per token and head: ~2x the tokens) or "
                        "fp8_e4m3 (a per-tensor scale: 2x)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="processes that each hold 1/N of the model (CPU, gloo); the engine starts the workers")
    p.add_argument("--pipeline-parallel-size", type=int, default=1,
                   help="processes that each hold a range of the layers, one batch in flight per stage (CPU, gloo); "
                        "combines with --tensor-parallel-size")
    p.add_argument("--cpu-offload-gb", type=float, default=0.0,
                   help="CUDA: GiB of weights kept in pinned CPU memory and streamed to the GPU unit by unit "
                        "(with --offload-folder: the pinned part of what leaves the GPU, the rest on disk)")
    p.add_argument("--offload-folder", help="with --max-weight-memory: weights past the budget go to files here")
    p.add_argument("--max-weight-memory", help="with --offload-folder: the most weight memory kept resident, "
                                               "e.g. 32MiB")
    p.add_argument("--no-offload-prefetch", action="store_true",
                   help="move an offloaded unit only when it is needed (not while the one before computes)")
    p.add_argument("--kv-offload-memory", help="a KV tier in CPU memory (pinned on CUDA), e.g. 4GiB: prefix blocks "
                                               "the device pool evicts are kept there and loaded back on a hit")
    p.add_argument("--kv-offload-folder", help="a KV tier on disk (after the memory tier): one checksummed file per "
                                               "evicted prefix block")
    p.add_argument("--kv-offload-disk-space", default="4GiB", help="the most the --kv-offload-folder files take")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: no CUDA graphs; every decode step runs the Python forward")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: place whole experts of MoE layers on the ranks")
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="CPU: up to this many greedy decode steps per call of the C++ decode step while every "
                        "running request decodes greedily (no sampling, logprobs or penalties) "
                        "and none waits; tokens then arrive in bursts")


def _engine_kwargs(args) -> dict:
    return dict(tokenizer=args.tokenizer, attention_backend=args.attention_backend, dtype=args.dtype,
                device=args.device, kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
                quantization=args.quantization, quantization_group_size=args.quantization_group_size,
                quantize_lm_head=not args.no_quantize_lm_head, kv_cache_dtype=args.kv_cache_dtype,
                tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
                pipeline_parallel_size=args.pipeline_parallel_size, cpu_offload_gb=args.cpu_offload_gb,
                offload_folder=args.offload_folder, max_weight_memory=args.max_weight_memory,
                offload_prefetch=not args.no_offload_prefetch, kv_offload_memory=args.kv_offload_memory,
                kv_offload_folder=args.kv_offload_folder, kv_offload_disk_space=args.kv_offload_disk_space,
                enforce_eager=args.enforce_eager, num_scheduler_steps=args.num_scheduler_steps)


def _make_llm(args, skip_tokenizer_init: bool = False):
    from tokenmill import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    return LLM(args.model, skip_tokenizer_init=skip_tokenizer_init, **_engine_kwargs(args))


def _serve(args) -> None:
    import dataclasses

    from tokenmill.distributed.launch import launched_tensor_parallel_size, torchrun_rank
    from tokenmill.llm import engine_config
    from tokenmill.server.main import serve

    config = engine_config(args.model, **_engine_kwargs(args))
    launched = torchrun_rank()
    if launched is not None:  # started by torchrun: every process is a rank; rank 0 serves
        config = dataclasses.replace(config, tensor_parallel_size=launched_tensor_parallel_size(
            config.tensor_parallel_size, config.pipeline_parallel_size, launched))
        if launched.rank != 0:
            from tokenmill.distributed.worker import worker_main

            worker_main(launched.rank, launched.world_size, launched.master_port, config, torch.get_num_threads(),
                        launched.master_addr)
            return
    serve(config, args)


def _generate(args) -> None:
    from tokenmill import SamplingParams

    # The flags are checked first: a bad value fails at once, not after the model has loaded.
    early_stopping = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            max_tokens=args.max_tokens, min_tokens=args.min_tokens, ignore_eos=args.ignore_eos,
                            seed=args.seed if args.temperature > 0 else None, stop=args.stop or [],
                            stop_token_ids=args.stop_token_id or [], repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            no_repeat_ngram_size=args.no_repeat_ngram_size, bad_words=args.bad_word or [],
                            bad_words_token_ids=[_parse_ids(w) for w in args.bad_word_ids or []],
                            skip_special_tokens=not args.keep_special_tokens, prompt_logprobs=args.prompt_logprobs,
                            logit_bias=dict(_parse_bias(b) for b in args.logit_bias or []), n=args.n,
                            best_of=args.best_of, logprobs=args.logprobs, beam_width=args.beam_width,
                            length_penalty=args.length_penalty, early_stopping=early_stopping)
    llm = _make_llm(args)
    engine = llm.engine
    # --chat: the prompt is a user's message, rendered with the model's chat template; only the answer is shown.
    prompt = engine.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    shown = "" if args.chat else args.prompt
    engine.add_request(prompt, params)
    streaming = params.n == 1 and params.best_of is None and not params.use_beam_search
    if streaming:
        sys.stdout.write(shown)
        sys.stdout.flush()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if streaming:
                sys.stdout.write(out.outputs[0].delta_text)
                sys.stdout.flush()
            if out.finished:
                final = out
    if streaming:
        sys.stdout.write("\n")
    else:  # several completions (n, best_of, beams): each in full, best first where ranked
        for c in final.outputs:
            score = "" if c.cumulative_logprob is None else f" cumulative logprob {c.cumulative_logprob:.4f}"
            print(f"--- completion {c.index}{score} ---\n{shown}{c.text}")
    if params.logprobs is not None or params.prompt_logprobs is not None:
        _print_logprobs(llm, final, params)
    c = final.outputs[0]
    tpot = final.time_per_output_token
    print(f"[{len(c.token_ids)} tokens, finish_reason={c.finish_reason}, TTFT {1000 * final.time_to_first_token:.1f} ms"
          + (f", {1000 * tpot:.2f} ms/token" if tpot else "") + "]", file=sys.stderr)


def _print_logprobs(llm, output, params) -> None:
    """One line per token: the token, its logprob, and the K most likely tokens at that position
    (the chosen one among them, marked *, when it is one of the K)."""
    def show(token_id: int) -> str:
        return repr(llm.tokenizer.decode([token_id], skip_special_tokens=False)) if llm.tokenizer else str(token_id)

    def line(token_id: int, entry: dict[int, float], k: int) -> str:
        top = sorted(entry.items(), key=lambda item: item[1], reverse=True)[:k]
        listed = ", ".join(f"{'*' if t == token_id else ''}{show(t)} {lp:.3f}" for t, lp in top)
        return f"{show(token_id):>16} {entry[token_id]:8.3f}" + (f"   | top {k}: {listed}" if k else "")

    if output.prompt_logprobs is not None:
        print("--- logprobs of the prompt ---")
        for token_id, entry in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:]):
            print(line(token_id, entry, params.prompt_logprobs))
    for c in output.outputs:
        if c.logprobs is None:
            continue
        print(f"--- logprobs of completion {c.index} ---")
        for token_id, entry in zip(c.token_ids, c.logprobs):
            print(line(token_id, entry, params.logprobs or 0))


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--bad-word-ids takes comma-separated token ids (e.g. 17,42), got {text!r}") from None


def _parse_bias(text: str) -> tuple[int, float]:
    token, _, value = text.partition("=")
    try:
        return int(token), float(value)
    except ValueError:
        raise ValueError(f"--logit-bias takes TOKEN_ID=VALUE (e.g. 42=-5), got {text!r}") from None


def _quantize(args) -> None:
    from pathlib import Path

    from tokenmill.models.fetch import resolve_model
    from tokenmill.quantize.quantizer import QuantizeOptions, quantize_model

    if args.threads:
        torch.set_num_threads(args.threads)
    options = QuantizeOptions(args.method, args.bits, args.group_size, args.sym, args.desc_act, args.damp,
                              args.num_samples, args.seq_len)
    from tokenmill.quantize.quantizer import BUILTIN_CALIBRATION

    text = Path(args.calibration or BUILTIN_CALIBRATION).read_text()
    out = quantize_model(resolve_model(args.model), args.out, options, text, args.tokenizer)
    print(f"wrote {out} ({options.method}, {options.bits}-bit, group {options.group_size})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    _engine_args(gen)
    gen.add_argument("--prompt", required=True,
                     help="the prompt text; an empty one generates from BOS alone (as llama2.c's run does)")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the model's chat template; print the answer")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="Hugging Face semantics; 1 = off")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI semantics, in [-2, 2]")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI semantics, in [-2, 2]")
    gen.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size")
    gen.add_argument("--bad-word", action="append", help="a word never to generate (repeatable)")
    gen.add_argument("--logit-bias", action="append", metavar="TOKEN_ID=VALUE", help="add VALUE to a token's logit")
    gen.add_argument("--bad-word-ids", action="append", metavar="ID,ID,...",
                     help="a token sequence never to generate (repeatable)")
    gen.add_argument("--keep-special-tokens", action="store_true", help="keep special tokens in the text")
    gen.add_argument("--prompt-logprobs", type=int,
                     help="print each prompt token's logprob and the K most likely tokens at its position (0-20)")
    gen.add_argument("--min-tokens", type=int, default=0, help="no EOS or stop token before this many tokens")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS")
    gen.add_argument("--stop-token-id", type=int, action="append", help="token id that ends generation (repeatable)")
    gen.add_argument("--n", type=int, default=1, help="how many completions (samples, or best beams)")
    gen.add_argument("--best-of", type=int, help="sample this many, return the n most likely")
    gen.add_argument("--logprobs", type=int,
                     help="print each token's logprob and the K most likely tokens at its position (0-20)")
    gen.add_argument("--beam-width", type=int, default=1, help="beam search with this many beams when > 1")
    gen.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length ** this")
    gen.add_argument("--early-stopping", default="false", choices=["true", "false", "never"],
                     help="beam search stopping rule (Hugging Face semantics)")
    gen.set_defaults(func=_generate)

    demo = sub.add_parser("demo", help="run a mixed batch on the embedded default model (random weights)")
    demo.set_defaults(func=lambda args: __import__("tokenmill.demo", fromlist=["run_demo"]).run_demo())

    add_analyze_command(sub)

    qnt = sub.add_parser("quantize", help="GPTQ or round-to-nearest quantization of a float model, written as a "
                                          "GPTQ (v1) checkpoint folder")
    qnt.add_argument("model", help="Hugging Face folder, GGUF file, llama2.c .bin or smollm2-135m-instruct")
    qnt.add_argument("out", help="the folder to write")
    qnt.add_argument("--tokenizer", help="tokenizer path when not in the model (llama2.c tokenizer.bin)")
    qnt.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    qnt.add_argument("--bits", type=int, choices=[4, 8], default=4)
    qnt.add_argument("--group-size", type=int, default=128, help="inputs per scale and zero; -1: per channel")
    qnt.add_argument("--desc-act", action="store_true", help="GPTQ act-order")
    qnt.add_argument("--sym", action="store_true", help="symmetric (default: asymmetric, a zero point per group)")
    qnt.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, a fraction of mean(diag H)")
    qnt.add_argument("--calibration", help="a UTF-8 text file for GPTQ (default: a built-in ~900-word text, "
                                           "different from bench perplexity's held-out text)")
    qnt.add_argument("--num-samples", type=int, default=16, help="calibration windows")
    qnt.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    qnt.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    qnt.set_defaults(func=_quantize)

    add_bench_commands(sub, _engine_args, _make_llm)
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)")
    _engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1 routes (default: $TOKENMILL_API_KEY)")
    srv.add_argument("--served-model-name",
                     help="the model name clients send (default: the model's folder or file name)")
    srv.add_argument("--max-queued-requests", type=int, default=1024,
                     help="requests that may wait beyond max_num_seqs; past that, 503 with Retry-After")
    srv.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is aborted")
    srv.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body accepted")
    srv.add_argument("--no-engine-process", action="store_true",
                     help="step the engine in a thread of the server process (to measure what the split buys)")
    srv.add_argument("--data-parallel-size", type=int, default=1,
                     help="engine replicas (processes, each with its own KV cache) behind a prefix-aware router")
    srv.add_argument("--router-policy", default="prefix", choices=["prefix", "round_robin"],
                     help="with --data-parallel-size: prefix-aware with a load guard (default) or round robin")
    srv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    from tokenmill.errors import TokenmillError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (TokenmillError, ValueError, FileNotFoundError) as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
