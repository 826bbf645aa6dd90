"""``--plot``: the roofline with each operator placed on it, and latency/throughput against batch size."""

from __future__ import annotations

from tokenmill.analysis.analyzer import AnalysisReport


def plot_report(r: AnalysisReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compute = "fp32" if r.dtype == "fp32" else "fp16"
    peak, bw = r.hardware.flops(compute), r.hardware.bandwidth
    fig, (roof, sweep) = plt.subplots(1, 2, figsize=(13, 5))
    ops = r.prefill.ops + r.decode.ops
    lo = min(op.intensity for op in ops) / 2
    hi = max(max(op.intensity for op in ops) * 2, r.hardware.ridge_point(compute) * 4)
    xs = [lo * (hi / lo) ** (k / 200) for k in range(201)]
    roof.plot(xs, [min(peak, bw * x) for x in xs], color="black", label=f"{r.hardware.name} roofline")
    for phase, marker in ((r.prefill, "o"), (r.decode, "s")):
        for op in phase.ops:
            achieved = op.flops / op.time_s if op.time_s else peak
            roof.scatter(op.intensity, achieved, marker=marker, s=25)
            roof.annotate(op.name, (op.intensity, achieved), fontsize=6, alpha=0.7)
    roof.set_xscale("log")
    roof.set_yscale("log")
    roof.set_xlabel("arithmetic intensity (ops/byte)")
    roof.set_ylabel("attainable FLOP/s")
    roof.set_title(f"{r.model.name}: prefill (o) and decode (s) operators")
    roof.axvline(r.hardware.ridge_point(compute), linestyle="--", color="grey")
    batches = [p.batch_size for p in r.sweep]
    sweep.plot(batches, [p.ms_per_token for p in r.sweep], marker="o", color="tab:blue")
    sweep.set_xscale("log", base=2)
    sweep.set_xlabel("batch size")
    sweep.set_ylabel("ms per output token", color="tab:blue")
    twin = sweep.twinx()
    twin.plot(batches, [p.tokens_per_s for p in r.sweep], marker="s", color="tab:red")
    twin.set_ylabel("output tokens/s", color="tab:red")
    sweep.set_title(f"latency vs throughput (input {r.input_len}, output {r.output_len})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
