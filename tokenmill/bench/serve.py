"""``tokenmill bench serve``: load a running server with Poisson (or all-at-once) arrivals.

Each request streams from /v1/completions. TTFT is the time to the first text chunk, inter-token
latency (ITL) the gaps between chunks, TPOT ``(e2e - ttft) / (output tokens - 1)``. Output
token counts come from the server's ``usage``.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class BenchRequest:
    prompt: str | list[int]
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def synthetic_workload(num: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    """Token-id prompts (ids in [3, 256), valid for any vocabulary of 256 or more)."""
    rng = random.Random(seed)
    return [BenchRequest([rng.randrange(3, 256) for _ in range(input_len)], output_len) for _ in range(num)]


def sharegpt_workload(path: str, num: int, max_output_len: int, seed: int) -> list[BenchRequest]:
    """First human turn as the prompt; the reply's length (~4 characters a token) as max_tokens."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    pairs = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or []
        if len(turns) >= 2 and turns[0].get("value") and turns[1].get("value"):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    if not pairs:
        raise ValueError(f"{path}: no conversations with a prompt and a reply (ShareGPT format expected)")
    random.Random(seed).shuffle(pairs)
    return [BenchRequest(prompt, max(1, min(max_output_len, len(reply) // 4))) for prompt, reply in pairs[:num]]


async def _one(http: httpx.AsyncClient, url: str, model: str, req: BenchRequest, ignore_eos: bool) -> RequestResult:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    result.ok = True
    return result


async def run_benchmark(url: str, model: str, requests: list[BenchRequest], request_rate: float, seed: int,
                        ignore_eos: bool) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as http:
        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(_one(http, url, model, req, ignore_eos)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return {"mean": statistics.fmean(values), "median": statistics.median(values), "p90": pct(90), "p99": pct(99)}


def summarize(results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
        "request_throughput": len(done) / duration, "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration,
        "ttft_ms": {k: v * 1e3 for k, v in _summary([r.ttft for r in done]).items()},
        "tpot_ms": {k: v * 1e3 for k, v in _summary(tpot).items()},
        "itl_ms": {k: v * 1e3 for k, v in _summary([x for r in done for x in r.itl]).items()},
        "e2e_ms": {k: v * 1e3 for k, v in _summary([r.e2e for r in done]).items()},
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def format_summary(s: dict) -> str:
    lines = [f"completed {s['completed']} requests ({s['failed']} failed) in {s['duration_s']:.2f} s",
             f"request throughput {s['request_throughput']:.2f} req/s, output {s['output_tokens_per_s']:.1f} tokens/s",
             "", f"{'metric (ms)':<14}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        m = s[f"{name}_ms"]
        lines.append(f"{name.upper():<14}{m['mean']:>10.1f}{m['median']:>10.1f}{m['p90']:>10.1f}{m['p99']:>10.1f}")
    lines += [f"error: {e}" for e in s["errors"]]
    return "\n".join(lines)


def run_serve_bench(args) -> dict:
    url = args.base_url.rstrip("/")
    model = args.model or httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    if args.dataset:
        requests = sharegpt_workload(args.dataset, args.num_prompts, args.output_len, args.seed)
    else:
        requests = synthetic_workload(args.num_prompts, args.input_len, args.output_len, args.seed)
    results, duration = asyncio.run(run_benchmark(url, model, requests, args.request_rate, args.seed,
                                                  ignore_eos=not args.dataset))
    summary = {"base_url": url, "model": model, "num_prompts": len(requests), "request_rate": args.request_rate,
               "dataset": args.dataset or f"synthetic {args.input_len} in / {args.output_len} out",
               **summarize(results, duration)}
    print(format_summary(summary))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary
