"""What this machine computes natively. Precision choices ask here; benchmark records say it.

No torch at import: the serving image may run ONNX Runtime alone.
"""

from __future__ import annotations

from pathlib import Path

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX).

    Not oneDNN's own check (torch.ops.mkldnn._is_mkldnn_bf16_supported): that is also True on AVX512 CPUs
    without them, where oneDNN emulates bf16; on such a Xeon a 3x3 convolution's forward and backward ran
    2.5-3x slower in bf16 than in fp32.
    """
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if probe is not None]
    if probes:
        return any(bool(probe()) for probe in probes)
    return bool(cpu_flags() & BF16_CPU_FLAGS)  # a torch without the probes: ask the kernel


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def convolution_layout(device_type: str, precision: str) -> str:
    """"channels_last" (NHWC) or "contiguous" (NCHW): the memory layout the networks run in, by measurement.

    Channels-last is what tensor-core convolutions read on a GPU, and oneDNN's faster layout for fp32 on the
    CPU (`diffad bench training`, small preset, a 2-core Xeon: 1.2-1.4x per training step, 1.3x inference).
    bf16 on a CPU stays NCHW: an earlier measurement on a CPU with native bf16 found channels-last slower
    there (GroupNorm's kernels); `diffad bench training` on such a CPU times both. The values are the same.
    """
    if device_type == "cpu" and precision == "bf16":
        return "contiguous"
    return "channels_last"
