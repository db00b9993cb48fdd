"""PII detection and exact / near-duplicate detection on crafted text whose answer is known by construction."""

from __future__ import annotations

import random

import numpy as np
import pytest

from posttrain.curate.dedup import (
    NearDuplicateIndex,
    exact_duplicates,
    lsh_bands,
    normalize_for_dedup,
    shingles,
)
from posttrain.curate.pii import KINDS, PIIMatch, find_pii, luhn_valid, redact


def _span(text: str, value: str, kind: str) -> PIIMatch:
    start = text.index(value)
    return PIIMatch(kind, start, start + len(value), value)


# --- PII: each kind found with exact spans ---------------------------------------------------------------

GHP = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"  # 36 chars after the prefix
HF = "hf_" + "xYzAbCdEfGhIjKlMnOpQrStUvWxYz01234"  # 34 chars after the prefix


@pytest.mark.parametrize(
    ("kind", "text", "values"),
    [
        (
            "email",
            "Please write to jane.doe+billing@example.co.uk, not to me.",
            ["jane.doe+billing@example.co.uk"],
        ),
        (
            "email",
            "Contacts: bob@mail.example.com and ALICE_99@uni-x.edu.",
            ["bob@mail.example.com", "ALICE_99@uni-x.edu"],
        ),
        ("phone", "Call our London office on +44 20 7946 0958.", ["+44 20 7946 0958"]),
        (
            "phone",
            "Reach me at (555) 123-4567 or 555-987-6543 after 5pm.",
            ["(555) 123-4567", "555-987-6543"],
        ),
        ("phone", "US support: +1 (555) 123-4567, SMS +14155552671.", ["+1 (555) 123-4567", "+14155552671"]),
        (
            "phone",
            "Toll-free 1-800-555-0199, fax 555.123.4567, UK 020 7946 0958.",
            ["1-800-555-0199", "555.123.4567", "020 7946 0958"],
        ),
        (
            "api_key",
            "export OPENAI_API_KEY=sk-proj-Abc123Def456Ghi789Jkl0 now",
            ["sk-proj-Abc123Def456Ghi789Jkl0"],
        ),
        (
            "api_key",
            f"my token is {GHP} and also github_pat_11ABCDEFG0123456789_abcdefXYZ",
            [GHP, "github_pat_11ABCDEFG0123456789_abcdefXYZ"],
        ),
        ("api_key", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE", ["AKIAIOSFODNN7EXAMPLE"]),
        (
            "api_key",
            "SLACK_TOKEN=xoxb-1234567890-0987654321-AbCdEfGh",
            ["xoxb-1234567890-0987654321-AbCdEfGh"],
        ),
        ("api_key", f"HF_TOKEN={HF}", [HF]),
        (
            "api_key",
            "curl -H 'Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig' url",
            ["eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig"],
        ),
        ("credit_card", "Charge card 4111 1111 1111 1111 today.", ["4111 1111 1111 1111"]),
        (
            "credit_card",
            "Visa 4012-8888-8888-1881, Amex 3782 822463 10005, raw 5555555555554444.",
            ["4012-8888-8888-1881", "3782 822463 10005", "5555555555554444"],
        ),
        ("ipv4", "The server at 192.168.1.10 forwards to 8.8.8.8.", ["192.168.1.10", "8.8.8.8"]),
        (
            "ipv6",
            "Ping 2001:db8::8a2e:370:7334, then ::1 and fe80::1ff:fe23:4567:890a.",
            ["2001:db8::8a2e:370:7334", "::1", "fe80::1ff:fe23:4567:890a"],
        ),
        (
            "ipv6",
            "Full form 2001:0db8:85a3:0000:0000:8a2e:0370:7334 and mapped ::ffff:192.0.2.1 here.",
            ["2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::ffff:192.0.2.1"],
        ),
    ],
)
def test_each_kind_found_with_exact_span(kind: str, text: str, values: list[str]) -> None:
    assert find_pii(text) == [_span(text, v, kind) for v in values]


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("79927398710")


def test_card_failing_luhn_not_reported() -> None:
    for number in ("4111 1111 1111 1112", "4111-1111-1111-1110", "1234567812345678", "5555555555554445"):
        assert not luhn_valid(number.replace(" ", "").replace("-", ""))
        assert find_pii(f"Card number {number} on file.") == []


@pytest.mark.parametrize(
    "text",
    [
        "In 2024 we shipped 1,250 units; in 1999 only 12.",
        "It costs $1,299.99 (or EUR 1.299,00), down from $2,499.",
        "Upgrade to version 1.2.3, then 10.4.22, or v1.2.3.4 and release 1.2.3.4.5.",
        "Released 2024-01-15, patched 15/01/2024 and 01.02.2024 at 12:30:45.",
        "ISBN 978-3-16-148410-0 and ISBN-13 9780306406157; ISBN-10 0-306-40615-2.",
        "Order #123456789 shipped; ticket 1234567, invoice INV-2024-000123, zip 94105-1234.",
        "Invalid addresses: 256.1.1.1, 999.10.10.10, 01.02.03.04.",
        "C++: std::vector<int> v; a::b; MAC 00:1A:2B:3C:4D:5E; ratio 3:2; at 09:45.",
        "Math: 3 + 4 = 7, 1e10, 3.14159265358979, -42, 0x1F.",
        "Tasks: task-abcdefghijklmnopqrstuvwxyz is not a key, and neither is skip-connection-layer-norm.",
        "Email-like but not: user@localhost, @handle, a@b.",
    ],
)
def test_non_pii_not_reported(text: str) -> None:
    assert find_pii(text) == []


def test_overlaps_resolved_by_priority_and_kinds_filter() -> None:
    text = "card 4111 1111 1111 1111"
    # The card is not also reported as fragments of another kind when only that kind is asked for.
    assert find_pii(text, kinds=["phone"]) == []
    assert [m.kind for m in find_pii(text, kinds="credit_card")] == ["credit_card"]
    with pytest.raises(ValueError, match="unknown PII kind"):
        find_pii(text, kinds=["ssn"])


def test_redact_exact() -> None:
    text = (
        "Hi, I'm Jane (jane@example.com, +1 (555) 123-4567). Card 4111 1111 1111 1111, "
        "key sk-Abcdefghij0123456789XYZ, host 10.0.0.1 / 2001:db8::1. Version 1.2.3 from 2024."
    )
    assert redact(text) == (
        "Hi, I'm Jane ([EMAIL], [PHONE]). Card [CREDIT_CARD], "
        "key [API_KEY], host [IPV4] / [IPV6]. Version 1.2.3 from 2024."
    )
    assert redact(text, kinds=["email", "ipv4"]) == (
        "Hi, I'm Jane ([EMAIL], +1 (555) 123-4567). Card 4111 1111 1111 1111, "
        "key sk-Abcdefghij0123456789XYZ, host [IPV4] / 2001:db8::1. Version 1.2.3 from 2024."
    )
    assert redact("nothing to see here") == "nothing to see here"
    assert set(KINDS) == {"email", "phone", "api_key", "credit_card", "ipv4", "ipv6"}


# --- exact duplicates ------------------------------------------------------------------------------------


def test_normalize_for_dedup() -> None:
    assert normalize_for_dedup("  Hello,\n\tWORLD!!  ") == "hello, world"
    assert normalize_for_dedup("«Straße»") == "strasse"
    assert normalize_for_dedup("...") == ""


def test_exact_duplicates_case_and_whitespace() -> None:
    texts = [
        "What is the capital of France?",  # 0
        "what is the capital of  france?",  # 1 dup of 0
        "What is the capital of Spain?",  # 2
        "  WHAT IS THE CAPITAL\nOF FRANCE ",  # 3 dup of 0 (end punctuation stripped)
        "What is the capital of Spain? Madrid.",  # 4 distinct
        "What is the capital of spain",  # 5 dup of 2
        "What is the capital of France? Paris.",  # 6 distinct
    ]
    assert exact_duplicates(texts) == [(1, 0), (3, 0), (5, 2)]
    assert exact_duplicates(iter(texts[i] for i in (0, 2, 4, 6))) == []
    assert exact_duplicates([]) == []


# --- near duplicates -------------------------------------------------------------------------------------

PARAGRAPH = (
    "Gradient accumulation lets a training run reach a large effective batch size on a small accelerator. "
    "Instead of updating the weights after every micro batch, the trainer sums the gradients of several micro "
    "batches and only then takes an optimizer step. The loss of each micro batch must be scaled so that the sum "
    "matches the mean over the whole effective batch; otherwise the learning rate silently changes with the "
    "number of accumulation steps. When sequences have different lengths, the correct scale is the total "
    "number of valid tokens in the effective batch rather than the number of micro batches, because averaging "
    "per micro batch gives short sequences more weight than long ones. Mixed precision adds another subtlety: "
    "the gradients should be accumulated in full precision, and the gradient scaler must only be updated once "
    "per optimizer step. Checkpoints taken in the middle of an accumulation window cannot be resumed exactly "
    "unless the partial gradients are saved too, so most trainers only checkpoint at step boundaries."
)

PARAPHRASE = (
    "With gradient accumulation, a small GPU can emulate a big batch. The optimizer does not step after each "
    "micro batch; gradients from several of them are added up first, and one update follows. To keep the "
    "effective learning rate fixed, every micro batch loss has to be divided appropriately, so the total equals "
    "the average across the full batch. For variable-length sequences you should divide by how many real tokens "
    "the full batch contains, not by the count of micro batches, since per-batch averages overweight short "
    "examples. Under mixed precision, keep accumulated gradients in fp32 and step the loss scaler a single time "
    "per update. Saving a checkpoint mid-window is only exactly resumable if the partial gradients are stored, "
    "which is why trainers usually save on step boundaries."
)


def _replace_word(text: str, index: int, new: str) -> str:
    words = text.split(" ")
    words[index] = new
    return " ".join(words)


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]
    return [" ".join(rng.choice(vocab) for _ in range(120)) for _ in range(n)]


