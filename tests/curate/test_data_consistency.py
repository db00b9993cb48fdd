"""Audit consistency, language and accuracy checks, and the matching clean filters, on crafted rows whose
problems are known by construction (no tokenizer or model needed)."""

from __future__ import annotations

import json

import pytest

from posttrain.curate.accuracy import code_problems, json_problem, reference_problem
from posttrain.curate.audit import audit, write_reports
from posttrain.curate.clean import CleanConfig, clean
from posttrain.curate.consistency import detect_language, style_features
from posttrain.errors import ConfigError

# Twenty distinct English prompt/answer pairs in plain prose: no markdown, no first person, no exclamation,
# emoji, hedge or apology, and answer/prompt length ratios within a factor of three of each other.
ENGLISH = [
    ("How do plants make food?", "Plants capture sunlight with chlorophyll and turn water and carbon dioxide into sugar and oxygen."),
    ("Why is the sky blue?", "Air molecules scatter short blue wavelengths of sunlight much more strongly than the longer red ones."),
    ("What causes the tides?", "The gravity of the moon pulls the oceans toward it, raising a bulge of water that travels around the planet."),
    ("How does a vaccine work?", "A vaccine shows the immune system a harmless piece of a germ so that it can recognise the real thing later."),
    ("What is inflation?", "Inflation is the general rise of prices over time, which means each unit of money buys fewer goods."),
    ("Why do cats purr?", "Cats purr when content, but also when stressed, because the vibration seems to soothe them and help healing."),
    ("How do bees communicate?", "Honey bees perform a waggle dance whose angle and duration tell the others where the flowers are."),
    ("What is a black hole?", "A black hole is a region of space where gravity is so strong that not even light can escape from it."),
    ("How do earthquakes happen?", "Earthquakes happen when stress built up along a fault is released suddenly as the rocks slip past each other."),
    ("Why do leaves change colour?", "In autumn trees stop making chlorophyll, so the yellow and orange pigments hidden underneath become visible."),
    ("What does the heart do?", "The heart is a muscular pump that pushes blood through the arteries to deliver oxygen to every organ."),
    ("How is glass made?", "Glass is made by melting sand with soda and lime at a very high temperature and then cooling it quickly."),
    ("What is photosynthesis for?", "It provides the energy that nearly every food chain on the planet depends on, from grass to whales."),
    ("Why does ice float?", "Water expands when it freezes, so solid ice is less dense than the liquid water around it and floats."),
    ("How do airplanes fly?", "The shape and angle of the wings push air downward, and the air pushes the wings upward with an equal force."),
    ("What is a volcano?", "A volcano is an opening in the crust where molten rock, ash and gases escape from deep below the surface."),
    ("Why do birds migrate?", "Many birds fly south in winter to reach places with more food and milder weather, then return to breed."),
    ("How does a compass work?", "A magnetised needle lines up with the magnetic field of the planet, so one end always points roughly north."),
    ("What is rust?", "Rust is iron oxide, a flaky reddish coating that forms when iron reacts with oxygen and moisture in the air."),
    ("Why do onions make people cry?", "Cutting an onion releases a sulfur compound that irritates the eyes, which respond by producing tears."),
]


