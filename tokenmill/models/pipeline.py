"""What a model file needs to run as one stage of a pipeline (``pipeline_parallel_size`` > 1).

A stage builds only its own decoder layers (``stage_layers``; the others are ``MissingLayer``
placeholders, so layer indices and checkpoint names stay those of the whole model), the embedding
when it is the first stage and the final norm and LM head when it is the last. Its ``forward``
takes the previous stage's ``StageTensors`` instead of token ids, and returns ``StageTensors`` unless
it is the last stage. In one process the stage is ``WHOLE_MODEL`` and nothing here changes anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tokenmill.distributed.parallel_state import PipelineStage

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class MissingLayer(nn.Module):
    """A decoder layer that another pipeline stage holds: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this decoder layer belongs to another pipeline stage")


@dataclass
class StageTensors:
    """What a stage hands the next, by name: (T, H) tensors such as the residual stream and the last
    block's output; sent between processes in this order."""

    tensors: dict[str, torch.Tensor]


def stage_layers(stage: PipelineStage, num_layers: int, make_layer: Callable[[int], nn.Module]
                 ) -> tuple[nn.ModuleList, range]:
    """(all ``num_layers`` slots, with ``make_layer(i)`` in this stage's range and ``MissingLayer`` elsewhere;
    the range of indices this stage runs)."""
    start, end = stage.layer_range(num_layers)
    layers = nn.ModuleList(make_layer(i) if start <= i < end else MissingLayer() for i in range(num_layers))
    return layers, range(start, end)


def stage_holds(name: str, stage: PipelineStage, owned: range, layers_prefix: str,
                first_stage_prefixes: tuple[str, ...], last_stage_prefixes: tuple[str, ...]) -> bool:
    """Whether checkpoint tensor ``name`` belongs to this stage: a layer's tensor (``<layers_prefix>N.``) to
    the stage running layer N, the embedding's to the first stage, the final norm's and head's to the last,
    anything else to every stage."""
    if name.startswith(layers_prefix):
        match = _LAYER_INDEX.match(name, len(layers_prefix) - 1)
        return match is None or int(match.group(1)) in owned
    if name.startswith(first_stage_prefixes):
        return stage.is_first
    if name.startswith(last_stage_prefixes):
        return stage.is_last
    return True
