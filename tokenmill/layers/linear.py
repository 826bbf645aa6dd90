"""Linear layers whose parameters know how to load themselves from checkpoint tensors.

Projections that read the same input are merged into one GEMM (q/k/v, gate/up): fewer, larger
matrix products are faster at every batch size. Each merged parameter carries a
``weight_loader(param, tensor, shard_id)`` that copies one checkpoint tensor into its slice, and
``shard_ids``, the shards a complete checkpoint must provide.

How the weight is held, loaded and multiplied is the layer's *linear method*
(``layers/quantization``): float by default; int8, int4 or GPTQ after ``set_quant_method``.
Model files never see the difference.

Under tensor parallelism (a model built inside ``distributed.parallel_state.building_for``), a
layer marked ``parallel`` holds its rank's slice and its loaders cut that slice from the full
checkpoint tensor: "column" splits the outputs (q/k/v by heads, gate/up by rows), "row" the
inputs (its outputs are partial sums, added up over the ranks), "vocab" the outputs padded to a
multiple of the degree (the LM head). One process is the degree-1 case of the same code.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
from torch import nn

from tokenmill.distributed.parallel_state import SINGLE, partition, tensor_parallel_group
from tokenmill.errors import ModelLoadError
from tokenmill.layers.quantization.methods import UnquantizedLinearMethod


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Hashable = None) -> None:
    """Copies ``loaded`` into ``param`` (casting dtype); raises ModelLoadError on a shape mismatch."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ModelLoadError(f"weight shape {tuple(loaded.shape)} does not match the model's {tuple(param.shape)}")
    param.data.copy_(loaded)


def _check_full(loaded: torch.Tensor, param: nn.Parameter, dim: int, full_size: int) -> None:
    """ModelLoadError unless ``loaded`` is ``param``'s full (unsplit) tensor: ``full_size`` along ``dim``."""
    expected = list(param.shape)
    expected[dim] = full_size
    if list(loaded.shape) != expected:
        raise ModelLoadError(f"weight shape {tuple(loaded.shape)} does not match the model's {tuple(expected)}")


