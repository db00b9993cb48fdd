"""Regenerate the README's configuration reference: ``python -m posttrain.docs``."""

from pathlib import Path

from posttrain.config import markdown_reference

START, END = "<!-- keys:start -->\n", "<!-- keys:end -->"


def write_readme_reference(readme: Path) -> None:
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + markdown_reference() + END + tail)


if __name__ == "__main__":
    write_readme_reference(Path(__file__).resolve().parents[2] / "README.md")
