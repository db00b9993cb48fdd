"""posttrain's test suite: a folder per source package (tests/data tests posttrain.data, ...); tests of top-level
modules, the layout and the docs sit here, with the shared helpers (families, serving, conftest)."""

from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parent.parent  # the repository