def test_shingles() -> None:
    assert shingles("The quick brown fox jumps over", 5) == {
        "the quick brown fox jumps",
        "quick brown fox jumps over",
    }
    assert shingles("Hi there", 5) == {"hi th", "i the", " ther", "there"}
    assert shingles("Hi", 5) == {"hi"}


def test_near_duplicates_planted_found_paraphrase_and_unrelated_not() -> None:
    one_word = _replace_word(PARAGRAPH, 40, "scaled_differently")
    two_words = _replace_word(_replace_word(PARAGRAPH, 20, "model"), 120, "tokens")
    assert one_word != PARAGRAPH and two_words != PARAGRAPH
    unrelated = _random_texts(30, seed=0)

    index = NearDuplicateIndex(threshold=0.8, num_perm=128, seed=1)
    assert index.add("orig", PARAGRAPH) == []
    for i, text in enumerate(unrelated):
        assert index.add(f"u{i}", text) == []
    assert index.add("para", PARAPHRASE) == []
    assert index.add("one", one_word) == ["orig"]
    assert index.add("two", two_words) == ["orig"]
    # Case and spacing alone do not change shingles.
    assert index.add("loud", PARAGRAPH.upper().replace(" ", "  ")) == ["orig"]
    # Duplicates are reported, not indexed: only first occurrences are kept.
    assert len(index) == 1 + len(unrelated) + 1
    hits = index.query(two_words)
    assert [k for k, _ in hits] == ["orig"] and 0.8 <= hits[0][1] <= 1.0
    with pytest.raises(ValueError, match="already kept"):
        index.add("orig", "anything")


