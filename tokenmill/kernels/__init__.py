"""tokenmill's C++ CPU kernels, compiled once per machine on first use (torch C++ extension).

``cpu_kernels()`` returns the extension module, or None where it cannot be built (no compiler)
or is switched off with ``TOKENMILL_NO_CPU_KERNELS=1``. Every caller has a PyTorch fallback.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

from tokenmill.logger import get_logger

logger = get_logger(__name__)
_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("bindings.cpp", "paged_decode.cpp", "fused_ops.cpp", "quant_linear.cpp",
                         "quant_linear_vnni.cpp", "quant_panels.cpp", "dense_panels.cpp",
                         "decode_step.cpp", "kv_write.cpp")]


def _cpu_tag() -> str:
    """A short digest of this CPU's model and instruction-set flags. The build uses ``-march=native``, so a
    build cached for one CPU can hold instructions another lacks (AVX-512 on an AVX2 machine): the tag
    goes into the extension's name, and each kind of CPU gets its own build."""
    description = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("flags", "model name", "Features"))]
        description += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha256(description.encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=1)
def _build():
    try:
        from torch.utils.cpp_extension import load

        # The ninja that pip installs sits beside this Python, which may not be on PATH.
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        return load(name=f"tokenmill_cpu_kernels_{_cpu_tag()}", sources=[str(s) for s in _SOURCES],
                    extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers: the PyTorch paths still work
        logger.warning("tokenmill CPU kernels unavailable (%s); using PyTorch ops",
                       str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def cpu_kernels():
    """The compiled CPU kernels, or None (PyTorch fallbacks are used)."""
    if os.environ.get("TOKENMILL_NO_CPU_KERNELS") == "1":
        return None
    return _build()
