"""`posttrain data audit` on crafted files where every planted problem is known by construction."""

from __future__ import annotations

import json

import pytest

from posttrain.curate.audit import audit, write_reports

PARAGRAPH = ("The committee met on Tuesday to review the annual budget for the regional library network, which "
             "serves eleven towns and several schools. Members discussed the cost of new shelving, longer opening "
             "hours on weekends, and a plan to digitise the local newspaper archive going back one hundred years. "
             "After a long debate they agreed to fund two new mobile libraries, to repair the roof of the oldest "
             "branch before winter, and to ask volunteers to run reading clubs for children during the holidays.")


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write(path, rows):
    with path.open("w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture
def sft_file(tmp_path):
    rows = [chat(f"Question {i} about topic {i * 7}?", f"Distinct answer number {i} with detail {i * 13}.") for i in range(20)]
    rows[3] = chat("Summarise the meeting.", PARAGRAPH)                                            # line 4
    rows[5] = chat("summarise   the MEETING.", PARAGRAPH.upper())                                   # line 6: exact dup of 4
    rows[8] = chat("Summarise the meeting.", PARAGRAPH.replace("Tuesday", "Monday"))              # line 9: near dup of 4
    rows[10] = chat("Contact?", "Write to jane.doe@example.com or call (555) 123-4567.")          # line 11: email+phone
    rows[12] = chat("Pay?", "Card 4111 1111 1111 1111 works; 4111 1111 1111 1112 does not.")      # line 13: one Luhn-valid card
    rows[14] = chat("Opinion?", "As an AI language model, I don't have opinions.")                # line 15: boilerplate
    rows[16] = {"messages": [{"role": "assistant", "content": "orphan"}]}                          # line 17: invalid
    rows.append("{not json")                                                                        # line 21: unparseable
    rows.append(chat("What is the capital of France and why is it famous for its art museums today?",
                     "Paris, home of the Louvre and the Musee d'Orsay, famous for art."))           # line 22: contaminated
    return write(tmp_path / "sft.jsonl", rows)


def test_audit_finds_every_planted_problem_and_nothing_else(sft_file, tmp_path, tokenizer):
    eval_file = write(tmp_path / "eval.jsonl", [chat("What is the capital of France and why is it famous for its art museums today?", "Paris.")])
    result = audit(sft_file, tokenizer=tokenizer, max_length=40, against=eval_file, progress=False)
    s = result.summary()
    assert s["rows"] == 22 and s["invalid"] == 2
    assert [w.rsplit(":", 1)[1] for w, _ in result.invalid] == ["17", "21"]
    assert result.exact == [(f"{sft_file}:6", f"{sft_file}:4")]
    assert result.near == [(f"{sft_file}:9", f"{sft_file}:4")]
    assert result.pii == {"email": [f"{sft_file}:11"], "phone": [f"{sft_file}:11"], "credit_card": [f"{sft_file}:13"]}
    assert result.boilerplate == [f"{sft_file}:15"]
    assert result.contaminated == [f"{sft_file}:22"]
    assert s["tokens"]["truncated_rows"] == sum(n > 40 for n in result.lengths) >= 3  # the paragraph rows
    md, page, js = write_reports(result, tmp_path / "out")
    assert "1 exact, 1 near" in md.read_text() and "base64," in page.read_text()
    assert json.loads(js.read_text())["pii"] == {"credit_card": 1, "email": 1, "phone": 1}


def test_preference_checks_length_bias_and_swapped_pairs(tmp_path, tokenizer):
    rows = [{"prompt": f"Q{i}?", "chosen": f"A long and careful answer number {i}.", "rejected": f"No {i}."} for i in range(8)]
    rows.append({"prompt": "Q3?", "chosen": "No 3.", "rejected": "A long and careful answer number 3."})  # swapped copy
    rows.append({"prompt": "Q9?", "chosen": "same", "rejected": "same"})                                  # no preference
    path = write(tmp_path / "prefs.jsonl", rows)
    result = audit(path, tokenizer=tokenizer, progress=False)
    s = result.summary()
    assert s["invalid"] == 1 and "identical" in result.invalid[0][1]
    assert s["preference"]["pairs"] == 9 and s["preference"]["chosen_longer_share"] == pytest.approx(8 / 9)
    assert result.swapped == [(f"{path}:9", f"{path}:4")]


def test_cli_audit(sft_file, tmp_path, capsys):
    from posttrain.cli import main

    assert main(["data", "audit", str(sft_file), "--max-length", "64", "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "2 invalid" in out and (tmp_path / "rep" / "report.html").is_file()
    assert main(["data", "audit", str(tmp_path / "missing.jsonl")]) == 2


def test_clean_keeps_good_rows_and_accounts_for_every_other(sft_file, tmp_path, capsys):
    from posttrain.cli import main

    eval_file = write(tmp_path / "eval.jsonl", [chat("What is the capital of France and why is it famous for its art museums today?", "Paris.")])
    out = tmp_path / "clean.jsonl"
    assert main(["data", "clean", str(sft_file), "-o", str(out), "--against", str(eval_file)]) == 0
    printed = capsys.readouterr().out
    assert "read 22, kept 16, rejected 6" in printed
    rejects = [json.loads(line) for line in (tmp_path / "clean.jsonl.rejects.jsonl").read_text().splitlines()]
    by_line = {r["where"].rsplit(":", 1)[1]: r["reason"] for r in rejects}
    assert by_line["6"] == "exact duplicate" and by_line["9"] == "near duplicate"
    assert by_line["15"] == "boilerplate/refusal" and by_line["22"].startswith("contaminated")
    assert by_line["17"].startswith("invalid") and by_line["21"].startswith("invalid")
    kept = (out).read_text()
    assert "jane.doe@example.com" not in kept and "[EMAIL]" in kept and "[PHONE]" in kept and "[CREDIT_CARD]" in kept
    assert "4111 1111 1111 1112" in kept  # fails Luhn: not a card number, not touched
    assert len(kept.splitlines()) == 16


def test_clean_config_errors_name_the_key(sft_file, tmp_path):
    from posttrain.cli import main

    (tmp_path / "c.yaml").write_text("pii: hide\n")
    assert main(["data", "clean", str(sft_file), "-o", str(tmp_path / "o.jsonl"), "--config", str(tmp_path / "c.yaml")]) == 2
    (tmp_path / "c.yaml").write_text("near_treshold: 0.9\n")
    assert main(["data", "clean", str(sft_file), "-o", str(tmp_path / "o.jsonl"), "--config", str(tmp_path / "c.yaml")]) == 2


def test_contamination_ignores_a_shared_template_but_finds_an_embedded_eval_item(tmp_path):
    """A templated task shares its instruction with every eval row: that is not contamination. A training row
    that quotes one eval item inside a longer text is, with the share of that item's n-grams it holds."""
    from posttrain.curate.contamination import EvalIndex

    instruction = "Extract the name, the age, the job and the city of the person below as a JSON object."
    people = [("Olga Horvat", 65, "data analyst", "Lima"), ("Ingrid Schmidt", 35, "dentist", "Lagos"),
              ("Maria Haddad", 48, "teacher", "Istanbul"), ("Tomas Berg", 29, "pilot", "Oslo"),
              ("Aiko Tanaka", 52, "architect", "Osaka"), ("Pedro Alves", 41, "nurse", "Porto")]

    def row(name, age, job, city):
        return chat(f"{instruction}\n\n{name}, who is {age} years old, has worked as a {job} in {city} for many years.",
                    json.dumps({"name": name, "age": age, "job": job, "city": city}))

    eval_file = write(tmp_path / "eval.jsonl", [row(*p) for p in people])
    index = EvalIndex(eval_file)
    clean_row = row("Nina Petrova", 33, "chemist", "Sofia")  # same template, new content
    assert index.match("\n".join(m["content"] for m in clean_row["messages"])) is None
    leaked = ("Notes from the archive. " + people[2][0] + ", who is 48 years old, has worked as a teacher in Istanbul "
              "for many years. The rest of this document is about something else entirely.")
    where, share = index.match(leaked)
    assert where == f"{eval_file}:3" and share >= 0.5
