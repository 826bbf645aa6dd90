"""The ``tokenmill analyze`` command: its arguments, and the roofline or offload-plan report it prints."""

from __future__ import annotations

import sys


def add_analyze_command(sub) -> None:
    """Adds ``analyze`` to the top-level subparsers ``sub``."""
    ana = sub.add_parser("analyze", help="memory, roofline and latency/throughput analysis of a model on hardware")
    ana.add_argument("--model", required=True, help="preset (e.g. llama-2-7b, opt-175b) or a config.json path/folder")
    ana.add_argument("--hardware", default="a100-80gb", help="preset (a10, t4, l4, v100, a100-40gb, a100-80gb, "
                                                             "h100-sxm, h200, rtx-4090) or cpu (measured)")
    ana.add_argument("--peak-tflops", type=float, help="custom hardware: peak TFLOPS (with --bandwidth-gb-s)")
    ana.add_argument("--bandwidth-gb-s", type=float, help="custom hardware: memory bandwidth in GB/s")
    ana.add_argument("--memory-gb", type=float, default=80, help="custom hardware: memory in GB")
    ana.add_argument("--batch-size", type=int, default=1)
    ana.add_argument("--input-len", type=int, default=512)
    ana.add_argument("--output-len", type=int, default=128)
    ana.add_argument("--dtype", default="fp16", help="weights: fp32, fp16, bf16, int8, int4")
    ana.add_argument("--kv-dtype", help="KV cache dtype (default: fp16, or fp32 with fp32 weights)")
    ana.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    ana.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ana.add_argument("--plot", help="write the roofline and batch-sweep chart to this PNG")
    ana.add_argument("--explain", action="store_true", help="show the formulas with the numbers filled in")
    ana.add_argument("--measure", metavar="MODEL_DIR", help="also run the engine here at the same shapes "
                                                          "(with --offload: the chosen placement and batch)")
    ana.add_argument("--offload", action="store_true",
                     help="plan weight offloading: which units stay on the device, which stream from CPU memory or "
                          "disk, and the batch size with the most tokens/s")
    ana.add_argument("--gpu-memory", help="--offload on a GPU: its memory budget, e.g. 16GiB (default: the card's)")
    ana.add_argument("--cpu-memory", help="--offload: CPU memory for offloaded weights on a GPU (pinned; default "
                                          "none), or the device's memory with --hardware cpu (default: all of it)")
    ana.add_argument("--disk-bandwidth", type=float, default=2.0, help="--offload: GB/s that reading offloaded "
                                                                       "weights from disk reaches (default 2)")
    ana.add_argument("--link-bandwidth", type=float, help="--offload on a GPU: host-to-device GB/s (default: the "
                                                          "card's PCIe generation, x16)")
    ana.add_argument("--no-prefetch", action="store_true", help="--offload: plan without overlapping transfers")
    ana.add_argument("--max-num-batched-tokens", type=int, default=2048, help="--offload: tokens per prefill step")
    ana.set_defaults(func=_analyze)


def _analyze(args) -> None:
    from tokenmill.analysis import analyze
    from tokenmill.analysis.hardware import custom_hardware
    from tokenmill.analysis.report import explain, text_report

    hardware = args.hardware
    if args.peak_tflops or args.bandwidth_gb_s:
        hardware = custom_hardware(args.peak_tflops or 0, args.bandwidth_gb_s or 0, args.memory_gb or 0)
    if args.offload:
        _analyze_offload(args, hardware)
        return
    report = analyze(args.model, hardware, batch_size=args.batch_size, input_len=args.input_len,
                     output_len=args.output_len, dtype=args.dtype, kv_dtype=args.kv_dtype, tp=args.tp)
    result = report.to_dict()
    if args.measure:
        from tokenmill.analysis.measure import measure_engine

        result["measured"] = measure_engine(args.measure, report)
    _show_analysis(args, result, lambda: text_report(report), lambda: explain(report), lambda m: (
        f"measured on this machine ({args.measure}): TTFT {m['measured_ttft_s'] * 1e3:.1f} ms vs predicted "
        f"{m['predicted_ttft_s'] * 1e3:.1f} ms (x{m['ttft_ratio']:.2f}); {m['measured_ms_per_token']:.2f} ms/token "
        f"vs predicted {m['predicted_ms_per_token']:.2f} (x{m['ms_per_token_ratio']:.2f})"))
    if args.plot:
        from tokenmill.analysis.plot import plot_report

        plot_report(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def _analyze_offload(args, hardware) -> None:
    from tokenmill.analysis import get_hardware, get_model_shape
    from tokenmill.analysis.hardware import AnalysisError
    from tokenmill.analysis.offload_plan import OffloadBudgets, plan_offload
    from tokenmill.analysis.offload_report import offload_explain, offload_text
    from tokenmill.engine.memory import parse_memory

    hw = get_hardware(hardware) if isinstance(hardware, str) else hardware
    on_cpu = hw.name == "cpu"
    try:
        gpu_memory = parse_memory(args.gpu_memory, "--gpu-memory") if args.gpu_memory else hw.memory_bytes
        cpu_memory = parse_memory(args.cpu_memory, "--cpu-memory") if args.cpu_memory else (
            hw.memory_bytes if on_cpu else 0)
    except ValueError as error:
        raise AnalysisError(str(error)) from None
    if on_cpu and args.gpu_memory:
        raise AnalysisError("--gpu-memory applies to a GPU; with --hardware cpu give --cpu-memory")
    link = args.link_bandwidth * 1e9 if args.link_bandwidth else (hw.host_link_bandwidth or 25e9)
    budgets = OffloadBudgets(device_memory=cpu_memory if on_cpu else gpu_memory, cpu_memory=0 if on_cpu else cpu_memory,
                             link_bandwidth=link, disk_bandwidth=args.disk_bandwidth * 1e9, device_is_cpu=on_cpu,
                             prefetch=not args.no_prefetch, max_num_batched_tokens=args.max_num_batched_tokens)
    plan = plan_offload(get_model_shape(args.model), hw, budgets, args.input_len, args.output_len, args.dtype,
                        args.kv_dtype)
    result = plan.to_dict()
    if args.measure:
        from tokenmill.analysis.measure import measure_offload

        result["measured"] = measure_offload(args.measure, plan)
    _show_analysis(args, result, lambda: offload_text(plan), lambda: offload_explain(plan), lambda m: (
        f"measured on this machine ({args.measure}, batch {m['batch_size']}): {m['measured_tokens_per_s']:.1f} "
        f"output tokens/s vs predicted {m['predicted_tokens_per_s']:.1f} (x{m['tokens_per_s_ratio']:.2f})"))


def _show_analysis(args, result: dict, text, explanation, measured_line) -> None:
    """``result`` as JSON (``--json``), or the text report, with ``--explain`` and ``--measure`` lines."""
    import json

    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(text())
    if args.explain:
        print("\n" + explanation())
    if args.measure:
        print("\n" + measured_line(result["measured"]))
