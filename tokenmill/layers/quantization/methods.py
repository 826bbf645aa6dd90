"""Linear methods: how a linear layer holds, loads and applies its weight.

- ``UnquantizedLinearMethod``: a float ``weight``; on CPU, float32 and bf16 weights are held as
  panels (``kernels/csrc/dense_panels.cpp``) or prepacked for oneDNN.
- ``RTNLinearMethod``: loads a float ``weight``, then rounds it to int8 (per channel, symmetric)
  or int4 (groups, asymmetric).
- ``GPTQLinearMethod``: loads a GPTQ checkpoint's ``qweight``/``qzeros``/``scales``/``g_idx`` as
  they are and unpacks them once.
- ``GGUFLinearMethod``: a GGUF file's Q8_0 or Q4_0 matrix, as its blocks hold it.

The last three end in a :class:`QuantizedMatrix`. A layer whose shape a scheme cannot hold (inputs
not a multiple of the group size, or of the packing) keeps its float weight, with a warning.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.layers.quantization.config import QuantizationConfig
from tokenmill.kernels import cpu_kernels
from tokenmill.layers.quantization.packing import pack_dense_panels, unpack_dense_panels, unpack_int32
from tokenmill.layers.quantization.quantized_matrix import QuantizedMatrix
from tokenmill.layers.quantization.rtn import quantize_rtn
from tokenmill.logger import get_logger

logger = get_logger(__name__)


def _can_prepack(weight: torch.Tensor) -> bool:
    """oneDNN-prepacked weights on CPU, where panels do not fit. bf16 (on CPUs with AMX or
    AVX512-BF16): ~2x faster than plain F.linear at batch 1 and several times faster at larger
    batches. float32: F.linear's one-row product (MKL's GEMV) runs on one thread whatever the thread
    count, leaving the other cores idle; oneDNN's uses them all (2x on 2 cores)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _panels_fit(weight: torch.Tensor) -> bool:
    """Whether a float weight can take the panel layout of ``kernels/csrc/dense_panels.cpp``: on CPU,
    float32 or bf16 (AVX2 or AVX-512), outputs a multiple of 16 (bf16: inputs even). Panels
    stream a row of x through the weights at ~31 GB/s where oneDNN's prepacked GEMV reaches ~18-21,
    and match oneDNN within ~10% at hundreds of rows."""
    rows, in_features = weight.shape
    if weight.device.type != "cpu" or rows % 16 or (weight.dtype == torch.bfloat16 and in_features % 2):
        return False
    if os.environ.get("TOKENMILL_NO_DENSE_PANELS") == "1":  # oneDNN's layout instead (A/B timing)
        return False
    kernels = cpu_kernels()
    return kernels is not None and kernels.dense_panels_available(weight.dtype)


def prepack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of a plain (N, K) weight, for ``torch.ops.mkldnn._linear_pointwise``;
    ``.to_dense()`` gives the plain weight back."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def _is_onednn(packed: torch.Tensor) -> bool:
    return packed.layout == torch._mkldnn


