"""Weight-only quantized matrix products in Triton (CUDA, or CPU under the interpreter).

The same storage as the CPU kernel (``kernels/csrc/quant_linear.cpp``): centred 8-bit codes
(N, K) int8, or 4-bit nibbles (N, K / 2) in chunks of 32 inputs (byte ``16 c + j`` holds input
``32 c + j`` low and ``32 c + 16 + j`` high), with ``scale`` and ``scale * zero`` per (output,
group). Each program dequantizes (BLOCK_N, BLOCK_K) tiles of W in registers, in the activation
dtype, and multiplies them with its rows of x: the weight crosses memory once, as codes.

Decode (a few rows) reads a whole matrix for a handful of products, so the tiles are shaped for
bandwidth: narrow output blocks and, where that still leaves SMs idle, the inputs split across
programs (``split_k``) whose float32 partial sums are added in a fixed order (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class QuantLinearConfig:
    """One launch's tiling: rows x outputs x inputs per tile, input splits, and the product form
    (``use_dot``: tensor-core tl.dot, else multiply-and-sum on the CUDA cores, for 1-4 rows)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4


@triton.jit
def _quant_linear_kernel(x_ptr, codes_ptr, scales_ptr, szeros_ptr, out_ptr, M, N, K, num_groups, group_size,
                         k_per_split, stride_xm, stride_om, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNIFORM_GROUPS: tl.constexpr,
                         USE_DOT: tl.constexpr, PARTIAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (row block, output block, input split): out[m, n] (or the split's partial sum, float32
    at out + split * M * N) = sum over the split's k of x[m, k] * (scale[n, g(k)] * c[n, k] - sz[n, g(k)]).

    UNIFORM_GROUPS: every BLOCK_K tile lies inside one group (group_size % BLOCK_K == 0, K too), so a
    tile needs one scale per output; otherwise scales are gathered per element (any group size)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    m_mask, n_mask = offs_m < M, offs_n < N
    rows = offs_n[:, None].to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        w_mask = n_mask[:, None] & k_mask[None, :]
        if BITS == 8:
            centred = tl.load(codes_ptr + rows * K + offs_k[None, :], mask=w_mask, other=0).to(tl.float32)
        else:
            # BLOCK_K / 2 bytes hold BLOCK_K / 32 chunks of [16 low nibbles | 16 high nibbles].
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b_mask = n_mask[:, None] & (offs_b < k_end // 2)[None, :]
            packed = tl.load(codes_ptr + rows * (K // 2) + offs_b[None, :], mask=b_mask, other=0).to(tl.int32)
            packed = tl.reshape(packed, (BLOCK_N, BLOCK_K // 32, 16))
            both = tl.permute(tl.join(packed & 0xF, packed >> 4), (0, 1, 3, 2))  # (BLOCK_N, chunks, 2, 16)
            centred = tl.reshape(both, (BLOCK_N, BLOCK_K)).to(tl.float32) - 8.0
        if UNIFORM_GROUPS:
            g_offs = offs_n * num_groups + k0 // group_size
            scale = tl.load(scales_ptr + g_offs, mask=n_mask, other=0.0)[:, None]
            szero = tl.load(szeros_ptr + g_offs, mask=n_mask, other=0.0)[:, None]
        else:
            g_offs = offs_n[:, None] * num_groups + (offs_k // group_size)[None, :]
            scale = tl.load(scales_ptr + g_offs, mask=w_mask, other=0.0)
            szero = tl.load(szeros_ptr + g_offs, mask=w_mask, other=0.0)
        w = (scale * centred - szero).to(x.dtype)  # (BLOCK_N, BLOCK_K), rounded as the dot would see it
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if PARTIAL:
        tl.store(out_ptr + split.to(tl.int64) * M * N + out_offs, acc, mask=out_mask)
    else:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def choose_config(rows: int, out_features: int, in_features: int, group_size: int,
                  num_sms: int | None) -> QuantLinearConfig:
    """The tiling for ``rows`` x (N, K): wide tiles on tensor cores for batches; for decode, narrow
    output blocks and enough input splits that about two programs run per SM (``num_sms``: None off
    CUDA, where one program per block is simplest for the interpreter)."""
    block_k = 64 if group_size % 64 == 0 and in_features % 64 == 0 else 32
    if rows > 16:
        return QuantLinearConfig(64, 64, block_k)
    config = QuantLinearConfig(16, 16, block_k)
    if num_sms is None:
        return config
    blocks = triton.cdiv(out_features, config.block_n)
    split_k = 1
    while blocks * split_k < 2 * num_sms and in_features // (2 * split_k) >= 4 * block_k:
        split_k *= 2
    return QuantLinearConfig(16, 16, block_k, split_k)


def quant_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                 group_size: int, bits: int, bias: torch.Tensor | None,
                 config: QuantLinearConfig | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype; codes and (N, G) float32 scales as QuantizedMatrix holds them.
    ``config``: the tiling (default: ``choose_config``'s)."""
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features).contiguous()
    rows, out_features = x2.shape[0], codes.shape[0]
    if config is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else None
        config = choose_config(rows, out_features, in_features, group_size, sms)
    block_k = config.block_k
    uniform = group_size % block_k == 0 and in_features % block_k == 0
    k_per_split = triton.cdiv(triton.cdiv(in_features, config.split_k), block_k) * block_k  # whole tiles
    split_k = triton.cdiv(in_features, k_per_split)
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    target = out if split_k == 1 else torch.empty(split_k, rows, out_features, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows, config.block_m), triton.cdiv(out_features, config.block_n), split_k)
    _quant_linear_kernel[grid](x2, codes, scales, scaled_zeros, target, rows, out_features, in_features,
                               scales.shape[1], group_size, k_per_split, x2.stride(0), out.stride(0), BITS=bits,
                               BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
                               UNIFORM_GROUPS=uniform, USE_DOT=config.use_dot, PARTIAL=split_k > 1,
                               DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                               num_warps=config.num_warps)
    if split_k > 1:  # the splits' float32 sums, added in order (and the bias), rounded once
        out.copy_(target.sum(0) if bias is None else target.sum(0) + bias)
    elif bias is not None:
        out += bias
    return out.view(*x.shape[:-1], out_features)
