"""The GPTQ algorithm (Frantar et al., 2022) for one linear layer.

Given the layer's inputs X on calibration data, GPTQ quantizes the weight one input column at a
time and spreads each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian H^-1 of the layer's squared output error (H = 2 X X^T / n). Details as in the
paper: dampening (a fraction of mean(diag H) added to the diagonal), the upper Cholesky factor of
H^-1 in place of repeated inverse updates, lazy updates in blocks of 128 columns, and optional
act-order (columns in order of decreasing diag H, which GPTQ checkpoints record in ``g_idx``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.layers.quantization.rtn import grid_from_range, quantize_to_grid


class HessianAccumulator:
    """Running H = 2 / n * sum of x x^T over every input row a layer sees."""

    def __init__(self, in_features: int):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.num_rows = 0

    def add(self, x: torch.Tensor) -> None:  # x (..., in_features)
        rows = x.reshape(-1, x.shape[-1]).double()
        total = self.num_rows + rows.shape[0]
        self.hessian *= self.num_rows / total
        self.hessian += (2.0 / total) * rows.t() @ rows
        self.num_rows = total


@dataclass
class GPTQResult:
    codes: torch.Tensor
    """(N, K) int32 in [0, 2**bits), inputs in the checkpoint's (original) order."""
    scales: torch.Tensor
    """(G, N) float32."""
    zeros: torch.Tensor
    """(G, N) int32."""
    g_idx: torch.Tensor
    """(K,) int32: the group of each input."""

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32: scale[g_idx[k]] * (code[k] - zero[g_idx[k]])."""
        g = self.g_idx.long()
        return (self.scales[g] * (self.codes.t() - self.zeros[g]).float()).t()


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, sym: bool,
                  desc_act: bool, damp: float = 0.01, block_size: int = 128) -> GPTQResult:
    """weight (N, K), hessian (K, K) -> codes, scales, zeros and g_idx of a GPTQ layer.

    ``group_size`` -1 means one group per output channel. Scales are rounded to float16 as they
    are stored, and codes are computed against the rounded scales."""
    W = weight.detach().double().clone()  # (N, K)
    out_features, in_features = W.shape
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: any code does; keep them from the inverse
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if desc_act else torch.arange(in_features)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_features, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    size = in_features if group_size == -1 else group_size
    num_groups = -(-in_features // size)
    scales = torch.empty(num_groups, out_features, dtype=torch.float64)
    zeros = torch.empty(num_groups, out_features, dtype=torch.float64)
    codes = torch.empty(out_features, in_features, dtype=torch.float64)  # in the permuted order

    def set_grid(group: int, columns: torch.Tensor) -> None:
        scale, zero = grid_from_range(columns.amin(1), columns.amax(1), bits, sym)
        scales[group], zeros[group] = scale.half().double(), zero

    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        W1 = W[:, start:end].clone()
        errors = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % size == 0:  # a new group: its grid from the columns as they are now
                set_grid(column // size, torch.cat([W1[:, i:], W[:, end:]], dim=1)[:, :size])
            group = column // size
            scale, zero = scales[group], zeros[group]
            q = quantize_to_grid(W1[:, i], scale, zero, bits)
            codes[:, column] = q
            error = (W1[:, i] - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= error.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            errors[:, i] = error
        W[:, end:] -= errors @ Hinv[start:end, end:]

    inverse = torch.argsort(perm)
    g_idx = (torch.arange(in_features) // size)[inverse]  # input k sat at position inverse[k]
    return GPTQResult(codes[:, inverse].to(torch.int32), scales.float(), zeros.to(torch.int32), g_idx.to(torch.int32))


def rtn_result(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> GPTQResult:
    """Round to nearest in the same form (and with the same float16 scales) as GPTQ's output."""
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    grouped = weight.detach().double().view(out_features, -1, size)  # (N, G, size); in_features % size == 0
    scale, zero = grid_from_range(grouped.amin(-1), grouped.amax(-1), bits, sym)  # (N, G)
    scale = scale.half().double()
    codes = quantize_to_grid(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).view(out_features, in_features)
    g_idx = torch.arange(in_features) // size
    return GPTQResult(codes.to(torch.int32), scale.t().float(), zero.t().to(torch.int32), g_idx.to(torch.int32))