class UnquantizedLinearMethod:
    """A float weight (N, K), as in torch.nn.Linear."""

    name = "unquantized"

    def create_weights(self, layer: nn.Module) -> None:
        """Nothing to add: the layer was built with its float ``weight``."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """On CPU, float32 and bf16 weights take the panel layout, or else oneDNN's prepacked one. The
        packed copy (``packed_weight``) replaces the plain one, so the memory is not doubled; the layer
        then cannot load a checkpoint again."""
        weight = layer.weight
        if weight is None:
            return
        if _panels_fit(weight):
            layer.packed_weight = pack_dense_panels(weight.detach())
        elif _can_prepack(weight):
            layer.packed_weight = prepack_linear_weight(weight.detach())
        else:
            return
        layer.weight = None

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        packed = layer.packed_weight
        if packed is None:
            return F.linear(x, layer.weight, layer.bias)
        if _is_onednn(packed):
            return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
        kernels = cpu_kernels()
        if kernels is None:  # switched off after loading (TOKENMILL_NO_CPU_KERNELS=1)
            return F.linear(x, unpack_dense_panels(packed), layer.bias)
        return kernels.dense_panel_linear(x, packed, layer.bias)

    def read_bytes(self, layer: nn.Module) -> int:
        weight = layer.packed_weight if layer.packed_weight is not None else layer.weight
        return 0 if weight is None else weight.numel() * weight.element_size()  # None: offloaded

    def decode_spec(self, layer: nn.Module, kernels):
        """The layer as the C++ decode step runs it (a ``kernels.LinearSpec`` calling what ``apply``
        calls), or None where that step cannot run it."""
        spec = kernels.LinearSpec()
        packed = layer.packed_weight
        if packed is not None:
            spec.kind, spec.weight = ("packed" if _is_onednn(packed) else "panels"), packed
        else:
            spec.kind, spec.weight = "dense", layer.weight
        spec.bias = layer.bias
        return spec


class _QuantizedMethod(UnquantizedLinearMethod):
    """Runs a layer's QuantizedMatrix (``layer.qmatrix``); falls back to the float path when the
    layer kept its float weight."""

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.qmatrix is None:
            return super().apply(layer, x)
        return layer.qmatrix(x, layer.bias)

    def read_bytes(self, layer: nn.Module) -> int:
        return super().read_bytes(layer) if layer.qmatrix is None else layer.qmatrix.nbytes()

    def decode_spec(self, layer: nn.Module, kernels):
        matrix = layer.qmatrix
        if matrix is None:
            return super().decode_spec(layer, kernels)
        if matrix.perm is not None:  # act-order inputs: the C++ step does not permute x
            return None
        spec = kernels.LinearSpec()
        spec.kind, spec.bias, spec.group_size, spec.bits = "quantized", layer.bias, matrix.group_size, matrix.storage_bits
        spec.codes, spec.scales, spec.zeros = matrix.codes, matrix.scales, matrix.kernel_zeros
        spec.scale_unit = matrix.scale_unit
        return spec


def _int8_activations(layer: nn.Module) -> bool:
    """16-bit models may round activations to int8 for integer dot products (their activations carry
    8 significant bits already); float32 models keep exact float products."""
    return layer.params_dtype in (torch.bfloat16, torch.float16)


def _fits(in_features: int, group_size: int, pack: int, what: str) -> bool:
    """Whether a layer with ``in_features`` inputs can be quantized; warns (naming the layer) if not."""
    if group_size != -1 and in_features % group_size:
        logger.warning("%s: %d inputs are not a multiple of the group size %d; the layer stays unquantized",
                       what, in_features, group_size)
        return False
    if in_features % pack:
        logger.warning("%s: %d inputs are not a multiple of the packing (%d); the layer stays unquantized",
                       what, in_features, pack)
        return False
    return True


class RTNLinearMethod(_QuantizedMethod):
    """Round-to-nearest at load time: int8 per channel symmetric, or int4 in groups, asymmetric."""

    def __init__(self, bits: int, group_size: int, sym: bool, layer_name: str = ""):
        self.bits, self.group_size, self.sym, self.layer_name = bits, group_size, sym, layer_name
        self.name = f"int{bits}"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight
        if not _fits(layer.in_features, self.group_size, 32 // self.bits, self.layer_name or "a linear layer"):
            super().process_weights_after_loading(layer)
            return
        codes, scales, zeros = quantize_rtn(weight.detach(), self.bits, self.group_size, self.sym)
        layer.qmatrix = QuantizedMatrix(codes, scales, zeros, self.bits, self.group_size,
                                        int8_activations=_int8_activations(layer)).to(weight.device)
        layer.weight = None  # a tied LM head keeps the embedding's parameter alive for the embedding only


class GGUFLinearMethod(_QuantizedMethod):
    """A GGUF Q8_0 or Q4_0 matrix held as its blocks hold it: groups of 32 inputs, each block's float16
    scale d, the stored codes (``gguf_codes`` (N, K) uint8, ``gguf_scales`` (N, K / 32), as the GGUF
    reader gives them): Q8_0 ``w = d * (c - 128)``, Q4_0 ``w = d * (c - 8)``, exactly llama.cpp's weights."""

    group_size = 32

    def __init__(self, bits: int, layer_name: str = "", stored: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``stored``: the codes and scales, read already (a tied LM head's, from the embedding matrix,
        which itself loads dequantized for its row lookups); otherwise they load as parameters."""
        self.bits, self.layer_name, self.stored = bits, layer_name, stored
        self.name = {8: "gguf-q8_0", 4: "gguf-q4_0"}[bits]

    @classmethod
    def holds(cls, layer: nn.Module) -> bool:
        """Whether ``layer`` can hold whole blocks: not a vocabulary-parallel head (padded rows), and whole
        blocks of inputs on this tensor-parallel rank."""
        return layer.parallel != "vocab" and layer.in_features % cls.group_size == 0 \
            and layer.in_start % cls.group_size == 0

    def create_weights(self, layer: nn.Module) -> None:
        if not self.holds(layer):
            raise ModelLoadError(f"{self.layer_name or 'a linear layer'}: GGUF blocks of {self.group_size} inputs "
                                 f"do not fit this layer on this rank ({layer.in_features} inputs from "
                                 f"{layer.in_start}, parallel={layer.parallel!r}); use quantization='none'")
        layer.weight = None  # a tied LM head's: the embedding keeps the parameter for its lookups
        if self.stored is not None:
            return
        groups = layer.in_features // self.group_size
        for name, shape, dtype, unit in (("gguf_codes", (layer.out_features, layer.in_features), torch.uint8, 1),
                                         ("gguf_scales", (layer.out_features, groups), torch.float32, self.group_size)):
            param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            param.output_dim, param.pack_factor, param.input_dim, param.input_unit = 0, 1, 1, unit
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.stored is not None:
            (codes, scales), self.stored = self.stored, None
        else:
            codes, scales = layer.gguf_codes.data, layer.gguf_scales.data
            del layer.gguf_codes, layer.gguf_scales
        zeros = torch.full_like(scales, float(2 ** (self.bits - 1)))
        layer.qmatrix = QuantizedMatrix(codes.to(torch.int32), scales, zeros, self.bits, self.group_size,
                                        int8_activations=_int8_activations(layer)).to(codes.device)


def _check_split(layer: nn.Module, cfg: QuantizationConfig, where: str) -> None:
    """ModelLoadError where a GPTQ layer cannot be cut over tensor-parallel ranks: an LM head (padded
    vocabulary), act-order split by inputs (a rank's inputs would belong to any group), or a cut
    inside a group."""
    if layer.parallel == "vocab":
        raise ModelLoadError(f"{where}: a GPTQ-quantized LM head does not split over tensor-parallel ranks; "
                             "use tensor_parallel_size 1")
    if layer.parallel == "row":
        if cfg.desc_act:
            raise ModelLoadError(f"{where}: an act-order GPTQ checkpoint (desc_act: true) cannot split this layer's "
                                 "inputs over tensor-parallel ranks; use tensor_parallel_size 1 or a checkpoint "
                                 "without desc_act")
        if cfg.group_size != -1 and layer.in_features % cfg.group_size:
            raise ModelLoadError(f"{where}: {layer.in_features} inputs per tensor-parallel rank do not hold whole "
                                 f"groups of {cfg.group_size} (group_size)")


class GPTQLinearMethod(_QuantizedMethod):
    """A GPTQ checkpoint's packed tensors, loaded as they are, unpacked once after loading."""

    name = "gptq"

    def __init__(self, config: QuantizationConfig, layer_name: str = ""):
        self.config, self.layer_name = config, layer_name

    def create_weights(self, layer: nn.Module) -> None:
        cfg, in_features, out_features = self.config, layer.in_features, layer.out_features
        pack = 32 // cfg.bits
        where = self.layer_name or "a linear layer"
        _check_split(layer, cfg, where)
        if in_features % pack or out_features % pack:
            raise ModelLoadError(f"{where}: a {cfg.bits}-bit GPTQ layer needs inputs ({in_features}) and outputs "
                                 f"({out_features}) that are multiples of {pack}")
        per_channel = cfg.group_size == -1
        num_groups = 1 if per_channel else -(-in_features // cfg.group_size)
        layer.weight = None
        # output_dim: the dimension that merged projections (q/k/v, gate/up) are stacked along (and
        # column-parallel ranks split); pack_factor: how many outputs one stored element holds along it.
        # input_dim, input_unit: the dimension row-parallel ranks split, and the inputs per element.
        group_rows = None if per_channel else 0  # one scale row for all inputs: every rank needs it
        specs = {"qweight": ((in_features // pack, out_features), torch.int32, 1, 1, 0, pack),
                 "qzeros": ((num_groups, out_features // pack), torch.int32, 1, pack, group_rows, cfg.group_size),
                 "scales": ((num_groups, out_features), torch.float16, 1, 1, group_rows, cfg.group_size),
                 "g_idx": ((in_features,), torch.int32, None, 1, 0, 1)}
        for name, (shape, dtype, output_dim, pack_factor, input_dim, input_unit) in specs.items():
            param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            param.output_dim, param.pack_factor = output_dim, pack_factor
            param.input_dim, param.input_unit = input_dim, input_unit
            layer.register_parameter(name, param)
        # Checkpoints without act-order may leave g_idx out: inputs then go to groups in order.
        layer.g_idx.data.copy_(torch.arange(in_features) // (in_features if per_channel else cfg.group_size))
        layer.g_idx.optional = True
        layer.g_idx.group_size = layer.full_in_features if per_channel else cfg.group_size

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        cfg = self.config
        codes = unpack_int32(layer.qweight.data, cfg.bits, dim=0).t()  # (N, K) unsigned
        zeros = unpack_int32(layer.qzeros.data, cfg.bits, dim=1)  # (G, N)
        if cfg.checkpoint_format == "gptq":  # v1 stores zero - 1, modulo 2**bits
            zeros = (zeros + 1) & (2**cfg.bits - 1)
        scales = layer.scales.data.float()  # (G, N)
        g_idx = layer.g_idx.data.to(torch.int64)
        in_features = layer.in_features
        group_size = in_features if cfg.group_size == -1 else cfg.group_size
        perm = None
        if not torch.equal(g_idx, torch.arange(in_features, device=g_idx.device) // group_size):
            # Act-order: inputs of a group are scattered. Sorting g_idx makes each group contiguous.
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], torch.arange(in_features, device=g_idx.device) // group_size):
                raise ModelLoadError(f"{self.layer_name}: g_idx does not assign {group_size} inputs to each group")
            codes = codes[:, perm]
        device = layer.qweight.device
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            delattr(layer, name)
        layer.qmatrix = QuantizedMatrix(codes, scales.t(), zeros.t().float(), cfg.bits, group_size, perm,
                                        int8_activations=_int8_activations(layer)).to(device)
