"""posttrain's own CPU kernels in C++: built on first use with the system compiler, loaded with ctypes.

One kernel so far: ``kernels/span_attention_avx512bf16.cpp``, the causal attention of packed spans on a CPU
with AVX512-BF16 (forward and backward of a whole layer in one call; see :mod:`posttrain.models.attention`).
PyTorch's CPU matmuls cannot multiply bf16 into an fp32 result, which attention's scores need; the kernel's
``vdpbf16ps`` products do, at the bf16 rate.

Build: ``$CXX`` (default ``g++``) compiles the source once into ``$POSTTRAIN_CACHE/kernels/`` (a file named by the
hash of source and flags, written atomically, so concurrent processes are safe), in about a second. No compiler,
a CPU without AVX512-BF16, or a failed build: a one-time warning names the reason and the PyTorch path serves.
``POSTTRAIN_CPU_ATTENTION=products`` (the PyTorch matrix-product path) or ``=sdpa`` skip the kernel.

The library is linked against OpenMP (``-fopenmp``); torch has loaded its libgomp by then, so the kernel's threads
are torch's own pool (``torch.get_num_threads()`` of them).
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
from pathlib import Path

import torch

from posttrain.runtime import cache_dir, cpu_flags

SOURCE = Path(__file__).with_name("kernels") / "span_attention_avx512bf16.cpp"
FLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
         "-fopenmp", "-fPIC", "-shared", "-Wno-maybe-uninitialized"]

unavailable_reason: str | None = None  # why the kernel is not used, once asked


def _cpu_has_avx512_bf16() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and "avx512_bf16" in cpu_flags()


def _build(compiler: str) -> Path:

    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, torch.__version__]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"span_attention_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-800:]}")
        os.replace(built, target)
    return target


def span_attention_library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with ``unavailable_reason`` set, and a warning if a build failed). The
    switch is read on every call; the build and load happen once per process."""
    global unavailable_reason
    choice = os.environ.get("POSTTRAIN_CPU_ATTENTION", "native")
    if choice in ("products", "sdpa"):
        unavailable_reason = f"POSTTRAIN_CPU_ATTENTION={choice}"
        return None
    library, unavailable_reason = _load()
    return library


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None), or (None, why not)."""
    if not _cpu_has_avx512_bf16():
        return None, "this CPU has no AVX512-BF16"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH"
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        reason = f"build failed: {exc}"
        warnings.warn(f"posttrain: the AVX512-BF16 attention kernel is not used ({reason}); "
                      "attention runs as PyTorch matrix products instead", stacklevel=3)
        return None, reason
    pointer, longs = ctypes.c_void_p, ctypes.POINTER(ctypes.c_long)
    common = [ctypes.c_long] * 5  # B, H, Hkv, T, D
    tail = [ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int]  # spans, n_spans, scale, threads
    library.posttrain_span_attention_forward.argtypes = [pointer, longs] * 4 + [pointer] + common + tail
    library.posttrain_span_attention_backward.argtypes = [pointer, longs] * 5 + [pointer] + [pointer, longs] * 3 \
        + common + tail
    library.posttrain_span_attention_forward.restype = ctypes.c_int
    library.posttrain_span_attention_backward.restype = ctypes.c_int
    return library, None


def strides(t: torch.Tensor):
    """(batch, head, position) strides of a (B, H, T, D) tensor, as the kernel's ``const long*``."""
    return (ctypes.c_long * 3)(t.stride(0), t.stride(1), t.stride(2))
