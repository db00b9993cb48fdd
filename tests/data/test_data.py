"""SFT data layer: reading five file formats, validating rows, the assistant loss mask, batching.

The mask tests decode the trained tokens and compare them with the text the model must learn to
write, so they check what is trained on, not how the mask was built.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import threading
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from posttrain.data.batching import collate_sft
from posttrain.data.dataset import load_sft_dataset
from posttrain.data.formats import SFTExample, normalize_sft
from posttrain.data.io import read_records
from posttrain.data.tokenize import TokenizedExample, tokenize_sft
from posttrain.errors import DataError, PosttrainError

END = "<|im_end|>\n"  # what ChatML puts after each turn; the model must learn to emit it


def trained_runs(tokenizer, tok: TokenizedExample) -> list[str]:
    """Decode each maximal run of trained tokens."""
    runs, current = [], []
    for token, m in zip(tok.input_ids, tok.loss_mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- the assistant mask


def test_single_turn_mask_is_reply_plus_end_of_turn(tokenizer):
    messages = chat(("user", "What is 2+2?"), ("assistant", "2+2 is 4."))
    tok = tokenize_sft(normalize_sft({"messages": messages}), tokenizer)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(tok.input_ids) == rendered  # the ids are the template's text, nothing added
    assert "You are a helpful AI assistant named SmolLM" in rendered  # template's default system prompt
    assert trained_runs(tokenizer, tok) == ["2+2 is 4." + END]


def test_multi_turn_trains_every_reply_and_no_user_turn(tokenizer):
    messages = chat(
        ("system", "Be terse."),
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome, since 1871."),
    )
    tok = tokenize_sft(normalize_sft({"messages": messages}), tokenizer)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(tok.input_ids) == rendered
    assert "SmolLM" not in rendered  # an explicit system turn replaces the default one
    assert trained_runs(tokenizer, tok) == ["Paris." + END, "Rome, since 1871." + END]
    assert tok.loss_mask[-1] == 1 and tokenizer.decode(tok.input_ids[-2:]) == END


def test_unicode_reply_mask(tokenizer):
    messages = chat(("user", "Dis bonjour"), ("assistant", "Bonjour, ça va ? 🙂 日本語"))
    tok = tokenize_sft(normalize_sft({"messages": messages}), tokenizer)
    assert trained_runs(tokenizer, tok) == ["Bonjour, ça va ? 🙂 日本語" + END]


def test_conversational_prompt_completion_equals_messages_row(tokenizer):
    prompt = chat(("system", "Be kind."), ("user", "Hi!"))
    completion = chat(("assistant", "Hello! How can I help?"))
    as_pc = tokenize_sft(normalize_sft({"prompt": prompt, "completion": completion}), tokenizer)
    as_messages = tokenize_sft(normalize_sft({"messages": prompt + completion}), tokenizer)
    assert as_pc == as_messages


def test_conversational_prompt_assistant_turns_are_context_only(tokenizer):
    prompt = chat(("user", "Hi"), ("assistant", "Hello."), ("user", "Name a colour."))
    completion = chat(("assistant", "Blue."))
    tok = tokenize_sft(normalize_sft({"prompt": prompt, "completion": completion}), tokenizer)
    assert trained_runs(tokenizer, tok) == ["Blue." + END]


def test_plain_prompt_completion_trains_completion_and_eos(tokenizer):
    ex = normalize_sft({"prompt": "The capital of France is", "completion": " Paris."})
    tok = tokenize_sft(ex, tokenizer)
    assert tokenizer.decode(tok.input_ids) == "The capital of France is Paris.<|im_end|>"
    assert tok.input_ids[-1] == tokenizer.eos_token_id
    assert trained_runs(tokenizer, tok) == [" Paris.<|im_end|>"]


def test_text_trains_every_token_and_eos(tokenizer):
    tok = tokenize_sft(normalize_sft({"text": "Once upon a time."}), tokenizer)
    assert tokenizer.decode(tok.input_ids) == "Once upon a time.<|im_end|>"
    assert tok.loss_mask == [1] * len(tok.input_ids)


def test_loss_on_all_trains_every_token(tokenizer):
    ex = normalize_sft({"messages": chat(("user", "Hi"), ("assistant", "Hey."))})
    tok = tokenize_sft(ex, tokenizer, loss_on="all")
    assert tok.input_ids == tokenize_sft(ex, tokenizer).input_ids
    assert tok.loss_mask == [1] * len(tok.input_ids)
    with pytest.raises(ValueError, match="loss_on"):
        tokenize_sft(ex, tokenizer, loss_on="assistant")


def test_template_that_rewrites_past_turns_is_refused(tokenizer):
    # Like templates that drop earlier reasoning: past replies render differently from the last one,
    # so a past reply's span in the full rendering cannot be measured from its own rendering.
    rewriting = copy.deepcopy(tokenizer)
    rewriting.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ '[earlier reply]' if m['role'] == 'assistant' and not loop.last else m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ex = normalize_sft(
        {"messages": chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))}
    )
    with pytest.raises(
        PosttrainError, match=r"not prefix-stable: rendering messages\[:2\] .* assistant turn 1"
    ):
        tokenize_sft(ex, rewriting)
    assert tokenize_sft(ex, rewriting, loss_on="all").loss_mask[-1] == 1  # the documented way out


# ---------------------------------------------------------------- row validation


def test_normalize_ignores_extra_and_null_columns():
    row = {
        "id": 7,
        "prompt": None,
        "messages": [{"role": "user", "content": "a", "name": None}, {"role": "assistant", "content": "b"}],
    }
    assert normalize_sft(row) == SFTExample("chat", messages=chat(("user", "a"), ("assistant", "b")))
    assert normalize_sft({"text": "x", "completion": None}) == SFTExample("text", text="x")
    assert normalize_sft({"prompt": "", "completion": "y"}) == SFTExample("prompt_completion", completion="y")


def test_prompt_messages_stop_before_the_reply():
    multi = chat(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    assert normalize_sft({"messages": multi}).prompt_messages() == multi[:4]
    pc = {"prompt": chat(("user", "a")), "completion": chat(("assistant", "b"), ("assistant", "c"))}
    assert normalize_sft(pc).prompt_messages() == chat(("user", "a"))
    assert normalize_sft({"prompt": "Q:", "completion": " A"}).prompt_messages() == chat(("user", "Q:"))
    with pytest.raises(ValueError, match="text: a 'text' row has no prompt"):
        normalize_sft({"text": "t"}).prompt_messages()


@pytest.mark.parametrize(
    "row, reason",
    [
        (
            {"messages": chat(("user", "a"), ("bot", "b"))},
            "messages[1].role: unknown role 'bot' (expected system, user, assistant)",
        ),
        ({"messages": chat(("user", "a"))}, "messages: no assistant turn"),
        (
            {"messages": chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", " "))},
            "messages[3].content: empty assistant turn",
        ),
        (
            {"messages": chat(("user", "a"), ("system", "s"), ("assistant", "b"))},
            "messages[1].role: a system turn is only allowed first",
        ),
        (
            {"messages": chat(("assistant", "hi"), ("user", "a"), ("assistant", "b"))},
            "messages[0].role: conversation starts with an assistant turn",
        ),
        (
            {"messages": [{"role": "user", "content": ["a"]}]},
            "messages[0].content: expected a string, got list",
        ),
        ({"messages": [{"role": "user"}]}, "messages[0]: missing 'content'"),
        ({"messages": "hi"}, "messages: expected a list"),
        ({"conversations": []}, "missing field: expected 'messages', 'prompt'+'completion', or 'text'"),
        ({"prompt": "a"}, "missing field: 'prompt' needs a 'completion'"),
        ({"prompt": "a", "completion": chat(("assistant", "b"))}, "prompt/completion: expected both strings"),
        (
            {"prompt": chat(("user", "a")), "completion": chat(("user", "b"))},
            "completion[0].role: expected 'assistant'",
        ),
        (
            {"prompt": chat(("user", "a")), "completion": chat(("assistant", ""))},
            "completion[0].content: empty assistant turn",
        ),
        ({"prompt": "a", "completion": ""}, "completion: empty"),
        ({"text": ""}, "text: empty"),
        ({"text": 3}, "text: expected a string, got int"),
    ],
)
def test_normalize_rejects_with_field_named(row, reason):
    with pytest.raises(ValueError) as info:
        normalize_sft(row)
    assert str(info.value).startswith(reason)


# ---------------------------------------------------------------- loading: bad rows


GOOD = {"messages": chat(("user", "Hi"), ("assistant", "Hello."))}


def write_bad_file(tmp_path: Path) -> Path:
    """A JSONL file with one bad row of each kind; the line numbers are pinned by the tests."""
    lines = [
        json.dumps(GOOD).encode(),  # 1
        b'{"messages": [',  # 2 malformed JSON
        b"",  # 3 blank: skipped, yet it still counts as a line
        json.dumps({"conversation": "x"}).encode(),  # 4 missing field
        json.dumps({"messages": chat(("user", "a"), ("bot", "b"))}).encode(),  # 5 unknown role
        json.dumps({"messages": chat(("user", "a"), ("assistant", ""))}).encode(),  # 6 empty assistant turn
        b'{"text": "caf\xe9"}',  # 7 Latin-1 byte: invalid UTF-8
        b"[1, 2]",  # 8 non-object
        json.dumps(GOOD).encode(),  # 9
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


EXPECTED_BAD = [
    ("bad.jsonl:2", "malformed JSON:"),
    ("bad.jsonl:4", "missing field: expected 'messages', 'prompt'+'completion', or 'text'"),
    ("bad.jsonl:5", "messages[1].role: unknown role 'bot'"),
    ("bad.jsonl:6", "messages[1].content: empty assistant turn"),
    ("bad.jsonl:7", "invalid UTF-8"),
    ("bad.jsonl:8", "expected a JSON object per row, got an array"),
]


def test_every_bad_row_is_reported_in_one_error(tmp_path, tokenizer, monkeypatch):
    path = write_bad_file(tmp_path)
    monkeypatch.chdir(tmp_path)  # so `where` is the relative path the user typed
    with pytest.raises(DataError) as info:
        load_sft_dataset("bad.jsonl", tokenizer, max_length=64)
    message = str(info.value)
    assert message.startswith("bad.jsonl: 6 rows invalid")
    reported = message.splitlines()[1:]
    assert len(reported) == len(EXPECTED_BAD)
    for line, (where, reason) in zip(reported, EXPECTED_BAD):
        assert line.startswith(f"  {where}: {reason}"), line
    assert path.exists()


def test_error_lists_first_ten_and_the_total(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "many.jsonl", [GOOD] + [{"text": ""}] * 25)
    with pytest.raises(DataError) as info:
        load_sft_dataset(path, tokenizer, max_length=64)
    lines = str(info.value).splitlines()
    assert "25 rows invalid" in lines[0]
    assert lines[1] == f"  {path}:2: text: empty" and lines[10] == f"  {path}:11: text: empty"
    assert lines[11:] == ["  ... and 15 more"]


def test_skip_invalid_counts_by_reason(tmp_path, tokenizer):
    path = write_bad_file(tmp_path)
    examples, report = load_sft_dataset(path, tokenizer, max_length=64, skip_invalid=True)
    assert len(examples) == report.rows_kept == 2
    assert report.rows_read == 8 and report.rows_invalid == 6
    reasons = sorted(report.invalid_reasons)
    assert len(reasons) == 6 and all(n == 1 for n in report.invalid_reasons.values())
    for _, reason in EXPECTED_BAD:
        assert any(r.startswith(reason) for r in reasons), reason
    assert "Skipped 6 rows as invalid" in report.summary()

    path = write_jsonl(tmp_path / "same.jsonl", [GOOD, {"text": ""}, {"text": " "}, {"x": 1}])
    _, report = load_sft_dataset(path, tokenizer, max_length=64, skip_invalid=True)
    assert report.invalid_reasons["text: empty"] == 2 and report.rows_invalid == 3


def test_file_level_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("hi")
    with pytest.raises(
        DataError, match=r"unsupported data format '\.txt'; expected \.jsonl, \.json, \.parquet, \.csv"
    ):
        read_records(tmp_path / "data.txt")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="not a saved dataset"):
        read_records(tmp_path / "dir")
    (tmp_path / "broken.json").write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: malformed JSON"):
        read_records(tmp_path / "broken.json")
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match="no usable rows"):
        load_sft_dataset(path, tokenizer, max_length=64, skip_invalid=True)


# ---------------------------------------------------------------- loading: length


def test_truncate_and_drop_are_counted(tmp_path, tokenizer):
    long_reply = " ".join(["word"] * 60)
    rows = [
        GOOD,
        {"messages": chat(("user", "Hi"), ("assistant", long_reply))},
        {"prompt": " ".join(["context"] * 60), "completion": " done"},  # truncation leaves no target
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    full_lengths = [len(tokenize_sft(normalize_sft(r), tokenizer).input_ids) for r in rows]
    max_length = 50
    assert full_lengths[0] < max_length < min(full_lengths[1:])

    kept, report = load_sft_dataset(path, tokenizer, max_length=max_length, overflow="truncate")
    assert [len(ex.input_ids) for ex in kept] == [full_lengths[0], max_length]
    assert (report.rows_truncated, report.rows_dropped_no_loss, report.rows_dropped_too_long) == (2, 1, 0)
    assert trained_runs(tokenizer, kept[1])[0].startswith("word word")  # still trains on the reply's start
    assert report.tokens == full_lengths[0] + max_length
    assert "Dropped 1 row left with no trained tokens" in report.summary()

    kept, report = load_sft_dataset(path, tokenizer, max_length=max_length, overflow="drop")
    assert [ex.input_ids for ex in kept] == [tokenize_sft(normalize_sft(GOOD), tokenizer).input_ids]
    assert (report.rows_truncated, report.rows_dropped_no_loss, report.rows_dropped_too_long) == (0, 0, 2)
    with pytest.raises(ValueError, match="overflow"):
        load_sft_dataset(path, tokenizer, max_length=max_length, overflow="wrap")


# ---------------------------------------------------------------- loading: five file formats


PLAIN_ROWS = [
    {"prompt": "Translate to French: cat", "completion": " chat"},
    {"prompt": 'Multi-line,\n"quoted" prompt:', "completion": " yes, with a comma"},
    {"prompt": "2+2=", "completion": " 4"},
]
# Rows in different formats side by side, each with every column (null where unused), as an Arrow
# table holds them. Plain and conversational prompt/completion cannot share an Arrow column.
MIXED_ROWS = [
    {
        "messages": chat(("user", "Hi"), ("assistant", "Hello.")),
        "prompt": None,
        "completion": None,
        "text": None,
    },
    {"messages": None, "prompt": None, "completion": None, "text": "Just text."},
    {
        "messages": None,
        "prompt": chat(("user", "Hey")),
        "completion": chat(("assistant", "Yo.")),
        "text": None,
    },
]


def write_json(path: Path, rows: list[dict]) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps(rows, indent=2))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path = path.with_suffix(".parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path = path.with_suffix(".csv")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_saved(path: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS = {
    "jsonl": lambda p, rows: write_jsonl(p.with_suffix(".jsonl"), rows),
    "json": write_json,
    "parquet": write_parquet,
    "csv": write_csv,
    "saved": write_saved,
}


def test_all_formats_load_the_same_rows(tmp_path, tokenizer):
    expected = [tokenize_sft(normalize_sft(r), tokenizer) for r in PLAIN_ROWS]
    for name, write in WRITERS.items():
        path = write(tmp_path / f"plain_{name}", PLAIN_ROWS)
        loaded, report = load_sft_dataset(path, tokenizer, max_length=128)
        assert loaded == expected, name
        assert report.rows_read == report.rows_kept == len(PLAIN_ROWS)

    expected = [tokenize_sft(normalize_sft(r), tokenizer) for r in MIXED_ROWS]
    for name, write in WRITERS.items():
        if name != "csv":  # CSV cells are strings; it cannot hold message lists
            path = write(tmp_path / f"mixed_{name}", MIXED_ROWS)
            assert load_sft_dataset(path, tokenizer, max_length=128)[0] == expected, name


def test_where_names_the_row_in_each_format(tmp_path):
    rows = [{"text": "a"}, {"text": "b\nc"}, {"text": "d"}]
    assert [r.where for r in read_records(write_json(tmp_path / "r", rows))][-1] == f"{tmp_path}/r.json row 3"
    assert [r.where for r in read_records(write_parquet(tmp_path / "r", rows))][
        -1
    ] == f"{tmp_path}/r.parquet row 3"
    # The quoted newline makes row 2 span lines 3-4, so row 3 starts on line 5.
    assert [r.where for r in read_records(write_csv(tmp_path / "r", rows))] == [
        f"{tmp_path}/r.csv:{n}" for n in (2, 3, 5)
    ]
    records = list(read_records(write_saved(tmp_path / "saved", rows)))
    assert [r.where for r in records][-1] == f"{tmp_path}/saved row 3"
    assert [r.data for r in records] == rows


def test_json_file_holding_jsonl_is_read_as_jsonl(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [(r.where, r.data) for r in read_records(path)] == [
        (f"{path}:1", {"text": "a"}),
        (f"{path}:3", {"text": "b"}),
    ]


def test_dataset_dict_uses_train_split(tmp_path):
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"text": "train row"}]),
            "test": datasets.Dataset.from_list([{"text": "test row"}]),
        }
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert [r.data for r in read_records(tmp_path / "dd")] == [{"text": "train row"}]


def test_jsonl_rows_are_yielded_before_the_rest_of_the_file_exists(tmp_path):
    """read_records streams: through a named pipe whose writer sends the later lines (a blank one, a malformed one,
    a good one) only after the reader has received the first record. A reader that loads the file first would
    wait for the writer to finish, which here only happens after a 10 s timeout."""
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    first_received = threading.Event()
    writer_timed_out: list[bool] = []

    def write() -> None:
        with open(fifo, "w") as f:
            f.write('{"text": "one"}\n')
            f.flush()
            writer_timed_out.append(not first_received.wait(timeout=10))
            f.write('\n{"text": \n{"text": "four"}\n')

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    records = read_records(fifo)
    first = next(records)
    first_received.set()
    rest = list(records)
    writer.join(timeout=30)
    assert writer_timed_out == [False]
    assert (first.where, first.data, first.error) == (f"{fifo}:1", {"text": "one"}, None)
    assert [(r.where, r.data) for r in rest] == [(f"{fifo}:3", None), (f"{fifo}:4", {"text": "four"})]
    assert rest[0].error.startswith("malformed JSON")


def test_file_level_errors_of_streamed_formats_still_raise_on_the_call(tmp_path):
    # CSV: an invalid byte on line 3 is found before any row is yielded, and named by its line.
    (tmp_path / "bad.csv").write_bytes(b'text\nfine\n"caf\xe9"\nlast\n')
    with pytest.raises(DataError, match=r"bad\.csv:3: invalid UTF-8"):
        read_records(tmp_path / "bad.csv")
    # .json: a BOM and leading blank lines before '[' still make it an array, parsed (and failing) on the call.
    (tmp_path / "arr.json").write_bytes(b'\xef\xbb\xbf\n\n  [{"text": "a"},\n{"text": }]')
    with pytest.raises(DataError, match=r"arr\.json:4: malformed JSON"):
        read_records(tmp_path / "arr.json")
    (tmp_path / "ok.json").write_bytes(b'\xef\xbb\xbf\n [{"text": "a"}]')
    assert [r.data for r in read_records(tmp_path / "ok.json")] == [{"text": "a"}]


# ---------------------------------------------------------------- batching


def test_collate_pads_right_and_labels_only_targets():
    batch = [TokenizedExample([5, 6, 7], [0, 1, 1]), TokenizedExample([8], [1])]
    out = collate_sft(batch, pad_id=2)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_keeps_eos_targets_when_pad_is_eos(tokenizer):
    # SmolLM2 pads with <|im_end|>, the same id that ends every reply; the reply's must stay a label.
    tok = tokenize_sft(normalize_sft(GOOD), tokenizer)
    short = tokenize_sft(normalize_sft({"text": "x"}), tokenizer)
    out = collate_sft([tok, short], pad_id=tokenizer.pad_token_id)
    labels = out["labels"][0]
    assert (labels == tokenizer.eos_token_id).sum() == 1  # the reply's <|im_end|>, not the system/user ones
    assert out["labels"][1, len(short.input_ids) :].eq(-100).all()