def chat(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def lines_of(wheres: list[str]) -> list[int]:
    return [int(w.split(" ")[0].rsplit(":", 1)[1]) for w in wheres]


def as_markdown(answer: str) -> str:
    first, rest = answer.split(" ", 1)
    return f"## Short answer\n\n- **{first}** {rest}\n- See any textbook for details."


def test_mixed_markdown_is_flagged_with_the_minority_rows(tmp_path):
    rows = [chat(p, as_markdown(a) if i in (3, 7, 11, 15, 18, 19) else a) for i, (p, a) in enumerate(ENGLISH)]
    path = write(tmp_path / "style.jsonl", rows)
    s = audit(path, progress=False).summary()["consistency"]
    assert s["responses"] == 20 and s["shares"]["markdown"] == pytest.approx(0.3)
    assert s["shares"]["bullet_list"] == s["shares"]["header"] == s["shares"]["bold"] == pytest.approx(0.3)
    (mixed,) = s["mixed"]  # nothing else: no person/tone markers, no bimodal length ratio
    assert mixed["feature"] == "markdown" and mixed["minority"] == "with markdown"
    assert mixed["minority_responses"] == 6 and lines_of(mixed["examples"]) == [4, 8, 12, 16, 19]


def test_consistent_style_is_not_flagged_and_rare_outliers_are_not_a_second_style(tmp_path):
    rows = [chat(p, a) for p, a in ENGLISH]
    rows[5] = chat(ENGLISH[5][0], ENGLISH[5][1] + " Sorry, that is all there is to it!")  # 1 in 20: an outlier
    s = audit(write(tmp_path / "plain.jsonl", rows), progress=False).summary()["consistency"]
    assert s["mixed"] == [] and s["shares"]["apology"] == s["shares"]["exclamation"] == pytest.approx(0.05)
    assert 0.5 < s["length_ratio"]["median"] < 10 and s["length_ratio"]["iqr"] < 3


def test_bimodal_length_ratio_is_flagged(tmp_path):
    essay = " ".join(a for _, a in ENGLISH[:3])  # ~55 words for a 4-5 word prompt, against ~18 words
    rows = [chat(p, essay if i in (2, 9, 14, 17) else a) for i, (p, a) in enumerate(ENGLISH)]
    rows += [chat(f"{p} Explain it in detail, step by step, as for a student who has never heard of it and needs "
                  "the whole background first, with examples.", "Yes.") for p, _ in ENGLISH[:4]]  # ratio ~0.04
    s = audit(write(tmp_path / "len.jsonl", rows), progress=False).summary()["consistency"]
    (flag,) = [m for m in s["mixed"] if m["feature"] == "length_ratio"]
    assert flag["minority"].startswith("short") and lines_of(flag["examples"]) == [21, 22, 23, 24]


def test_style_features_ignore_code_and_read_person_and_tone():
    code = "```python\n# a comment, not a header\nprint('hi!')\n```"
    assert style_features(code) == {"code_fence"}
    assert style_features("I think you should try again! Sorry \N{GRINNING FACE}") == {
        "first_person", "second_person", "hedge", "exclamation", "apology", "emoji"}
    assert style_features("We sold it in the US.") == {"we"}
    assert style_features("| a | b |\n|---|---|\n| 1 | 2 |") == {"table", "markdown"}


def test_language_mix_and_prompt_mismatch(tmp_path):
    rows = [chat(p, a) for p, a in ENGLISH]
    rows[4] = chat("Pourquoi le ciel est-il bleu ?",
                   "Les molécules de l'air diffusent beaucoup plus la lumière bleue du soleil que la lumière rouge.")
    rows[9] = chat("Warum ist der Himmel blau?", "Die Moleküle der Luft streuen das blaue Licht der Sonne viel stärker als das rote Licht.")
    rows[14] = chat("Why is the sky blue? Answer briefly.",
                    "Las moléculas del aire dispersan la luz azul del sol mucho más que la luz roja, por eso el cielo es azul.")
    rows.append(chat("Translate 'the sky is blue' into Spanish.", "El cielo es azul, sobre todo en los días de verano."))
    path = write(tmp_path / "lang.jsonl", rows)
    result = audit(path, progress=False)
    s = result.summary()["language"]
    assert [lang for _, lang, _ in result.languages.items] == ["en"] * 4 + ["fr"] + ["en"] * 4 + ["de"] + ["en"] * 4 + ["es"] + ["en"] * 5 + ["es"]
    assert s["majority"] == "en" and s["distribution"] == {"en": 17, "es": 2, "fr": 1, "de": 1}
    assert s["other_language"] == 4 and lines_of(s["other_language_examples"]) == [5, 10, 15, 21]
    # French and German prompts are answered in their own language; the translation request is not a mismatch
    assert s["prompt_mismatch"] == 1 and s["prompt_mismatch_examples"] == [f"{path}:15 (prompt en, response es)"]
    assert detect_language("Paris.") == "und" and detect_language("```python\nprint('a long line of code here')\n```") == "und"


def test_reference_contradictions_numeric_and_textual():
    assert reference_problem(42, "Six times seven is 42, minus one, so the answer is 41.") is not None
    assert reference_problem(42, "Six times seven, so the answer is 42.") is None
    assert reference_problem("#### 1,234", "The total is 1234 apples.") is None
    assert reference_problem("42", "There is no number here.") is not None
    assert reference_problem("Paris", "The capital of France is Paris.") is None
    assert reference_problem("Paris", "The capital of France is Lyon.") is not None
    assert reference_problem(["cat", "kitten"], "It is a kitten.") is None
    with pytest.raises(ValueError):  # a long textual reference is not compared
        reference_problem("a full reference solution " * 5, "anything")


def test_code_block_and_json_checks():
    assert code_problems("Code:\n```python\ndef f(x):\n    return x +\n```") == ["```python block at line 2: invalid syntax at its line 2"]
    assert code_problems("```py\nprint(1)\n```\nText\n```\nstill open")[0].startswith("``` block opened at line 5 is never closed")
    assert code_problems('```json\n{"a": 1,}\n```')[0].startswith("```json block at line 1")
    valid = ('```python\ndef f(x):\n    return x + 1\n```\n```python\n>>> f(1)\n2\n```\n```json\n{"a": [1, 2]}\n```\n'
             "```bash\nls -la | grep x (\n```\n```\nnot code at all (\n```")
    assert code_problems(valid) == []
    assert json_problem("Return the user as a JSON object.", '{"name": "Ann", "age": }') is not None
    assert json_problem("Return the user as a JSON object.", 'Here it is:\n```json\n{"name": "Ann"}\n```') is None
    assert json_problem("List three colours.", '["red", "green"') is not None  # starts like JSON
    assert json_problem("What is JSON?", "JSON is a text format for data.") is None  # mentions JSON, asks for none
    assert json_problem("Cite a source.", "[1] Smith, J. (2020). A book.") is None
    assert json_problem("How do I save a dict as a JSON file?", "Call json.dump with an open file.") is None
    assert json_problem("Write a function that returns a JSON string.", "```python\ndef f():\n    return '{}'\n```") is None
    assert json_problem("Reply in JSON only.", "The user is Ann.") is not None


def accuracy_rows() -> list[dict]:
    rows = [chat(p, a) for p, a in ENGLISH[:12]]
    rows[1] = chat("What is 6 times 7?", "Six times seven is 42, minus one, so the answer is 41.", reference=42)   # line 2
    rows[2] = chat("What is 5 times 8?", "Five times eight, so the answer is 40.", answer="40")                    # agrees
    rows[3] = chat("What is the capital of France?", "The capital of France is Lyon.", ground_truth="Paris")      # line 4
    rows[4] = chat("Write a function that adds one.", "```python\ndef add_one(x):\n    return x +\n```")        # line 5
    rows[5] = chat("Write a function that doubles.", "```python\ndef double(x):\n    return 2 * x\n```")         # fine
    rows[6] = chat("Show the config.", 'The config:\n```json\n{"debug": true,}\n```')                           # line 7
    rows[7] = chat("Show an example.", "Start with this:\n```python\nimport os\nprint(os.getcwd())")            # line 8
    rows[8] = chat("Return the user Ann, 31, as JSON.", '{"name": "Ann", "age": }')                             # line 9
    rows[9] = chat("Return the user Bob, 40, as JSON.", '{"name": "Bob", "age": 40}')                           # fine
    rows[10] = chat("What is the capital of Italy?", "Rome is the capital of Italy.", reference="Rome")          # agrees
    return rows


def test_audit_reports_accuracy_signals(tmp_path):
    path = write(tmp_path / "acc.jsonl", accuracy_rows())
    result = audit(path, progress=False)
    a = result.summary()["accuracy"]
    assert [w for w, _ in result.accuracy.contradictions] == [f"{path}:2", f"{path}:4"]
    assert a["reference"] == {**a["reference"], "column_rows": 4, "checked": 4, "contradictions": 2}
    assert [w for w, _ in result.accuracy.broken_code] == [f"{path}:5", f"{path}:7", f"{path}:8"]
    assert [w for w, _ in result.accuracy.invalid_json] == [f"{path}:9"]  # line 7 shows a config, asks no JSON
    assert a["code"]["blocks"] == 4 and a["json"]["expected"] == 2
    md, _, js = write_reports(result, tmp_path / "report")
    text = md.read_text()
    assert "## Consistency" in text and "## Language" in text and "## Accuracy signals" in text
    assert "2 of 4 rows checked against their reference contradict it" in text and f"{path}:5: ```python block" in text
    assert set(json.loads(js.read_text())) >= {"consistency", "language", "accuracy"}


def test_clean_drops_each_problem_with_its_reason(tmp_path):
    rows = accuracy_rows()
    rows.append(chat("Pourquoi le ciel est-il bleu ?",
                     "Les molécules de l'air diffusent beaucoup plus la lumière bleue du soleil que la lumière rouge."))  # line 13
    path = write(tmp_path / "acc.jsonl", rows)
    out = tmp_path / "clean.jsonl"
    res = clean(path, out, CleanConfig(languages=["en"]))
    assert res["read"] == 13 and res["kept"] + res["rejected"] == res["read"] and res["rejected"] == 7
    rejects = [json.loads(line) for line in (tmp_path / "clean.jsonl.rejects.jsonl").read_text().splitlines()]
    by_line = {int(r["where"].rsplit(":", 1)[1]): r["reason"] for r in rejects}
    assert by_line[2].startswith("contradicts reference: reference 42") and by_line[4].startswith("contradicts reference")
    assert by_line[5].startswith("broken code: ```python") and by_line[7].startswith("broken code: ```json")
    assert by_line[8] == "broken code: ```python block opened at line 2 is never closed"
    assert by_line[9].startswith("invalid JSON: starts like JSON") and by_line[13] == "language: fr, not in languages (en)"
    assert len(out.read_text().splitlines()) == 6

    kept_all = clean(path, tmp_path / "all.jsonl", CleanConfig(broken_code="keep", invalid_json="keep", reference_mismatch="keep"))
    assert kept_all["kept"] == 13 and kept_all["rejected"] == 0  # languages: null keeps the French row too
    with pytest.raises(ConfigError, match="languages: unknown code"):
        clean(path, tmp_path / "x.jsonl", CleanConfig(languages=["english"]))


def test_clean_cli_reads_the_new_options(tmp_path, capsys):
    from posttrain.cli import main

    path = write(tmp_path / "acc.jsonl", accuracy_rows())
    (tmp_path / "c.yaml").write_text("broken_code: keep\ninvalid_json: keep\nlanguages: [en]\n")
    assert main(["data", "clean", str(path), "-o", str(tmp_path / "o.jsonl"), "--config", str(tmp_path / "c.yaml")]) == 0
    assert "read 12, kept 10, rejected 2" in capsys.readouterr().out  # only the two reference contradictions
    (tmp_path / "c.yaml").write_text("broken_code: fix\n")
    assert main(["data", "clean", str(path), "-o", str(tmp_path / "o.jsonl"), "--config", str(tmp_path / "c.yaml")]) == 2


def test_only_responses_training_pushes_toward_are_checked(tmp_path):
    broken = "```python\ndef f(:\n```"
    rows = [{"prompt": "Write f.", "chosen": broken, "rejected": "No."},                        # line 1: chosen broken
            {"prompt": "Write g.", "chosen": "def g(): pass", "rejected": broken},              # rejected: meant to be bad
            {"prompt": "Write h.", "completion": broken, "label": True},                        # line 3: desirable
            {"prompt": "Write k.", "completion": broken, "label": False}]                       # undesirable: fine
    result = audit(write(tmp_path / "mixed.jsonl", rows), progress=False)
    assert lines_of([w for w, _ in result.accuracy.broken_code]) == [1, 3]
    assert result.summary()["consistency"]["responses"] == 3
