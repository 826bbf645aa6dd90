"""``analyze --offload``: the placement sweep as a table, the choice explained, and the engine options."""

from __future__ import annotations

from tokenmill.analysis.offload_plan import OffloadPlan

GiB, MiB = 2 ** 30, 2 ** 20


def _size(num_bytes: float) -> str:
    return f"{num_bytes / GiB:.2f} GiB" if num_bytes >= GiB else f"{num_bytes / MiB:.1f} MiB"


def _rate(tokens_per_s: float) -> str:
    """Tokens/s with three significant digits below 100 (offloaded giants run at fractions of a token)."""
    return f"{tokens_per_s:.1f}" if tokens_per_s >= 100 else f"{tokens_per_s:.3g}"


def engine_flags(plan: OffloadPlan) -> str:
    """The chosen placement as ``tokenmill`` command-line options."""
    options = plan.engine_options()
    flags = [f"--max-num-seqs {options['max_num_seqs']}", f"--kv-cache-memory {options['kv_cache_memory']}"]
    if "cpu_offload_gb" in options:
        flags.append(f"--cpu-offload-gb {options['cpu_offload_gb']}")
    if "max_weight_memory" in options:
        flags.append(f"--offload-folder DIR --max-weight-memory {options['max_weight_memory']}")
    return " ".join(flags)


def offload_text(plan: OffloadPlan) -> str:
    b, best, units = plan.budgets, plan.best, plan.units
    layers = [u for u in units if u.name.startswith("layer")]
    others = ", ".join(f"{u.name} {u.bytes / MiB:.1f} MiB" for u in units if not u.name.startswith("layer"))
    if b.device_is_cpu:
        tiers = f"CPU memory {_size(b.device_memory)} (the device); disk at {b.disk_bandwidth / 1e9:.2f} GB/s"
    else:
        tiers = (f"{plan.hardware.name} memory {_size(b.device_memory)}; CPU tier "
                 + (f"{_size(b.cpu_memory)}" if b.cpu_memory else "none (give --cpu-memory)")
                 + f" over the host link at {b.link_bandwidth / 1e9:.1f} GB/s; disk at "
                 f"{b.disk_bandwidth / 1e9:.2f} GB/s")
    total = sum(u.bytes for u in units)
    unit, size = ("GiB", GiB) if total >= 4 * GiB else ("MiB", MiB)  # sizes in the table
    out = [f"offload plan: {plan.model.name}, weights {plan.dtype} ({_size(total)}), "
           f"KV cache {plan.kv_dtype}, input {plan.input_len}, output {plan.output_len}, prefetch "
           f"{'on' if b.prefetch else 'off'}",
           f"tiers: {tiers}",
           f"units: {len(layers)} layers of {layers[0].bytes / MiB:.1f} MiB; {others}",
           "",
           f"  {'batch':>5} {'resident':>9} {'offloaded':>10} {'tier':>9} {'KV cache':>9} {'device':>9} "
           f"{'transfer':>9} {'step':>9} {'prefill':>9} {'tokens/s':>9}  bound",
           f"  {'':>5} {unit:>9} {unit:>10} {'':>9} {unit:>9} {'ms':>9} {'ms':>9} {'ms':>9} {'s':>9}"]
    for p in plan.sweep:
        mark = "  <- chosen" if p is best else ""
        out.append(f"  {p.batch_size:>5} {p.resident_bytes / size:>9.2f} {p.offloaded_bytes / size:>10.2f} {p.tier:>9} "
                   f"{p.kv_cache_bytes / size:>9.2f} {1e3 * p.decode_compute_s:>9.2f} {1e3 * p.transfer_s:>9.2f} "
                   f"{1e3 * p.decode_step_s:>9.2f} {p.prefill_s:>9.2f} {_rate(p.tokens_per_s):>9}  {p.bound}{mark}")
    first = plan.sweep[0]
    out += ["", f"chosen: batch {best.batch_size}, predicted {_rate(best.tokens_per_s)} output tokens/s "
                f"({best.tokens_per_s / first.tokens_per_s:.1f}x batch {first.batch_size})"]
    if best.tier == "none":
        out.append(f"  everything stays on the device: {_size(best.resident_bytes)} of weights and "
                   f"{_size(best.kv_cache_bytes)} of KV cache")
    else:
        where = {"cpu": "pinned CPU memory", "disk": "disk",
                 "cpu+disk": f"pinned CPU memory ({_size(best.cpu_bytes)}) and on disk"}[best.tier]
        out.append(f"  {best.num_offloaded_units} of {len(units)} units ({_size(best.offloaded_bytes)}) live in "
                   f"{where}; every step moves them once, {1e3 * best.transfer_s:.1f} ms, shared by the batch's "
                   f"{best.batch_size} sequences; the device's own step takes {1e3 * best.decode_compute_s:.1f} ms, "
                   f"so it is "
                   f"{best.bound}-bound")
    following = [p for p in plan.sweep if p.batch_size > best.batch_size]
    if following:
        nxt = following[0]
        out.append(f"  batch {nxt.batch_size} would need {_size(nxt.kv_cache_bytes)} of KV cache, pushing "
                   f"{_size(nxt.offloaded_bytes - best.offloaded_bytes)} more weights off the device: "
                   f"{_rate(nxt.tokens_per_s)} tokens/s")
    else:
        out.append("  a larger batch does not fit: its KV cache (which stays on the device) and two units in "
                   "flight leave no room")
    out.append(f"engine options: {engine_flags(plan)}")
    return "\n".join(out)


