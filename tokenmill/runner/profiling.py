"""The runner's phases as profiler ranges, paid for only while a profiler records.

``torch.profiler.record_function`` costs ~10-20 us a range even with no profiler running, and the
first one after a C++ decode step more (~100 us on a 2-core Zen 3: the step's weight stream has
evicted the dispatcher's code and tables from the caches), so three ranges a step took ~0.2-0.3 ms
from every batch-1 decode step. ``phase`` opens the range only while ``torch.profiler`` records
(``tokenmill bench latency --profile``).
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function


def phase(name: str) -> contextlib.AbstractContextManager:
    """A ``record_function(name)`` range while a profiler records, else a context that does nothing."""
    if torch.autograd._profiler_enabled():
        return record_function(name)
    return contextlib.nullcontext()
