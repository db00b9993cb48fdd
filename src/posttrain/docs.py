"""Regenerate the generated parts of the docs: ``python -m posttrain.docs``.

Two sections are generated, each between a start and an end marker, and tests keep both in sync:

- docs/config.md, the configuration reference: every config-driven command's keys (``<!-- keys:start -->``);
- README.md, the layout map: every package and module of src/posttrain with the first sentence of its docstring
  (``<!-- layout:start -->``), read from the source files with :func:`ast.get_docstring`, never by importing them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parents[1]
README = ROOT / "README.md"
CONFIG_DOC = ROOT / "docs" / "config.md"

KEYS = ("<!-- keys:start -->\n", "<!-- keys:end -->")
LAYOUT = ("<!-- layout:start -->\n", "<!-- layout:end -->")
SPECIAL = ("__init__.py", "__main__.py")  # a package's own files: not entries of the layout map


def config_reference() -> str:
    """The configuration reference as Markdown tables, one per config-driven command."""
    from posttrain.commands import markdown_reference

    return markdown_reference()


def docstring(path: Path) -> str:
    """The docstring of a module's source file, or "" (a package without ``__init__.py`` has none)."""
    if not path.is_file():
        return ""
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))) or ""


def purpose(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line, Sphinx roles turned into code spans."""
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph, maxsplit=1)[0]
    sentence = re.sub(r":[a-z]+:`~?\.?([^`]+)`", r"`\1`", sentence)  # :mod:`posttrain.loop.run` -> `posttrain.loop.run`
    return sentence.replace("``", "`")


def _is_package(path: Path) -> bool:
    """A directory of Python modules: a regular package, or one still missing its ``__init__.py``."""
    return path.is_dir() and path.name != "__pycache__" and (
        (path / "__init__.py").is_file() or any(path.glob("*.py")))


def _children(package: Path) -> list[Path]:
    """A package's modules (but its ``__init__``/``__main__``) and subpackages, sorted by name."""
    return sorted((p for p in package.iterdir()
                   if (p.suffix == ".py" and p.name not in SPECIAL) or _is_package(p)),
                  key=lambda p: p.name)


def source_files(package: Path = PACKAGE_DIR) -> list[Path]:
    """Every file whose docstring says what a package or module is for: each module, and each package's
    ``__init__.py`` and ``__main__.py`` (a package's ``__init__.py`` is listed even when it does not exist yet)."""
    files = [package / "__init__.py"] + ([package / "__main__.py"] if (package / "__main__.py").is_file() else [])
    for child in _children(package):
        files += source_files(child) if child.is_dir() else [child]
    return files


def layout_markdown(package: Path = PACKAGE_DIR) -> str:
    """A nested Markdown list of ``package``'s packages and modules, each with the first sentence of its docstring."""

    def entries(pkg: Path, depth: int) -> list[str]:
        lines = []
        for child in _children(pkg):
            doc = docstring(child / "__init__.py" if child.is_dir() else child)
            name = child.name + ("/" if child.is_dir() else "")
            lines.append(f"{'  ' * depth}- `{name}`: {purpose(doc) or '(no docstring)'}")
            if child.is_dir():
                lines += entries(child, depth + 1)
        return lines

    return "\n".join(entries(package, 0)) + "\n"


def replace_between(path: Path, markers: tuple[str, str], content: str) -> None:
    """Rewrite the text between ``markers`` (each present exactly once) in ``path``."""
    start, end = markers
    text = path.read_text(encoding="utf-8")
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{path}: expected one {start.strip()} before one {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + start + content + end + tail, encoding="utf-8")


def between(path: Path, markers: tuple[str, str]) -> str:
    """The text between ``markers`` in ``path``."""
    start, end = markers
    text = path.read_text(encoding="utf-8")
    return text[text.index(start) + len(start): text.index(end)]


def main() -> None:
    replace_between(CONFIG_DOC, KEYS, config_reference())
    replace_between(README, LAYOUT, layout_markdown())
    print(f"wrote {CONFIG_DOC.relative_to(ROOT)} (configuration reference) and {README.relative_to(ROOT)} (layout map)")


if __name__ == "__main__":
    main()
