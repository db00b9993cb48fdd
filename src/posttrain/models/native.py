"""posttrain's own CPU kernels in C++: built on first use with the system compiler, loaded with ctypes.

- ``kernels/span_attention_avx512bf16.cpp``: causal attention of packed spans in bf16 on a CPU with AVX512-BF16
  (forward and backward of a whole layer in one call; see :mod:`posttrain.models.attention`). PyTorch's CPU
  matmuls cannot multiply bf16 into an fp32 result, which attention's scores need; its ``vdpbf16ps`` products do,
  at the bf16 rate.
- ``kernels/span_attention_fp32_avx2.cpp``: the same attention in fp32 with AVX2 and FMA, for the CPUs without
  fast bf16, where posttrain trains in fp32 (instead of PyTorch's fp32 flash kernel called once per span).
- ``kernels/swiglu_fp32_avx2.cpp``: the backward of the Llama-form MLP's ``silu(g) * u`` in one pass, fp32
  (:mod:`posttrain.models.fused_mlp`).

Build: ``$CXX`` (default ``g++``) compiles a source once into ``$POSTTRAIN_CACHE/kernels/`` (a file named by the
hash of source and flags, written atomically, so concurrent processes are safe), in about a second. No compiler,
a CPU without the instructions, or a failed build: a one-time warning (for a failed build) names the reason and
the PyTorch path serves. ``POSTTRAIN_CPU_ATTENTION=products`` (the PyTorch matrix-product path) or ``=sdpa`` skip
the attention kernels; ``POSTTRAIN_CPU_KERNELS=0`` skips every kernel here.

The libraries are linked against OpenMP (``-fopenmp``); torch has loaded its libgomp by then, so the kernels'
threads are torch's own pool (``torch.get_num_threads()`` of them).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.runtime import cache_dir, cpu_flags

KERNELS_DIR = Path(__file__).with_name("kernels")
_COMMON_FLAGS = ("-O3", "-std=c++17", "-fopenmp", "-fPIC", "-shared", "-Wno-maybe-uninitialized")


@dataclass(frozen=True)
class Kernel:
    name: str
    source: str  # file in kernels/
    isa_flags: tuple[str, ...]  # compiler flags for the instructions it uses
    cpu_needs: tuple[str, ...]  # /proc/cpuinfo flags the CPU must have
    cpu_words: str  # the instructions, for messages


SPAN_BF16 = Kernel("span_attention_bf16", "span_attention_avx512bf16.cpp",
                   ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"),
                   ("avx512_bf16",), "AVX512-BF16")
SPAN_FP32 = Kernel("span_attention_fp32", "span_attention_fp32_avx2.cpp", ("-mavx2", "-mfma"), ("avx2", "fma"),
                   "AVX2 and FMA")
SWIGLU_FP32 = Kernel("swiglu_fp32", "swiglu_fp32_avx2.cpp", ("-mavx2", "-mfma"), ("avx2", "fma"), "AVX2 and FMA")

unavailable_reason: str | None = None  # why the last attention kernel asked for is not used
unavailable_reasons: dict[str, str] = {}  # kernel name -> why it is not used, once asked


def _cpu_has_avx512_bf16() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and "avx512_bf16" in cpu_flags()


def _cpu_has_avx2_fma() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= cpu_flags()


def _cpu_has(kernel: Kernel) -> bool:
    return _cpu_has_avx512_bf16() if kernel is SPAN_BF16 else _cpu_has_avx2_fma()


def _build(compiler: str, kernel: Kernel = SPAN_BF16) -> Path:
    source_path = KERNELS_DIR / kernel.source
    # the kernels' shared headers are part of the key: a change to one rebuilds every kernel
    source = source_path.read_bytes() + b"".join(h.read_bytes() for h in sorted(KERNELS_DIR.glob("*.h")))
    flags = [*_COMMON_FLAGS[:2], *kernel.isa_flags, *_COMMON_FLAGS[2:]]
    key = hashlib.sha256(source + " ".join([compiler, *flags, torch.__version__]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{kernel.name}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, "-o", str(built), str(source_path)], capture_output=True,
                                text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-800:]}")
        os.replace(built, target)
    return target


def _switched_off(kernel: Kernel) -> str | None:
    if os.environ.get("POSTTRAIN_CPU_KERNELS", "1") == "0":
        return "POSTTRAIN_CPU_KERNELS=0"
    choice = os.environ.get("POSTTRAIN_CPU_ATTENTION", "native")
    if kernel.name.startswith("span_attention") and choice in ("products", "sdpa"):
        return f"POSTTRAIN_CPU_ATTENTION={choice}"
    return None


def library(kernel: Kernel) -> ctypes.CDLL | None:
    """The compiled kernel, or None (with ``unavailable_reasons[kernel.name]`` set, and a warning if a build
    failed). The switches are read on every call; the build and load happen once per process."""
    reason = _switched_off(kernel)
    lib = None
    if reason is None:
        lib, reason = _load(kernel)
    if reason is None:
        unavailable_reasons.pop(kernel.name, None)
    else:
        unavailable_reasons[kernel.name] = reason
    return lib


def span_attention_library() -> ctypes.CDLL | None:
    """The AVX512-BF16 attention kernel, or None (``unavailable_reason`` says why)."""
    global unavailable_reason
    lib = library(SPAN_BF16)
    unavailable_reason = unavailable_reasons.get(SPAN_BF16.name)
    return lib


def span_attention_fp32_library() -> ctypes.CDLL | None:
    """The fp32 AVX2 attention kernel, or None (``unavailable_reasons['span_attention_fp32']`` says why)."""
    return library(SPAN_FP32)


def swiglu_library() -> ctypes.CDLL | None:
    return library(SWIGLU_FP32)


@functools.cache
def _load(kernel: Kernel = SPAN_BF16) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None), or (None, why not)."""
    if not _cpu_has(kernel):
        return None, f"this CPU has no {kernel.cpu_words}"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH"
    try:
        lib = ctypes.CDLL(str(_build(compiler, kernel)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        reason = f"build failed: {exc}"
        warnings.warn(f"posttrain: the {kernel.cpu_words} kernel {kernel.source} is not used ({reason}); "
                      "PyTorch's ops run instead", stacklevel=3)
        return None, reason
    _declare(kernel, lib)
    return lib, None


def _declare(kernel: Kernel, lib: ctypes.CDLL) -> None:
    pointer, longs = ctypes.c_void_p, ctypes.POINTER(ctypes.c_long)
    if kernel.name.startswith("span_attention"):
        common = [ctypes.c_long] * 5  # B, H, Hkv, T, D
        tail = [ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int]  # spans, n_spans, scale, threads
        lib.posttrain_span_attention_forward.argtypes = [pointer, longs] * 4 + [pointer] + common + tail
        lib.posttrain_span_attention_backward.argtypes = [pointer, longs] * 5 + [pointer] + [pointer, longs] * 3 \
            + common + tail
        lib.posttrain_span_attention_forward.restype = ctypes.c_int
        lib.posttrain_span_attention_backward.restype = ctypes.c_int
    elif kernel is SWIGLU_FP32:
        lib.posttrain_swiglu_backward.argtypes = [pointer] * 5 + [ctypes.c_long, ctypes.c_int]
        lib.posttrain_swiglu_backward.restype = None


def strides(t: torch.Tensor):
    """(batch, head, position) strides of a (B, H, T, D) tensor, as the kernel's ``const long*``."""
    return (ctypes.c_long * 3)(t.stride(0), t.stride(1), t.stride(2))