def offload_explain(plan: OffloadPlan) -> str:
    """The cost model's formulas with the chosen batch's numbers filled in."""
    b, p = plan.budgets, plan.best
    disk_bandwidth = b.disk_bandwidth if b.device_is_cpu else min(b.disk_bandwidth, b.link_bandwidth)
    steps = -(-p.batch_size * plan.input_len // b.max_num_batched_tokens)
    lines = ["How the numbers are derived (chosen batch):",
             f"  device memory {_size(b.device_memory)} >= resident weights {_size(p.resident_bytes)} + KV cache "
             f"{_size(p.kv_cache_bytes)} (batch x (input + output) x KV bytes per token) + activations "
             f"{_size(p.activation_bytes)} + two units in flight {_size(p.in_flight_bytes)}; units leave the device "
             "in the engine's order: decoder layers, the LM head, the embedding"]
    if p.tier != "none":
        lines.append(f"  transfer per step = pinned bytes / {b.link_bandwidth / 1e9:.2f} GB/s (host link) + disk bytes / "
                     f"{disk_bandwidth / 1e9:.2f} GB/s = {1e3 * p.transfer_s:.1f} ms ({_size(p.cpu_bytes)} pinned, "
                     f"{_size(p.offloaded_bytes - p.cpu_bytes)} on disk; a tied table counts twice, a table read by "
                     "rows not at all)")
    lines += [f"  decode step = {'max' if b.prefetch else 'sum'}(device step {1e3 * p.decode_compute_s:.2f} ms (the "
              f"roofline at batch {p.batch_size}), transfer {1e3 * p.transfer_s:.2f} ms) = "
              f"{1e3 * p.decode_step_s:.2f} ms",
              f"  prefill = {'max' if b.prefetch else 'sum'}(roofline prefill, {steps} step(s) of "
              f"max_num_batched_tokens {b.max_num_batched_tokens} x transfer) = {p.prefill_s:.3f} s",
              f"  tokens/s = batch x output / (prefill + output x step) = {p.batch_size} x {plan.output_len} / "
              f"({p.prefill_s:.3f} + {plan.output_len} x {p.decode_step_s:.4f}) = {_rate(p.tokens_per_s)}"]
    return "\n".join(lines)
