"""Token embedding table, split by vocabulary rows under tensor parallelism.

Each rank holds rows [rank * s, (rank + 1) * s) of the table, s = ceil(V / degree) (rows past V are
zero padding), looks up the tokens that fall in its range, zeroes the others, and the ranks' rows
are summed: every token comes from exactly one rank. A tied LM head shares the same slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.parallel_state import tensor_parallel_group
from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import new_parameter


class VocabParallelEmbedding(nn.Module):
    """``forward(input_ids (T,)) -> (T, H)`` in the table's dtype."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = tensor_parallel_group()
        self.vocab_size = vocab_size
        rows = -(-vocab_size // self.tp.size)
        self.vocab_start = self.tp.rank * rows
        self.weight = new_parameter(rows, hidden_size)
        if self.tp.size > 1:
            self.weight.weight_loader = self._load_rows

    def _load_rows(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1:] != param.shape[1:]:
            raise ModelLoadError(f"embedding shape {tuple(loaded.shape)} does not match the model's "
                                 f"({self.vocab_size}, {param.shape[1]})")
        rows = max(0, min(param.shape[0], self.vocab_size - self.vocab_start))
        param.data.zero_()
        param.data[:rows].copy_(loaded[self.vocab_start:self.vocab_start + rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(rows)
