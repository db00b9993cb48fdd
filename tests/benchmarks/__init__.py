"""Tests of the benchmark scripts under benchmarks/ (scripts, not part of the package: loaded from their paths)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests import ROOT_DIR


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as module ``name``, registered in sys.modules (dataclasses resolve their
    annotations through it)."""
    spec = importlib.util.spec_from_file_location(name, ROOT_DIR / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