def test_near_duplicate_stream_one_pass() -> None:
    base = _random_texts(40, seed=1)
    # Plant a near copy of texts 3 and 17 (one word changed) and an exact copy of text 5 later in the stream.
    stream = [*base, _replace_word(base[3], 60, "CHANGED"), base[5], _replace_word(base[17], 7, "EDITED")]
    index = NearDuplicateIndex(seed=1)
    reported = {i: index.add(i, text) for i, text in enumerate(stream)}
    assert {i: keys for i, keys in reported.items() if keys} == {40: [3], 41: [5], 42: [17]}


def test_short_texts_use_character_shingles() -> None:
    index = NearDuplicateIndex(threshold=0.5, seed=1)
    assert index.add(0, "Thanks a lot!") == []
    assert index.add(1, "thanks a lot") == [0]
    assert index.add(2, "Go away now") == []


def test_determinism_same_seed() -> None:
    texts = [*_random_texts(20, seed=2), _replace_word(PARAGRAPH, 10, "x"), PARAGRAPH, PARAPHRASE]

    def run(seed: int) -> tuple[list[list], list[tuple]]:
        index = NearDuplicateIndex(seed=seed)
        added = [index.add(i, t) for i, t in enumerate(texts)]
        return added, index.query(_replace_word(PARAGRAPH, 50, "y"))

    assert run(7) == run(7)
    assert run(7)[0][21] == [20]


