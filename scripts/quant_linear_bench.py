"""Time of the Triton weight-only int8/int4 matmul against bf16 ``F.linear`` at decode shapes (CUDA).

    PYTHONPATH=. python3 scripts/quant_linear_bench.py [--rows 1 8 32] [--sweep]

The `llama-1b` projections (qkv 3072x2048, o 2048x2048, gate_up 16384x2048, down 2048x8192, head
128256x2048), bf16 activations, int4 in groups of 64. Each time is one call's mean over a CUDA graph
of calls (``triton.testing.do_bench_cudagraph``): the kernel without launch overhead, as a decode
step replays it. ``--sweep`` also times a grid of tilings per shape and prints the best beside the
default (``choose_config``), in GB/s of weight bytes read. Beside them, torch's own CUDA int4 matmul
(``aten._weight_int4pack_mm``, "tinygemm", as gpt-fast and torchao use it; same groups, bf16 scales
and zeros), a candidate kernel for 4-bit decode: its time at each row count says what it would cost
prompts as well as decode.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

from tokenmill.kernels.triton_quant_linear import QuantLinearConfig, choose_config, quant_linear

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
          "head": (128256, 2048)}
GROUP = 64
TILES = [(16, 64, True), (16, 128, True), (32, 64, True), (32, 128, True), (64, 64, True),
         (16, 128, False), (32, 128, False), (64, 64, False), (16, 256, False), (32, 256, False)]


def weights(bits: int, n: int, k: int):
    codes = (torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda") if bits == 8
             else torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda"))
    group = k if bits == 8 else GROUP
    scales = torch.rand(n, k // group, device="cuda") * 0.01
    szeros = torch.rand(n, k // group, device="cuda") * 0.01
    return codes, scales, szeros, group


def tinygemm_time(x: torch.Tensor, n: int, k: int) -> float | None:
    """Microseconds per call of torch's int4 matmul at this shape (None where this torch or GPU lacks it)."""
    try:
        nibbles = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, 8)
        scales_and_zeros = (torch.rand(k // GROUP, n, 2, device="cuda") * 0.01).to(torch.bfloat16)
        return timed(lambda: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, scales_and_zeros))
    except (RuntimeError, AttributeError) as error:
        print(f"  torch int4 matmul unavailable: {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
        return None


def timed(fn) -> float:
    """Microseconds per call."""
    return do_bench_cudagraph(fn, rep=30) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(0), f"{sms} SMs", flush=True)
    for rows, (name, (n, k)) in itertools.product(args.rows, SHAPES.items()):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        base = timed(lambda: F.linear(x, dense))
        line = [f"rows {rows:3d} {name:8s} {n}x{k}: bf16 {base:7.1f} us ({n * k * 2 / base / 1e3:6.0f} GB/s)"]
        for bits in (8, 4):
            codes, scales, szeros, group = weights(bits, n, k)
            nbytes = codes.numel() + scales.numel() * 8

            def run(config=None):
                return quant_linear(x, codes, scales, szeros, group, bits, None, config)
            default = choose_config(rows, n, k, group, sms)
            t = timed(run)
            line.append(f"int{bits} {t:7.1f} us ({nbytes / t / 1e3:5.0f} GB/s, {base / t:4.2f}x)")
            if args.sweep:
                best = (t, default)
                for (block_n, block_k, use_dot), split_k, warps in itertools.product(TILES, (1, 2, 4, 8), (4, 8)):
                    if k // split_k < block_k or (use_dot and rows > 16):
                        continue
                    block_m = 16 if use_dot else triton.next_power_of_2(rows)
                    config = QuantLinearConfig(block_m, block_n, block_k, split_k, use_dot, warps)
                    try:
                        best = min(best, (timed(lambda: run(config)), config), key=lambda pair: pair[0])
                    except Exception as error:  # a tiling this GPU cannot hold: skip it
                        print(f"  skipped {config}: {type(error).__name__}", flush=True)
                line.append(f"best {best[0]:6.1f} us {best[1]}")
        tinygemm = tinygemm_time(x, n, k)
        if tinygemm is not None:
            line.append(f"torch int4 {tinygemm:7.1f} us ({base / tinygemm:4.2f}x)")
        print(" | ".join(line), f"| default {choose_config(rows, n, k, GROUP, sms)}", flush=True)


if __name__ == "__main__":
    main()
