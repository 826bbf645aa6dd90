"""Fused elementwise kernels in Triton (CUDA, or CPU under the interpreter): residual add +
RMSNorm, SiLU-and-multiply, and in-place rotary. Each replaces several PyTorch launches, and
their round trips through memory, by one. They compute in float32, as the PyTorch paths do."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, add_ptr, weight_ptr, out_ptr, eps, stride_x, stride_add, stride_out, size,
                         HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: x += add (x is the float32 residual stream, updated in place), then
    out = x / rms(x) * weight in out's dtype."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < size
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(add_ptr + row * stride_add + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * stride_x + offs, x, mask=mask)
    variance = tl.sum(x * x, 0) / size
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = x * tl.rsqrt(variance + eps) * weight
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, size, BLOCK: tl.constexpr):
    """Program (row, column block): out = silu(gate) * up, with [gate | up] side by side in a row."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + size + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(rows_ptr, positions_ptr, cos_ptr, sin_ptr, stride_row, stride_table, num_heads,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One program per token: each of its first num_heads heads turns the pairs (i, i + d/2) by
    the angle of frequency i at the token's position ("rotate half" layout), in place."""
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token)
    offs_h = tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    i_mask = offs_i < HALF
    mask = (offs_h < num_heads)[:, None] & i_mask[None, :]
    cos = tl.load(cos_ptr + position * stride_table + offs_i, mask=i_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + position * stride_table + offs_i, mask=i_mask, other=0.0)[None, :]
    first = rows_ptr + token * stride_row + offs_h[:, None] * (2 * HALF) + offs_i[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(rows_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(rows_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """x (T, H) float32, updated in place to x + add when ``add`` is given; returns RMSNorm(x) (T, H)."""
    num_rows, size = x.shape
    out = torch.empty(num_rows, size, dtype=out_dtype, device=x.device)
    if num_rows:
        add_arg = add if add is not None else x
        _add_rms_norm_kernel[(num_rows,)](x, add_arg, weight, out, eps, x.stride(0), add_arg.stride(0), out.stride(0),
                                          size, HAS_ADD=add is not None, BLOCK=triton.next_power_of_2(size))
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(T, 2I) holding [gate | up] -> (T, I)."""
    num_rows, width = gate_up.shape
    size = width // 2
    out = torch.empty(num_rows, size, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(size))
    if num_rows:
        _silu_and_mul_kernel[(num_rows, triton.cdiv(size, block))](gate_up, out, gate_up.stride(0), out.stride(0),
                                                                  size, BLOCK=block)
    return out


def rotary_inplace(rows: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   num_heads: int, head_dim: int) -> None:
    """Rotates the first ``num_heads`` heads of each row of ``rows`` (T, width), with row stride
    free but heads packed, by the (max_position, head_dim/2) float32 tables at positions (T,)."""
    if rows.shape[0] == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(rows.shape[0],)](rows, positions, cos, sin, rows.stride(0), cos.stride(0), num_heads,
                                     HALF=half, BLOCK_H=triton.next_power_of_2(num_heads),
                                     BLOCK_HALF=triton.next_power_of_2(half))
