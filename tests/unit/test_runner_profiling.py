"""The runner's phase ranges: recorded under a profiler, free without one."""

import contextlib

import torch

from tokenmill.runner.profiling import phase


def test_phase_is_a_no_op_without_a_profiler():
    assert isinstance(phase("tokenmill.step_inputs"), contextlib.nullcontext)


def test_phase_records_a_range_under_the_profiler():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with phase("tokenmill.test_phase"):
            torch.ones(4).add_(1)
    assert [e.count for e in prof.key_averages() if e.key == "tokenmill.test_phase"] == [1]
