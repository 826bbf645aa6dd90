"""Where the fused Triton kernels (``triton_fused.py``) run.

``triton_ops(device)`` returns the kernel module where they should run, else None (the PyTorch or
C++ paths run): on CUDA when Triton is installed, unless ``TOKENMILL_NO_TRITON_OPS=1``; on CPU
only with ``TOKENMILL_TRITON_OPS=1`` under the interpreter (``TRITON_INTERPRET=1``), which is how
CI checks them.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_ops(device: torch.device):
    """The fused kernel module if its kernels should run on ``device``, else None."""
    if not _triton_installed():
        return None
    if device.type == "cuda":
        return None if os.environ.get("TOKENMILL_NO_TRITON_OPS") == "1" else _kernels()
    if os.environ.get("TOKENMILL_TRITON_OPS") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
        return _kernels()
    return None


@functools.lru_cache(maxsize=1)
def _kernels():
    from tokenmill.kernels import triton_fused

    return triton_fused
