"""Which autocast precision a device computes fast: ``training.mixed_precision=auto`` (the default).

* a CUDA GPU with bf16 (Ampere and later): ``bf16``; an older one: ``fp16`` (Accelerate scales the loss);
* a CPU with native bf16 (AVX512-BF16 or AMX, in ``/proc/cpuinfo``'s flags): ``bf16``;
* any other CPU: ``no``. bf16 autocast there is emulated: ~10x slower per step than float32 (NOTES, measured on
  an AMD EPYC with AVX2 only: 31.9 s against 3.4 s for the same tiny-preset step).

``no``, ``bf16`` and ``fp16`` are taken as set.
"""

from __future__ import annotations

from pathlib import Path

NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def choose_precision(requested: str, cuda: bool, cuda_bf16: bool, cpu_flags: frozenset[str]) -> tuple[str, str]:
    """``(precision, why)`` for ``requested`` on a device described by the other arguments."""
    if requested != "auto":
        return requested, "as set"
    if cuda:
        if cuda_bf16:
            return "bf16", "auto: the GPU computes bf16"
        return "fp16", "auto: the GPU has no bf16, so fp16 with loss scaling"
    if NATIVE_BF16_CPU_FLAGS & cpu_flags:
        return "bf16", "auto: the CPU computes bf16 natively (AVX512-BF16 / AMX)"
    return "no", "auto: the CPU has no native bf16, where bf16 autocast is ~10x slower than float32"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def device_precision(requested: str) -> tuple[str, str]:
    """``(precision, why)`` for ``requested`` on this machine's training device."""
    import torch

    cuda = torch.cuda.is_available()
    return choose_precision(requested, cuda, cuda and torch.cuda.is_bf16_supported(), cpu_flags())
