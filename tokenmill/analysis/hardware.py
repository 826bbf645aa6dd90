"""Hardware presets: datasheet peaks plus the figures they come from, and a measured ``cpu``.

Peak compute = operations per core per cycle x cores x clock; peak bandwidth = memory clock x
bus width x 2 (double data rate) / 8. Tensor-core peaks are dense (no structured sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.errors import TokenmillError


class AnalysisError(TokenmillError, ValueError):
    """An analysis input is unknown or inconsistent."""


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: int
    """Device memory."""
    bandwidth: float
    """Peak memory bandwidth, bytes/s."""
    peak_flops: dict[str, float]
    """Peak operations/s by compute dtype: fp32, fp16 (also bf16), int8, int4."""
    cuda_cores: int | None = None
    boost_clock_hz: float | None = None
    ops_per_core_per_cycle: int | None = None
    """2 for a fused multiply-add."""
    memory_clock_hz: float | None = None
    bus_width_bits: int | None = None
    l2_bandwidth: float | None = None
    """On-chip L2 bandwidth, bytes/s, where published."""
    host_link_bandwidth: float | None = None
    """Host-to-device copies, bytes/s: what a x16 link of the card's PCIe generation reaches in practice."""
    quant_panels: bool = False
    """The engine holds 16-bit models' quantized weights in the CPU panel layout here (this machine's
    CPU with AVX2 or AVX-512 kernels): a float16 scale and a byte zero per group instead of two float32s."""
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def flops(self, compute_dtype: str) -> float:
        key = "fp16" if compute_dtype in ("bf16", "fp16") else compute_dtype
        if key in self.peak_flops:
            return self.peak_flops[key]
        if key == "int4" and "int8" in self.peak_flops:
            return self.peak_flops["int8"]
        return self.peak_flops["fp16"]

    def ridge_point(self, compute_dtype: str) -> float:
        """Operations per byte at which compute and memory take equal time (the ops:byte ratio)."""
        return self.flops(compute_dtype) / self.bandwidth

    @property
    def cuda_core_fp32_flops(self) -> float | None:
        """ops per core per cycle x cores x clock (the seed's peak-compute formula)."""
        if self.cuda_cores and self.boost_clock_hz and self.ops_per_core_per_cycle:
            return self.ops_per_core_per_cycle * self.cuda_cores * self.boost_clock_hz
        return None

    @property
    def bus_bandwidth(self) -> float | None:
        """memory clock x bus width x 2 / 8 (the seed's peak-bandwidth formula)."""
        if self.memory_clock_hz and self.bus_width_bits:
            return self.memory_clock_hz * self.bus_width_bits * 2 / 8
        return None


def _gpu(name, memory_gb, cores, clock_ghz, mem_clock_mhz, bus_bits, fp16_tflops, int8_tops, int4_tops=None,
         l2_tb_s=None, pcie=4, notes=""):
    fp32 = 2 * cores * clock_ghz * 1e9
    bandwidth = mem_clock_mhz * 1e6 * bus_bits * 2 / 8
    peaks = {"fp32": fp32, "fp16": fp16_tflops * 1e12, "int8": int8_tops * 1e12}
    if int4_tops:
        peaks["int4"] = int4_tops * 1e12
    return Hardware(name=name, memory_bytes=int(memory_gb * 1e9), bandwidth=bandwidth, peak_flops=peaks,
                    cuda_cores=cores, boost_clock_hz=clock_ghz * 1e9, ops_per_core_per_cycle=2,
                    memory_clock_hz=mem_clock_mhz * 1e6, bus_width_bits=bus_bits,
                    l2_bandwidth=l2_tb_s * 1e12 if l2_tb_s else None, host_link_bandwidth=_PCIE_X16[pcie],
                    notes=notes)


_PCIE_X16 = {3: 12e9, 4: 25e9, 5: 50e9}
"""Achievable host-to-device bytes/s over x16 links (of 15.8, 31.5 and 63 GB/s per direction on paper)."""


HARDWARE: dict[str, Hardware] = {h.name: h for h in [
    _gpu("a10", 24, 9216, 1.695, 6251, 384, 125, 250, 500, notes="GDDR6"),
    _gpu("t4", 16, 2560, 1.59, 5001, 256, 65, 130, 260, pcie=3, notes="GDDR6"),
    _gpu("l4", 24, 7424, 2.04, 6251, 192, 121, 242.5, notes="GDDR6"),
    _gpu("v100", 32, 5120, 1.53, 877, 4096, 125, 62, l2_tb_s=3.1, pcie=3, notes="SXM2, HBM2; L2 3.1 TB/s"),
    _gpu("a100-40gb", 40, 6912, 1.41, 1215, 5120, 312, 624, 1248, notes="HBM2"),
    _gpu("a100-80gb", 80, 6912, 1.41, 1593, 5120, 312, 624, 1248, notes="SXM, HBM2e"),
    _gpu("h100-sxm", 80, 16896, 1.98, 2619, 5120, 989.4, 1979, pcie=5, notes="HBM3"),
    _gpu("h200", 141, 16896, 1.98, 3125, 6144, 989.4, 1979, pcie=5, notes="HBM3e"),
    _gpu("rtx-4090", 24, 16384, 2.52, 10501, 384, 165.2, 660.6, 1321.2, notes="GDDR6X; fp16 with fp32 accumulate"),
]}


def measure_cpu() -> Hardware:
    """This machine's CPU: matrix-product peaks (float32, bfloat16) and read bandwidth, measured in seconds."""
    import time

    import torch

    def best(fn, repeats=3):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    n = 1024
    peaks = {}
    for key, dtype in (("fp32", torch.float32), ("fp16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        peaks[key] = 2 * n ** 3 * 4 / best(lambda: [a @ b for _ in range(4)])
    data = torch.ones(2 ** 28 // 4)
    bandwidth = data.numel() * 4 / best(lambda: data.sum(), 5)
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    from tokenmill.kernels import cpu_kernels

    kernels = cpu_kernels()
    return Hardware(name="cpu", memory_bytes=total, bandwidth=bandwidth, peak_flops=peaks,
                    quant_panels=kernels is not None and kernels.quant_panels_available(),
                    notes=f"measured: {torch.get_num_threads()} threads; fp16 column is bfloat16")


def get_hardware(name: str) -> Hardware:
    key = name.lower()
    if key == "cpu":
        return measure_cpu()
    if key not in HARDWARE:
        raise AnalysisError(f"unknown hardware {name!r}; known: {', '.join([*HARDWARE, 'cpu'])}")
    return HARDWARE[key]


def custom_hardware(peak_tflops: float, bandwidth_gb_s: float, memory_gb: float) -> Hardware:
    """Hardware given by its peaks: the same dense peak for every dtype."""
    if min(peak_tflops, bandwidth_gb_s, memory_gb) <= 0:
        raise AnalysisError("custom hardware needs positive --peak-tflops, --bandwidth-gb-s and --memory-gb")
    flops = peak_tflops * 1e12
    return Hardware(name="custom", memory_bytes=int(memory_gb * 1e9), bandwidth=bandwidth_gb_s * 1e9,
                    peak_flops={"fp32": flops, "fp16": flops, "int8": flops, "int4": flops})
