"""The demo JSON-extraction task: rows, held-out split, scoring and evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.demo import json_task
from posttrain.demo.json_task import evaluate, make_rows, reference_of, score, sentence_of
from posttrain.errors import PosttrainError

ROW = json_task.make_row(
    {"name": "Maria Lopez", "age": 34, "job": "nurse", "city": "Madrid"}, json_task.TEMPLATES[0]
)


def names_and_cities(rows: list[dict]) -> tuple[set[str], set[str], set[str]]:
    records = [reference_of(row) for row in rows]
    firsts = {r["name"].split()[0] for r in records}
    lasts = {r["name"].split()[1] for r in records}
    return firsts, lasts, {r["city"] for r in records}


def test_row_format():
    assert [m["role"] for m in ROW["messages"]] == ["system", "user", "assistant"]
    assert sentence_of(ROW) == "Maria Lopez is a 34-year-old nurse who lives in Madrid."
    assert ROW["messages"][1]["content"].startswith(json_task.INSTRUCTION)
    assert ROW["messages"][2]["content"] == '{"name": "Maria Lopez", "age": 34, "job": "nurse", "city": "Madrid"}'


def test_rows_are_well_formed_and_varied():
    rows = make_rows(300, "train", 0)
    sentences = [sentence_of(row) for row in rows]
    for row, sentence in zip(rows, sentences, strict=True):
        record = json.loads(row["messages"][-1]["content"])
        assert list(record) == ["name", "age", "job", "city"]
        assert isinstance(record["age"], int)
        for value in record.values():
            assert str(value) in sentence
        assert len(sentence.split()) <= 25
        assert sentence[0].isupper()
    # Every template shows up: compare each sentence's words outside the record.
    shapes = set()
    for row, sentence in zip(rows, sentences, strict=True):
        for value in reference_of(row).values():
            sentence = sentence.replace(str(value), "#")
        shapes.add(sentence.lower().replace("an #", "a #"))
    assert len(shapes) == len(json_task.TEMPLATES) >= 10


def test_test_split_is_disjoint_from_train_and_valid():
    seen = [names_and_cities(make_rows(400, split, 0)) for split in ("train", "valid")]
    held_out = names_and_cities(make_rows(400, "test", 0))
    for seen_split in seen:
        for seen_values, test_values in zip(seen_split, held_out, strict=True):
            assert not seen_values & test_values
    assert not set(json_task.SEEN_FIRST) & set(json_task.TEST_FIRST)
    assert not set(json_task.SEEN_LAST) & set(json_task.TEST_LAST)
    assert not set(json_task.SEEN_CITIES) & set(json_task.TEST_CITIES)


def test_rows_are_deterministic_per_seed_and_split():
    assert make_rows(30, "train", 7) == make_rows(30, "train", 7)
    assert make_rows(30, "train", 7) != make_rows(30, "train", 8)
    assert make_rows(30, "train", 7) != make_rows(30, "valid", 7)
    assert make_rows(10, "test", 7) == make_rows(30, "test", 7)[:10]


def test_unknown_split():
    with pytest.raises(PosttrainError, match="split"):
        make_rows(1, "dev", 0)


@pytest.mark.parametrize(
    ("completion", "exact", "valid_json", "field_accuracy", "lenient"),
    [
        ('{"name": "Maria Lopez", "age": 34, "job": "nurse", "city": "Madrid"}', True, True, 1.0, 1.0),
        ('  \n{"city": "Madrid", "job": "nurse", "age": 34, "name": "Maria Lopez"}\n', True, True, 1.0, 1.0),
        ('```json\n{"name": "Maria Lopez", "age": 34, "job": "nurse", "city": "Madrid"}\n```', True, True, 1.0, 1.0),
        ('{"name": "Maria Lopez", "age": 43, "job": "nurse", "city": "Madrid"}', False, True, 0.75, 0.75),
        ('{"name": "Maria Lopez", "age": "34", "job": "nurse", "city": "Madrid"}', False, True, 0.75, 0.75),
        ('{"name": "Maria Lopez", "age": 34, "job": "Nurse", "city": "Madrid"}', False, True, 0.75, 1.0),
        ('{"name": "Maria Lopez", "age": 34, "job": "nurse", "city": "Madrid", "x": 1}', False, True, 1.0, 1.0),
        ('{"name": "Maria Lopez", "age": 34}', False, True, 0.5, 0.5),
        ('{"name": "Maria Lopez", "age": 34, "job": "nurse", "city": "Madrid"', False, False, 0.0, 0.0),
        ('{"name": "Maria Lopez", "age": 34, "job": "nurse", "city": "Madrid"}\nHope this helps!', False, False, 0.0, 1.0),
        ('["Maria Lopez", 34, "nurse", "Madrid"]', False, False, 0.0, 0.0),
        ("Maria Lopez is a nurse.", False, False, 0.0, 0.0),
    ],
    ids=["exact", "whitespace-key-order", "fenced", "wrong-age", "age-as-string", "job-case", "extra-key",
         "missing-fields", "truncated", "trailing-text", "list", "prose"],
)
def test_score(completion, exact, valid_json, field_accuracy, lenient):
    assert score(completion, ROW) == {
        "exact": exact, "valid_json": valid_json, "field_accuracy": field_accuracy, "lenient_field_accuracy": lenient
    }


def test_evaluate_aggregates(monkeypatch):
    rows = make_rows(4, "test", 0)
    answers = [row["messages"][-1]["content"] for row in rows]
    answers[1] = "not json"

    def fake_generate(model, tokenizer, prompts, sampling, batch_size):
        assert sampling.temperature == 0 and sampling.max_new_tokens == 48
        assert all(p[-1]["role"] == "user" for p in prompts)
        return answers

    monkeypatch.setattr(json_task, "generate", fake_generate)
    result = evaluate(None, None, rows, num_samples=2)
    assert result["exact_match"] == result["valid_json"] == result["field_accuracy"] == 0.75
    assert result["n"] == 4
    assert result["samples"] == [(sentence_of(rows[0]), answers[0]), (sentence_of(rows[1]), "not json")]


def test_evaluate_runs_a_model(tiny_model_dir, tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from a second thread
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        result = evaluate(model, tokenizer, make_rows(3, "test", 0), batch_size=2, max_new_tokens=4)
    finally:
        torch.set_num_threads(threads)
    assert result["n"] == 3 and 0.0 <= result["field_accuracy"] <= 1.0
