"""What the hardware is, for the planner, the config and the engine alike: CPU bf16 support, the precision
``auto`` resolves to, the CPU heap setting, and where posttrain caches files. It imports nothing of posttrain but ``errors``, so
every layer can depend on it without depending on each other."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from posttrain.errors import ConfigError


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the Linux kernel reports them (empty elsewhere).

    ``POSTTRAIN_CPU_ISA=avx2`` hides the AVX-512 and AMX flags, so posttrain takes the path of a CPU without them
    (fp32 under ``precision: auto``, no native bf16 kernel): with ``ATEN_CPU_CAPABILITY=avx2`` and
    ``ONEDNN_MAX_CPU_ISA=AVX2`` for PyTorch's own kernels, an AVX-512 machine then runs what an AVX2 one runs
    (at its own clock speed), which is how the AVX2 timings in the README are taken on such a machine."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags = frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                            if line.startswith("flags")), []))
    isa = os.environ.get("POSTTRAIN_CPU_ISA", "").lower()
    if isa == "avx2":
        flags = frozenset(f for f in flags if not f.startswith(("avx512", "amx")))
    elif isa:
        raise ConfigError(f"POSTTRAIN_CPU_ISA: expected 'avx2' (or unset), got {isa!r}")
    return flags


def cpu_has_native_bf16() -> bool:
    """True if the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX).

    Without them bf16 matmuls fall back to a slow path: on this project's AVX2 CI machine a 1024^2 bf16
    matmul runs at ~0.5 GFLOP/s against ~20 for fp32, so bf16 autocast would be ~40x slower, not faster.
    """
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX)
HEAP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: give the heap's top back only past 2 GB free


def keep_cpu_heap() -> bool:
    """On Linux/glibc, serve CPU tensors below 32 MB from malloc's heap and do not trim it after every step.

    glibc's defaults hand big blocks back to the kernel (mmap threshold and heap trimming that adapt as blocks
    are freed), so a step's activations and the head's 25 MB fp32 blocks would be fresh pages on every step
    (page faults and speed measured in docs/benchmarks.md, "Measurements behind the code"). The same as ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=2147483647``, applied at run time. Skipped, returning False, when either variable is
    already set (the user's choice wins), when ``POSTTRAIN_CPU_MALLOC=default``, or without glibc's
    ``mallopt``. Returns True when applied."""
    import ctypes
    import os
    import platform

    if os.environ.get("POSTTRAIN_CPU_MALLOC", "keep") == "default" or platform.system() != "Linux":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, HEAP_MMAP_THRESHOLD) and mallopt(m_trim_threshold, HEAP_TRIM_THRESHOLD))


def resolve_mixed_precision(precision: str) -> str:
    """``precision`` -> accelerate's mixed_precision. auto = bf16 where the hardware runs it natively."""
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return "bf16" if cpu_has_native_bf16() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def cache_dir() -> Path:
    """Root of posttrain's cache: ``$POSTTRAIN_CACHE`` or ``~/.cache/posttrain``."""
    env = os.environ.get("POSTTRAIN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "posttrain"
