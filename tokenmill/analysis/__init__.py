"""Memory, roofline and latency/throughput analysis of a model on a piece of hardware.

    from tokenmill.analysis import analyze
    report = analyze("llama-2-7b", "a100-80gb", batch_size=8, input_len=512, output_len=128)
    report.memory.total_bytes, report.prefill_time_s, report.decode_time_s, report.decode.ops[0].bound
"""

from tokenmill.analysis.analyzer import AnalysisReport, analyze
from tokenmill.analysis.hardware import HARDWARE, Hardware, get_hardware
from tokenmill.analysis.model_shape import MODEL_PRESETS, ModelShape, get_model_shape

__all__ = ["analyze", "AnalysisReport", "Hardware", "HARDWARE", "get_hardware", "ModelShape", "MODEL_PRESETS",
           "get_model_shape"]
