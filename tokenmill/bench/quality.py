"""``tokenmill bench quality``: perplexity of one model under each weight scheme, beside its float32
baseline, on the held-out text of ``bench perplexity`` (scored through ``prompt_logprobs``).

A variant is ``DTYPE[:SCHEME[+SCHEME]]``: ``float32``, ``bfloat16:int8``, ``float32:int4-g64`` (``int4`` alone:
the default group size), ``float32:int4-channel``, ``float32:gptq=FOLDER`` for a GPTQ checkpoint of the same model, and
``kv-int8`` / ``kv-fp8`` for a quantized KV cache (``float32:kv-int8``, ``bfloat16:int8+kv-fp8``).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from tokenmill.bench.perplexity import HELD_OUT_TEXT, perplexity
from tokenmill.bench.report import write_json
from tokenmill.llm import LLM
from tokenmill.models.loader import weight_bytes

DEFAULT_VARIANTS = ("float32", "float32:int8", "float32:int4-g32", "float32:int4-g64", "float32:int4-g128",
                    "float32:int4-channel", "float32:kv-int8", "float32:kv-fp8", "bfloat16", "bfloat16:int8", "bfloat16:int4-g64",
                    "bfloat16:kv-int8")


def parse_variant(variant: str) -> tuple[str, dict[str, Any], str | None]:
    """``"bfloat16:int4-g64+kv-int8"`` -> ("bfloat16", LLM kwargs, GPTQ folder or None)."""
    dtype, _, schemes = variant.partition(":")
    kwargs: dict[str, Any] = {}
    folder = None
    for scheme in filter(None, schemes.split("+")):
        if scheme.startswith("gptq="):
            folder = scheme.removeprefix("gptq=")
        elif scheme in ("kv-int8", "kv-fp8"):
            kwargs["kv_cache_dtype"] = "int8" if scheme == "kv-int8" else "fp8_e4m3"
        elif scheme == "int8":
            kwargs["quantization"] = "int8"
        elif scheme == "int4":  # the load-time default group size
            kwargs["quantization"] = "int4"
        elif scheme.startswith("int4-"):
            size = scheme.removeprefix("int4-")
            if size != "channel" and not (size.startswith("g") and size[1:].isdigit()):
                raise ValueError(f"variant {variant!r}: an int4 scheme is int4, int4-gN (N the group size, e.g. "
                                 f"int4-g64) or int4-channel, got {scheme!r}")
            kwargs.update(quantization="int4", quantization_group_size=-1 if size == "channel" else int(size[1:]))
        else:
            raise ValueError(f"variant {variant!r}: a scheme is int8, int4, int4-gN, int4-channel, gptq=FOLDER, "
                             "kv-int8 or kv-fp8, joined with +")
    return dtype, kwargs, folder


def run_quality(args) -> list[dict[str, Any]]:
    text = Path(args.text).read_text() if args.text else HELD_OUT_TEXT
    results, baseline = [], None
    for variant in args.variants or DEFAULT_VARIANTS:
        dtype, kwargs, gptq_folder = parse_variant(variant)
        llm = LLM(gptq_folder or args.model, tokenizer=args.tokenizer, dtype=dtype, device=args.device,
                  max_num_seqs=8, kv_cache_memory="256MiB", **kwargs)
        token_ids = llm.tokenizer.encode(text)
        window = min(args.window or 512, llm.engine.core.max_model_len - 1)
        ppl, count = perplexity(llm, token_ids, window)
        baseline = baseline if baseline is not None else ppl
        results.append({"variant": variant, "perplexity": ppl, "change_vs_first": ppl / baseline - 1,
                        "weight_bytes": weight_bytes(llm.engine.core.runner.model), "tokens_scored": count})
        del llm
        gc.collect()
    print(f"\nperplexity on {'the built-in held-out text' if not args.text else args.text}: {args.model}")
    print(f"{'variant':<36} {'perplexity':>10} {'vs first':>9} {'weights MB':>11}")
    for r in results:
        print(f"{r['variant']:<36} {r['perplexity']:>10.3f} {100 * r['change_vs_first']:>+8.2f}% "
              f"{r['weight_bytes'] / 1e6:>11.1f}")
    write_json(args.output_json, {"model": args.model, "results": results})
    return results
