"""Weight-only quantized matrix products in Triton (CUDA, or CPU under the interpreter).

The same storage as the CPU kernel (``kernels/csrc/quant_linear.cpp``): centred 8-bit codes
(N, K) int8, or 4-bit nibbles (N, K / 2) in chunks of 32 inputs (byte ``16 c + j`` holds input
``32 c + j`` low and ``32 c + 16 + j`` high), with ``scale`` and ``scale * zero`` per (output,
group). Each program dequantizes a (BLOCK_N, BLOCK_K) tile of W in registers, in the activation
dtype, and multiplies it with tl.dot: the weight crosses memory once, as codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quant_linear_kernel(x_ptr, codes_ptr, scales_ptr, szeros_ptr, out_ptr, M, N, K, num_groups, group_size,
                         stride_xm, stride_om, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, UNIFORM_GROUPS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (row block, output block): out[m, n] = sum_k x[m, k] * (scale[n, g(k)] * c[n, k] - sz[n, g(k)]).

    UNIFORM_GROUPS: every BLOCK_K tile lies inside one group (group_size % BLOCK_K == 0, K too), so a
    tile needs one scale per output; otherwise scales are gathered per element (any group size)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    rows = offs_n[:, None].to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        w_mask = n_mask[:, None] & k_mask[None, :]
        if BITS == 8:
            centred = tl.load(codes_ptr + rows * K + offs_k[None, :], mask=w_mask, other=0).to(tl.float32)
        else:
            # BLOCK_K / 2 bytes hold BLOCK_K / 32 chunks of [16 low nibbles | 16 high nibbles].
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b_mask = n_mask[:, None] & (offs_b < K // 2)[None, :]
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
        w = (scale * centred - szero).to(x.dtype)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def quant_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                 group_size: int, bits: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype; codes and (N, G) float32 scales as QuantizedMatrix holds them."""
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features).contiguous()
    rows, out_features = x2.shape[0], codes.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    # Decode (few rows): narrow output tiles, so that even a small matrix spreads over every SM.
    block_m, block_n = (16, 16) if rows <= 16 else (64, 64)
    block_k = 64 if group_size % 64 == 0 and in_features % 64 == 0 else 32
    uniform = group_size % block_k == 0 and in_features % block_k == 0
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _quant_linear_kernel[grid](x2, codes, scales, scaled_zeros, out, rows, out_features, in_features,
                               scales.shape[1], group_size, x2.stride(0), out.stride(0), BITS=bits, BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_K=block_k, UNIFORM_GROUPS=uniform,
                               DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], out_features)
