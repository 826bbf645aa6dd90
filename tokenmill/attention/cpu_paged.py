"""CPU backend: a C++ decode kernel that reads K/V in place through the block tables.

The portable backend gathers each request's blocks into a padded copy before attending; at
long contexts that copy costs more than the attention itself. This backend keeps prompt chunks
on the portable path (fused flash SDPA) and sends decodes to ``csrc/paged_decode.cpp``, built
once per machine with torch's C++ extension loader (cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.torch_paged import TorchPagedAttention
from tokenmill.logger import get_logger

logger = get_logger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"


@functools.lru_cache(maxsize=1)
def load_kernel():
    """The compiled extension, or None (with a warning) where it cannot be built."""
    try:
        import os
        import sys

        from torch.utils.cpp_extension import load

        # The ninja that pip installs sits beside this Python, which may not be on PATH.
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        return load(name="tokenmill_paged_decode", sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers: the portable backend still works
        logger.warning("CPU paged-attention kernel unavailable (%s); using the portable PyTorch backend",
                       str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


class CpuPagedAttention(TorchPagedAttention):
    name = "cpu"

    def __init__(self):
        kernel = load_kernel()
        if kernel is None:
            raise RuntimeError("the CPU paged-attention kernel could not be built")
        self.kernel = kernel

    def _decode(self, q, key_cache, value_cache, md: AttentionMetadata, scale: float) -> torch.Tensor:
        return self.kernel.paged_decode_attention(q, key_cache, value_cache, md.decode_block_tables,
                                                  md.decode_seq_lens, scale)