def new_parameter(*shape: int) -> nn.Parameter:
    """An uninitialised, frozen parameter: weights always come from a checkpoint or an explicit init."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b); W is (out_features, in_features) as in torch.nn.Linear and checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, parallel: str | None = None):
        """``parallel``: None (every rank holds the whole layer), "column", "row" or "vocab" (see the
        module docstring). ``in_features``/``out_features`` become this rank's sizes."""
        super().__init__()
        self.tp = tensor_parallel_group() if parallel else SINGLE
        self.parallel = parallel if self.tp.size > 1 else None
        self.full_in_features, self.full_out_features = in_features, out_features
        self.in_start = self.out_start = 0  # this rank's first input and output in the full layer
        if self.parallel == "column":
            self.out_start, out_features = partition(out_features, self.tp, "output rows")
        elif self.parallel == "vocab":
            out_features = -(-out_features // self.tp.size)
            self.out_start = self.tp.rank * out_features
        elif self.parallel == "row":
            self.in_start, in_features = partition(in_features, self.tp, "input columns")
        self.in_features, self.out_features = in_features, out_features
        self.weight = new_parameter(out_features, in_features)
        self.params_dtype = self.weight.dtype  # the model's dtype: its activations' too
        # Row-parallel: the bias is added once, by rank 0 (the others hold zeros).
        self.bias = new_parameter(out_features) if bias else None
        self.packed_weight: torch.Tensor | None = None  # oneDNN-prepacked bf16 (CPU)
        self.qmatrix: nn.Module | None = None  # a QuantizedMatrix once a quantized method has loaded
        self.quant_method = UnquantizedLinearMethod()
        if self.parallel:
            self._attach_loaders()

    def _load_slice(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Hashable = None) -> None:
        """Copies this rank's slice of a full checkpoint tensor into ``param``: along its output dimension
        ("column", "vocab") or its input dimension ("row"), counted in what one stored element covers.
        A float weight (N, K) and bias (N,) say nothing; a quantized method's tensors carry ``output_dim``
        and ``pack_factor`` (outputs per element), ``input_dim`` and ``input_unit`` (inputs per element: a
        packed int32 holds several codes, a scale row a group), ``input_dim`` None when every rank needs
        the whole tensor, and ``group_size`` on g_idx, whose values are group numbers."""
        if self.parallel == "row":
            dim = getattr(param, "input_dim", 1 if param.dim() == 2 else None)
            if dim is None:  # whole on every rank; the bias is added once, by rank 0 (the others hold zeros)
                if param is self.bias and self.tp.rank != 0:
                    loaded = torch.zeros_like(loaded)
                default_weight_loader(param, loaded)
                return
            unit = getattr(param, "input_unit", 1)
            _check_full(loaded, param, dim, -(-self.full_in_features // unit))
            local = loaded.narrow(dim, self.in_start // unit, param.shape[dim])
            if hasattr(param, "group_size"):  # g_idx: this rank's first group becomes group 0
                local = local - self.in_start // param.group_size
            default_weight_loader(param, local)
            return
        dim, pack = getattr(param, "output_dim", 0), getattr(param, "pack_factor", 1)
        if dim is None:
            default_weight_loader(param, loaded)
            return
        _check_full(loaded, param, dim, self.full_out_features // pack)
        rows = max(0, min(self.out_features, self.full_out_features - self.out_start)) // pack  # "vocab": padding
        param.data.zero_()
        param.data.narrow(dim, 0, rows).copy_(loaded.narrow(dim, self.out_start // pack, rows))

    def set_quant_method(self, method) -> None:
        """Switches to another linear method before loading; it may replace ``weight`` by the
        parameters its checkpoints hold (GPTQ's ``qweight``, ...)."""
        self.quant_method = method
        method.create_weights(self)
        self._attach_loaders()

    def _attach_loaders(self) -> None:
        """Gives every parameter the loader that cuts this rank's slice (merged layers: the shard-aware one)."""
        if self.parallel:
            for param in self.parameters(recurse=False):
                param.weight_loader = self._load_slice

    def process_weights_after_loading(self) -> None:
        """Converts the loaded weight to its runtime form (prepacked, quantized), once."""
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        out = self.quant_method.apply(self, x)
        return self.tp.all_reduce(out) if self.parallel == "row" else out

    def read_bytes(self) -> int:
        """Weight bytes one forward pass reads (bias included)."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.quant_method.read_bytes(self) + bias


class MergedLinear(Linear):
    """Several projections of one input stacked along the output dimension.

    ``shards`` maps each checkpoint shard id to its number of output rows, in order; e.g.
    ``{"q": 4096, "k": 1024, "v": 1024}`` puts q in rows [0, 4096), k in [4096, 5120), v after.
    With ``parallel="column"`` each rank holds its slice of every shard, in whole units of
    ``unit_sizes[shard]`` rows (a head), replicated when a shard has fewer units than ranks.
    """

    def __init__(self, in_features: int, shards: dict[Hashable, int], bias: bool = False,
                 parallel: str | None = None, unit_sizes: dict[Hashable, int] | None = None,
                 unit_names: dict[Hashable, str] | None = None):
        tp = tensor_parallel_group() if parallel == "column" else SINGLE
        local_rows: dict[Hashable, int] = {}
        self.source_starts: dict[Hashable, int] = {}  # each shard's first row of this rank in the checkpoint
        for shard_id, rows in shards.items():
            unit = (unit_sizes or {}).get(shard_id, 1)
            first, count = partition(rows // unit, tp, (unit_names or {}).get(shard_id, f"rows of shard {shard_id!r}"),
                                     replicate=True)
            self.source_starts[shard_id], local_rows[shard_id] = first * unit, count * unit
        super().__init__(in_features, sum(local_rows.values()), bias)
        self.tp = tp
        self.offsets: dict[Hashable, tuple[int, int]] = {}
        start = 0
        for shard_id, rows in local_rows.items():
            self.offsets[shard_id] = (start, rows)
            start += rows
        self._loaded_shared: set[int] = set()
        self._attach_loaders()

    def _attach_loaders(self) -> None:
        for param in self.parameters(recurse=False):
            param.weight_loader = self._load_shard
            param.shard_ids = tuple(self.offsets)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Hashable) -> None:
        """Copies one shard's tensor into its slice along ``param.output_dim`` (0 for float weights);
        a parameter without an output dimension (GPTQ's g_idx) must be equal in every shard."""
        if shard_id not in self.offsets:
            raise ModelLoadError(f"unknown shard {shard_id!r}; expected one of {list(self.offsets)}")
        dim = getattr(param, "output_dim", 0)
        if dim is None:
            if id(param) in self._loaded_shared and not torch.equal(param.data, loaded.to(param.dtype)):
                raise ModelLoadError(f"shard {shard_id!r} differs from the other merged projections, which must "
                                     "share it (they read the same input)")
            default_weight_loader(param, loaded)
            self._loaded_shared.add(id(param))
            return
        start, rows = self.offsets[shard_id]
        pack = getattr(param, "pack_factor", 1)
        if start % pack or rows % pack:
            raise ModelLoadError(f"shard {shard_id!r} ({rows} outputs) does not split the packed tensor evenly")
        if self.tp.size > 1:  # this rank's rows of the full shard
            loaded = loaded.narrow(dim, self.source_starts[shard_id] // pack, rows // pack)
        default_weight_loader(param.data.narrow(dim, start // pack, rows // pack), loaded)

    def output_sizes(self) -> Sequence[int]:
        return [rows for _, rows in self.offsets.values()]
