"""Preference and unpaired data: formats, validation naming the line, truncation accounting, batching."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.preference import (
    collate_pairs,
    load_pair_dataset,
    load_unpaired_dataset,
    normalize_pair,
    normalize_unpaired,
)
from posttrain.data.tokenize import tokenize_sft
from posttrain.errors import DataError

USER = [{"role": "user", "content": "What is 2+2?"}]


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_three_pair_formats_give_the_same_tokens(tokenizer):
    explicit = {"prompt": USER, "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}]}
    implicit = {"chosen": USER + [{"role": "assistant", "content": "4"}],
                "rejected": USER + [{"role": "assistant", "content": "5"}]}
    a = [tokenize_sft(x, tokenizer) for x in normalize_pair(explicit)]
    b = [tokenize_sft(x, tokenizer) for x in normalize_pair(implicit)]
    assert a == b
    # The chosen side is exactly the SFT example prompt + chosen: only the reply (and its end of turn) is trained.
    trained = tokenizer.decode([t for t, m in zip(a[0].input_ids, a[0].loss_mask) if m])
    assert trained == "4<|im_end|>\n"
    plain = [tokenize_sft(x, tokenizer) for x in normalize_pair({"prompt": "2+2=", "chosen": "4", "rejected": "5"})]
    assert tokenizer.decode([t for t, m in zip(plain[1].input_ids, plain[1].loss_mask) if m]) == "5" + tokenizer.eos_token


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen: empty"),
    ({"prompt": "q", "chosen": "a", "rejected": "   "}, "rejected: empty"),
    ({"chosen": "a", "rejected": "b"}, "missing field: 'prompt'"),
    ({"prompt": "q", "chosen": "a"}, "missing field: 'rejected'"),
    ({"prompt": USER, "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]},
     r"chosen\[0\]\.role: expected 'assistant'"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, "share no prompt"),
])
def test_bad_pairs_are_named(row, message):
    with pytest.raises(ValueError, match=message):
        normalize_pair(row)


@pytest.mark.parametrize("label", ["true", 1, 0, "yes", None])
def test_kto_label_must_be_boolean(label):
    row = {"prompt": "q", "completion": "a"}
    if label is not None:
        row["label"] = label
    with pytest.raises(ValueError, match="label"):
        normalize_unpaired(row)
    assert normalize_unpaired({**row, "label": False})[1] is False


def test_bad_rows_are_listed_by_line_or_skipped_and_counted(tmp_path, tokenizer):
    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b"},
            {"prompt": "q2", "chosen": "same", "rejected": "same"},
            {"prompt": "q3", "chosen": "a", "rejected": "b"},
            {"prompt": "q4", "chosen": "", "rejected": "b"}]
    path = write(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_pair_dataset(path, tokenizer, max_length=64)
    text = str(err.value)
    assert "2 rows invalid" in text and "data.jsonl:2: chosen and rejected are identical" in text
    assert "data.jsonl:4: chosen: empty" in text
    pairs, report = load_pair_dataset(path, tokenizer, max_length=64, skip_invalid=True)
    assert len(pairs) == 2 and report.rows_invalid == 2 and report.rows_read == 4


def test_truncation_that_erases_the_difference_drops_and_counts_the_pair(tmp_path, tokenizer):
    prompt = "word " * 60
    rows = [{"prompt": prompt, "chosen": "yes it is", "rejected": "no it is not"},
            {"prompt": "short", "chosen": "yes", "rejected": "no"}]
    pairs, report = load_pair_dataset(write(tmp_path, rows), tokenizer, max_length=40)
    # Row 1 cut inside the prompt: no target left on either side (dropped, counted), row 2 kept.
    assert len(pairs) == 1 and report.rows_dropped_no_loss == 1 and report.rows_truncated == 1
    assert "Dropped 1 row left with no trained tokens" in report.summary()


def test_kto_rows_get_a_fixed_mismatched_partner(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}],
             "completion": [{"role": "assistant", "content": f"answer {i}"}], "label": i % 2 == 0} for i in range(3)]
    examples, _ = load_unpaired_dataset(write(tmp_path, rows), tokenizer, max_length=128)
    assert [e.desirable for e in examples] == [True, False, True]
    spliced = tokenizer.decode(examples[0].kl_sequence.input_ids)
    assert "question 0" in spliced and "answer 1" in spliced and "answer 0" not in spliced
    # The splice is what rendering the mismatched pair would give.
    rendered = tokenizer.apply_chat_template([rows[0]["prompt"][0], rows[1]["completion"][0]], tokenize=False)
    assert spliced == rendered
    trained = [t for t, m in zip(examples[0].kl_sequence.input_ids, examples[0].kl_sequence.loss_mask) if m]
    assert tokenizer.decode(trained) == "answer 1<|im_end|>\n"


def test_collate_pairs_packed_and_padded_hold_the_same_sequences(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i}", "chosen": "a" * (i + 1), "rejected": "b c " * (i + 2)} for i in range(4)]
    pairs, _ = load_pair_dataset(write(tmp_path, rows), tokenizer, max_length=64)
    padded = collate_pairs(pairs, tokenizer.pad_token_id)
    packed = collate_pairs(pairs, tokenizer.pad_token_id, pack_capacity=64)
    assert padded["input_ids"].shape[0] == 8 and packed["input_ids"].shape[0] < 8
    assert packed["attention_mask"].dim() == 4
    for batch in (padded, packed):
        for s, seq in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
            ids = batch["input_ids"][batch["sequence_ids"] == s]
            assert ids.tolist() == seq.input_ids
            row, col = batch["last_index"][s].tolist()
            assert batch["sequence_ids"][row, col] == s and batch["input_ids"][row, col] != tokenizer.pad_token_id
        # every target belongs to the sequence of the position predicting it
        targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100) != -100
        ids = batch["sequence_ids"]
        nxt = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-1)
        assert (ids[targets] == nxt[targets]).all()
