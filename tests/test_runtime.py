"""The runtime's CPU detection."""

from __future__ import annotations

import pytest


def test_the_avx2_switch_hides_avx512(monkeypatch):
    from posttrain import runtime

    runtime.cpu_flags.cache_clear()
    monkeypatch.setenv("POSTTRAIN_CPU_ISA", "avx2")
    try:
        flags = runtime.cpu_flags()
        assert not any(f.startswith(("avx512", "amx")) for f in flags) and not runtime.cpu_has_native_bf16()
    finally:
        runtime.cpu_flags.cache_clear()


def test_an_unknown_isa_is_an_error(monkeypatch):
    from posttrain import runtime
    from posttrain.errors import ConfigError

    runtime.cpu_flags.cache_clear()
    monkeypatch.setenv("POSTTRAIN_CPU_ISA", "sse")
    try:
        with pytest.raises(ConfigError, match="POSTTRAIN_CPU_ISA"):
            runtime.cpu_flags()
    finally:
        runtime.cpu_flags.cache_clear()