def test_lsh_bands_reach_the_candidate_recall_at_the_threshold() -> None:
    assert lsh_bands(0.8, 128) == (16, 8)  # the default: P(candidate | J=0.8) = 1 - (1 - 0.8**8)**16 = 0.947
    assert lsh_bands(1.0, 128) == (1, 128)
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95):
        bands, rows = lsh_bands(threshold, 128)
        assert bands * rows <= 128 and 1 - (1 - threshold**rows) ** bands >= 0.9
        assert 1 - (1 - threshold ** (rows + 1)) ** (128 // (rows + 1)) < 0.9  # one more row per band falls short


def test_near_duplicate_index_equals_brute_force_over_all_kept_signatures() -> None:
    """The compact band index reports exactly what a brute-force scan of every kept signature reports: the kept
    texts sharing a whole band with the new text and estimated at >= threshold, in add order. Families of a base
    text and variants with 2 to 24 of 120 words replaced (true Jaccard about 0.9 down to 0.3) make texts that share
    bands without being near duplicates, so buckets hold several texts; 1,100 unrelated texts push past the first
    1,024 signature rows and several hash-table doublings."""
    rng = random.Random(3)
    stream: list[tuple[int, str]] = []  # (family, text); family -1: unrelated
    for family, base in enumerate(_random_texts(40, seed=3)):
        words = base.split(" ")
        stream.append((family, base))
        for edits in (2, 4, 6, 9, 12, 16, 24):
            variant = list(words)
            for i in rng.sample(range(len(words)), edits):
                variant[i] = f"x{rng.randrange(10**6)}"
            stream.append((family, " ".join(variant)))
    stream += [(-1, text) for text in _random_texts(1100, seed=4)]
    rng.shuffle(stream)

    index = NearDuplicateIndex(threshold=0.8, seed=1)
    bands, rows = index.bands, index.band_rows
    kept = np.zeros((len(stream), index.num_perm), np.uint32)  # (kept, num_perm) signatures, brute force's copy
    kept_keys: list[int] = []
    reported: dict[int, list[int]] = {}
    sharing_a_band = 0
    for key, (_, text) in enumerate(stream):
        signature = index.minhash(text).hashvalues
        agree = kept[: len(kept_keys)] == signature  # (kept, num_perm)
        candidate = agree[:, : bands * rows].reshape(len(kept_keys), bands, rows).all(axis=2).any(axis=1)
        estimate = agree.sum(axis=1) / index.num_perm
        expected = [kept_keys[i] for i in np.flatnonzero(candidate & (estimate >= 0.8))]
        sharing_a_band += int(candidate.sum())
        assert index.add(key, text) == expected, key
        if expected:
            reported[key] = expected
        else:
            kept[len(kept_keys)] = signature
            kept_keys.append(key)
    assert len(index) == len(kept_keys) and sharing_a_band > sum(map(len, reported.values()))

    # And against true Jaccard: every reported pair is similar, and every pair at J >= 0.9 is reported.
    def jaccard(a: str, b: str) -> float:
        sa, sb = shingles(a), shingles(b)
        return len(sa & sb) / len(sa | sb)

    assert reported and all(jaccard(stream[k][1], stream[m][1]) >= 0.65 for k, ms in reported.items() for m in ms)
    kept_set = set(kept_keys)
    for k, (family, text) in enumerate(stream):
        if family >= 0:
            close = [m for m in kept_keys if m < k and stream[m][0] == family and jaccard(stream[m][1], text) >= 0.9]
            assert k not in kept_set or not close, (k, close)


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateIndex(threshold=0.0)
    with pytest.raises(ValueError, match="shingle"):
        NearDuplicateIndex(shingle=0)
