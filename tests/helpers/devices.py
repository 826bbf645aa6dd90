"""Where the Triton paths are tested: on the GPU when there is one, else in Triton's interpreter on
CPU (conftest sets TRITON_INTERPRET=1 before anything imports the kernels)."""

from __future__ import annotations

import torch

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
