"""``tokenmill bench compare``: batch-1 decode of several variants of one model (``DTYPE[:SCHEME]``, as
``bench quality`` names them: ``bfloat16``, ``bfloat16:int8``, ``bfloat16:int4-g64``, ...; ``@K`` after one
runs it with K decode steps per call, ``num_scheduler_steps``), all loaded in one process and timed in
turn, round after round.

A CPU's memory system drifts by 10-30% from minute to minute (other tenants, frequency, page placement),
and decode at batch 1 is bound by it: two ``bench latency`` runs minutes apart compare the machine as
much as the engines. Here every round times each variant once, back to back, in an order that rotates
from round to round, and each variant's speed-up over the first is taken within the round; the medians
of those per-round ratios are what the table reports.
"""

from __future__ import annotations

import statistics
from typing import Any

from tokenmill.bench.latency import prepare_request, time_request
from tokenmill.bench.quality import parse_variant
from tokenmill.bench.report import write_json
from tokenmill.llm import LLM
from tokenmill.models.loader import decode_read_bytes


def rotated(items: list, round_index: int) -> list:
    """``items`` starting at position ``round_index`` (mod its length): round r runs variant r first."""
    start = round_index % len(items)
    return items[start:] + items[:start]


def split_steps(variant: str, default: int) -> tuple[str, int]:
    """``DTYPE[:SCHEME][@K]`` -> (``DTYPE[:SCHEME]``, K decode steps per call, else ``default``)."""
    name, at, steps = variant.partition("@")
    if not at:
        return variant, default
    if not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"variant {variant!r}: the decode steps after '@' must be a positive integer, got {steps!r}")
    return name, int(steps)


def run_compare(args) -> dict[str, Any]:
    if len(args.variants) < 2:
        raise ValueError(f"bench compare needs at least two variants (the first is the baseline), got {args.variants}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    if args.num_scheduler_steps < 1:
        raise ValueError(f"--num-scheduler-steps must be at least 1, got {args.num_scheduler_steps}")
    for variant in args.variants:  # parse every variant before loading any, so a typo fails at once
        parse_variant(split_steps(variant, args.num_scheduler_steps)[0])
    engines = []  # (index, LLM, prompt, params); a variant may repeat (the same engine twice: the noise floor)
    for index, variant in enumerate(args.variants):
        name, num_steps = split_steps(variant, args.num_scheduler_steps)
        dtype, kwargs, gptq_folder = parse_variant(name)
        llm = LLM(gptq_folder or args.model, tokenizer=args.tokenizer, dtype=dtype, device=args.device,
                  max_num_seqs=1, kv_cache_memory=args.kv_cache_memory, skip_tokenizer_init=True,
                  num_scheduler_steps=num_steps, **kwargs)
        prompt, params = prepare_request(llm, args.seed, args.input_len, args.output_len)
        engines.append((index, llm, prompt, params))
    tpots: list[list[float]] = [[] for _ in args.variants]  # ms per output token, by variant, round by round
    for r in range(args.rounds):
        for index, llm, prompt, params in rotated(engines, r):
            tpots[index].append(1000 * time_request(llm, prompt, params)[1])
    results = []
    for index, llm, _, _ in engines:
        speedups = [b / t for b, t in zip(tpots[0], tpots[index])]  # within each round
        results.append({
            "variant": args.variants[index],
            "num_scheduler_steps": llm.engine.core.scheduler.config.num_scheduler_steps,
            "tpot_ms": statistics.median(tpots[index]),
            "tpot_ms_rounds": tpots[index], "speedup_vs_first": statistics.median(speedups),
            "speedup_vs_first_rounds": speedups, "decode_read_bytes": decode_read_bytes(llm.engine.core.runner.model)})
    _print_results(args, results)
    report = {"model": args.model, "input_len": args.input_len, "output_len": args.output_len,
              "rounds": args.rounds, "results": results}
    write_json(args.output_json, report)
    return report


def _print_results(args, results: list[dict[str, Any]]) -> None:
    print(f"\nbatch-1 decode, {args.rounds} rounds, variants in turn: {args.model} "
          f"({args.input_len} prompt + {args.output_len} output tokens)")
    print(f"{'variant':<28} {'steps/call':>10} {'read/token MB':>13} {'ms/token':>9} {'min-max':>13} {'vs first':>9}"
          "  per round")
    for r in results:
        spread = f"{min(r['tpot_ms_rounds']):.2f}-{max(r['tpot_ms_rounds']):.2f}"
        rounds = " ".join(f"{s:.2f}" for s in r["speedup_vs_first_rounds"])
        print(f"{r['variant']:<28} {r['num_scheduler_steps']:>10} {r['decode_read_bytes'] / 1e6:>13.1f} "
              f"{r['tpot_ms']:>9.2f} {spread:>13} {r['speedup_vs_first']:>8.2f}x  {rounds}")
