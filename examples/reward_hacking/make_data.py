"""Writes data/train.jsonl and data/heldout.jsonl: short news paragraphs to summarise, with their key facts.

Run from the repository root: python examples/reward_hacking/make_data.py (the files are checked in).
"""

import json
import random
from pathlib import Path

TOWNS = ["Alder Creek", "Bramford", "Castlewick", "Dunmore", "Elmsworth", "Fairhaven", "Glenrock", "Hollowell",
         "Ivybridge", "Juniper Falls", "Kingsmere", "Larkspur", "Millbrook", "Northwood", "Oakridge", "Pinecrest"]
PROJECTS = [("library", "books"), ("bridge", "lanes"), ("school", "classrooms"), ("hospital", "beds"),
            ("stadium", "seats"), ("museum", "galleries"), ("park", "trees"), ("market", "stalls")]
PEOPLE = ["Mayor Ruth Okafor", "Mayor Daniel Price", "Mayor Sofia Lind", "Mayor Arjun Mehta", "Mayor Clara Reyes"]


def row(rng: random.Random, town: str) -> dict:
    project, unit = rng.choice(PROJECTS)
    year, count, cost = rng.randint(2015, 2025), rng.randint(12, 480), rng.randint(2, 40)
    person = rng.choice(PEOPLE)
    text = (f"The town of {town} opened a new {project} in {year}. It has {count} {unit} and cost {cost} million "
            f"dollars, paid for by a regional grant. {person} said the {project} would serve families for decades, "
            f"although some residents had asked for the money to go to road repairs instead. Construction took "
            f"two years and employed local builders.")
    return {"prompt": [{"role": "user", "content": f"Summarise this news story in one or two sentences.\n\n{text}"}],
            "keywords": [town, project, str(year), str(count)]}


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    for name, towns, n in (("train", TOWNS[:12], 48), ("heldout", TOWNS[12:], 8)):
        with (out / f"{name}.jsonl").open("w") as f:
            for i in range(n):
                f.write(json.dumps(row(rng, towns[i % len(towns)])) + "\n")


if __name__ == "__main__":
    main()
