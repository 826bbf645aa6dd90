"""``tokenmill bench latency --profile DIR``: one more request under ``torch.profiler``.

Writes ``DIR/trace.json`` (open it in Perfetto or chrome://tracing) and ``DIR/ops.txt`` (the
profiler's table), and prints where a token's time goes: on a GPU each kernel's device time (the
kernels a CUDA graph replays included), on a CPU each operator's own CPU time, with the engine's
phases (``tokenmill.*`` ranges: step inputs, the C++ or graph decode step, the Python forward,
sampling) beside them. Times are per output token: the request's total over its output tokens,
its prompt included once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tokenmill.bench.report import print_table


@dataclass(frozen=True)
class ProfiledOp:
    """One operator or kernel: its name, calls per output token, and its own time per output token
    (device time on a GPU, CPU time on a CPU; the ``tokenmill.*`` ranges: wall time inside them)."""

    name: str
    calls_per_token: float
    us_per_token: float


def profile_request(llm, prompt: dict, params, out_dir: str, row_limit: int = 20) -> list[ProfiledOp]:
    """Generates ``prompt`` once under the profiler, writes the trace and table into ``out_dir`` and
    returns the ``row_limit`` costliest operators (kernels on a GPU) followed by the engine's phases."""
    device = llm.engine.device
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        output = llm.generate(prompt, params, use_tqdm=False)[0]
        if on_gpu:
            torch.cuda.synchronize(device)
    tokens = max(1, len(output.outputs[0].token_ids))
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(folder / "trace.json"))
    sort_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    averages = prof.key_averages()
    (folder / "ops.txt").write_text(averages.table(sort_by=sort_key, row_limit=100) + "\n")
    own_time = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    ops = sorted((e for e in averages if own_time(e) > 0 and not e.key.startswith("tokenmill.")),
                 key=own_time, reverse=True)[:row_limit]
    phases = sorted((e for e in averages if e.key.startswith("tokenmill.")), key=lambda e: e.key)
    return ([ProfiledOp(e.key, e.count / tokens, own_time(e) / tokens) for e in ops]
            + [ProfiledOp(e.key, e.count / tokens, e.cpu_time_total / tokens) for e in phases])


def print_profile(ops: list[ProfiledOp], out_dir: str, on_gpu: bool) -> None:
    """The profile as a table: us per output token and calls per token of each row."""
    what = "kernel device time" if on_gpu else "operator CPU time (own)"
    print_table(f"profile: {what} per output token, us (calls per token); trace in {out_dir}/trace.json",
                [(op.name[:70], f"{op.us_per_token:10.1f}  ({op.calls_per_token:.1f})") for op in ops])
