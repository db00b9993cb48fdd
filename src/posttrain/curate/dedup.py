"""Exact and near-duplicate detection over streams of texts.

- Exact: texts are equal after :func:`normalize_for_dedup` (case-folded, whitespace collapsed, punctuation
  stripped from both ends). One 16-byte BLAKE2b digest is held per distinct text, so memory grows with the
  number of distinct texts, not their length.
- Near: MinHash LSH (Broder 1997, "On the resemblance and containment of documents"; banding as in
  Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3) over word 5-gram shingles. Signatures
  are ``datasketch`` MinHashes; the band index is our own (:class:`NearDuplicateIndex`), because datasketch's
  ``MinHashLSH`` holds each band as a bytes key with a set of keys per bucket, about 3.7 KB per kept text
  (measured), against about 1 KB here. LSH candidates are verified with the MinHash Jaccard estimate, so a
  reported pair has estimated Jaccard >= ``threshold``; pairs near the threshold may be missed or kept by
  estimation noise (standard error about ``sqrt(J(1-J)/num_perm)``, 0.035 at J=0.8 and 128 permutations).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Hashable, Iterable
from typing import Final

import numpy as np
from datasketch import MinHash


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def normalize_for_dedup(text: str) -> str:
    """Case-fold, collapse runs of whitespace to one space, and strip punctuation and spaces at both ends."""
    s = " ".join(text.casefold().split())
    start, end = 0, len(s)
    while start < end and (s[start].isspace() or _is_punct(s[start])):
        start += 1
    while end > start and (s[end - 1].isspace() or _is_punct(s[end - 1])):
        end -= 1
    return s[start:end]


def _digest(text: str) -> bytes:
    return hashlib.blake2b(normalize_for_dedup(text).encode("utf-8"), digest_size=16).digest()


def exact_duplicates(texts: Iterable[str]) -> list[tuple[int, int]]:
    """``(index, first_index)`` for every text equal after normalisation to an earlier one, in input order."""
    first: dict[bytes, int] = {}
    dups: list[tuple[int, int]] = []
    for i, text in enumerate(texts):
        first_i = first.setdefault(_digest(text), i)
        if first_i != i:
            dups.append((i, first_i))
    return dups


_WORD = re.compile(r"\w+")


def shingles(text: str, size: int = 5) -> set[str]:
    """Word ``size``-grams of the case-folded words of ``text``; character ``size``-grams of its normalised
    words when it has fewer than ``size`` words (the whole string when shorter still)."""
    words = _WORD.findall(text.casefold())
    if len(words) >= size:
        return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}
    joined = " ".join(words)
    if len(joined) <= size:
        return {joined}
    return {joined[i : i + size] for i in range(len(joined) - size + 1)}


CANDIDATE_RECALL: Final = 0.9  # P(a pair at exactly the threshold becomes an LSH candidate) the bands aim for


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows per band)`` for MinHash LSH: the most rows per band (the fewest false candidates to
    verify) such that a pair whose Jaccard is exactly ``threshold`` shares at least one band with probability
    ``1 - (1 - threshold**rows)**bands >= CANDIDATE_RECALL``.

    Candidates are verified against the stored signatures, so more bands cost time and memory, never
    precision. For threshold 0.8 and 128 permutations this gives 16 bands of 8: a candidate with probability
    0.95 at J=0.8 and 0.999 at J=0.88, where datasketch's ``MinHashLSH`` default (9 bands of 13, which
    weighs false positives and false negatives equally) gives 0.40 and 0.85.
    """
    best = (num_perm, 1)  # one value per band: every pair sharing any minimum is a candidate
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= CANDIDATE_RECALL:
            best = (bands, rows)
    return best


class _BucketHeads:
    """Open-addressing hash table (linear probing, load <= 1/2) from a nonzero 64-bit band key to an int row.

    Two flat numpy arrays, 12 bytes a slot: about 24 bytes per stored key, where a Python dict of int to int
    takes about 100. Keys are never removed. Single keys are probed in plain Python through memoryviews of the
    arrays (Python ints, ~50 ns an access), not numpy indexing (~2 us an operation on a small array): the
    probes of one text's 16 keys take a few microseconds.
    """

    def __init__(self, capacity: int = 1 << 12) -> None:
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        assert capacity & (capacity - 1) == 0, "capacity must be a power of two"
        self._keys = np.zeros(capacity, np.uint64)  # 0 marks an empty slot
        self._rows = np.zeros(capacity, np.int32)
        self._key_at, self._row_at = memoryview(self._keys), memoryview(self._rows)
        self._mask = capacity - 1
        self._size = 0  # stored keys

    def reserve(self, extra: int) -> None:
        """Grow (doubling, rehashing every key) until ``extra`` more keys keep the load at most 1/2."""
        capacity = len(self._keys)
        while 2 * (self._size + extra) > capacity:
            capacity *= 2
        if capacity == len(self._keys):
            return
        used = self._keys != 0
        keys, rows = self._keys[used], self._rows[used]
        self._allocate(capacity)
        for start in range(0, keys.size, 1 << 20):  # in chunks, so the rehash's temporaries stay small
            self._place(keys[start : start + (1 << 20)], rows[start : start + (1 << 20)])

    def _slot(self, key: int) -> int:
        """The slot holding ``key``, else the empty slot its probe stops at."""
        key_at, mask = self._key_at, self._mask
        slot = key & mask
        while True:
            at = key_at[slot]
            if at == key or at == 0:
                return slot
            slot = (slot + 1) & mask

    def get(self, key: int) -> int:
        """The row stored under ``key``, or -1."""
        slot = self._slot(key)
        return self._row_at[slot] if self._key_at[slot] == key else -1

    def put(self, key: int, row: int) -> int:
        """Store ``row`` under ``key`` (call :meth:`reserve` first); returns the row it replaces, or -1."""
        slot = self._slot(key)
        previous = self._row_at[slot] if self._key_at[slot] == key else -1
        if previous == -1:
            self._key_at[slot] = key
            self._size += 1
        self._row_at[slot] = row
        return previous

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Insert absent distinct keys, vectorised for a rehash: each round, the first key aiming at each empty
        slot takes it and the others move one slot on, which is linear probing run for all keys at once."""
        slots = (keys & np.uint64(self._mask)).astype(np.intp)
        while keys.size:
            empty = np.flatnonzero(self._keys[slots] == 0)
            _, first = np.unique(slots[empty], return_index=True)
            won = empty[first]
            self._keys[slots[won]], self._rows[slots[won]] = keys[won], rows[won]
            self._size += won.size
            lost = np.ones(keys.size, bool)
            lost[won] = False
            keys, rows, slots = keys[lost], rows[lost], (slots[lost] + 1) & self._mask


class NearDuplicateIndex:
    """One-pass near-duplicate filter: :meth:`add` each text in stream order.

    A text with no near duplicate among the kept texts is kept (added to the index) and :meth:`add` returns
    ``[]``. Otherwise it is reported, not indexed, and :meth:`add` returns the kept keys it matches, in the
    order they were added; so a later text is always compared with first occurrences, never with dropped
    copies.

    Layout: kept text number ``i`` (in add order) has its ``num_perm`` uint32 MinHash values in row ``i`` of
    one growing array, and for each of the :func:`lsh_bands` bands, a 64-bit hash of that band's values is a
    bucket key. A bucket is a linked list: a hash table holds each key's newest row, and ``next`` (one int32
    per kept text and band) the row before it in the same bucket, so every kept text sharing a band with a
    new one is a candidate, as in datasketch's ``MinHashLSH``. Memory per kept text: ``4 * num_perm`` bytes of
    signature, ``4 * bands`` of links, about ``24 * bands`` of hash table, and the key: about 1 KB at the
    defaults (16 bands), plus up to half again while an array doubles.

    Args:
        threshold: minimum estimated Jaccard similarity of shingle sets to call two texts near duplicates.
        num_perm: MinHash permutations; more is slower but estimates more tightly.
        shingle: words per shingle (characters per shingle for texts with fewer words).
        seed: MinHash permutation seed; the same seed and input give the same results.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, seed: int = 1) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if num_perm < 2:
            raise ValueError(f"num_perm must be >= 2, got {num_perm}")
        if shingle < 1:
            raise ValueError(f"shingle must be >= 1, got {shingle}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        self.seed = seed
        self.bands, self.band_rows = lsh_bands(threshold, num_perm)
        # Drawing permutations is costly; copying an empty template reuses them for every text.
        self._template = MinHash(num_perm=num_perm, seed=seed)
        # A band's key: a random odd linear form of its values (mod 2**64) plus a per-band salt, so equal
        # values in two bands make different keys. MinHash values are already uniform, and multiplying by an
        # odd number permutes the residues mod 2**k, so the low bits the table uses are uniform too.
        rng = np.random.default_rng(0)
        self._band_weights = rng.integers(0, 2**63, self.band_rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._band_salts = rng.integers(0, 2**63, self.bands, dtype=np.uint64)
        self._keys: list[Hashable] = []  # row -> kept key
        self._kept: set[Hashable] = set()
        self._signatures = np.zeros((1024, num_perm), np.uint32)  # (capacity, num_perm); rows < len(self) used
        self._next = np.zeros((1024, self.bands), np.int32)  # (capacity, bands): older row in the bucket, or -1
        self._next_at = memoryview(self._next.reshape(-1))  # [row * bands + band], as Python ints
        self._heads = _BucketHeads()

    def __len__(self) -> int:
        """Number of kept (indexed) texts."""
        return len(self._keys)

    def minhash(self, text: str) -> MinHash:
        m = self._template.copy()
        m.update_batch([s.encode("utf-8") for s in sorted(shingles(text, self.shingle))])
        return m

    def query(self, text: str) -> list[tuple[Hashable, float]]:
        """Kept keys whose estimated Jaccard with ``text`` is >= threshold, with that estimate, in add order."""
        signature = self.minhash(text).hashvalues
        heads = [self._heads.get(band_key) for band_key in self._band_keys(signature)]
        return [(self._keys[row], jaccard) for row, jaccard in self._verify(signature, heads)]

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        """The ``bands`` nonzero 64-bit bucket keys of a (num_perm,) uint32 signature."""
        values = signature[: self.bands * self.band_rows].reshape(self.bands, self.band_rows).astype(np.uint64)
        keys = (values * self._band_weights).sum(axis=1, dtype=np.uint64) + self._band_salts
        return [key or 1 for key in keys.tolist()]  # 0 marks an empty slot

    def _verify(self, signature: np.ndarray, heads: list[int]) -> list[tuple[int, float]]:
        """``(row, estimated Jaccard)`` of the kept texts sharing a bucket with ``signature`` and estimated at
        >= threshold, in add order; ``heads`` is each of its buckets' newest row, -1 for none."""
        found: set[int] = set()
        for band, row in enumerate(heads):
            # Down the bucket's list, newest to oldest. Keys are salted per band, so a bucket's texts all
            # share this band (unless two 64-bit keys collide, which costs at most a verified candidate).
            while row >= 0:
                found.add(row)
                row = self._next_at[row * self.bands + band]
        if not found:
            return []
        candidates = np.array(sorted(found))  # add order
        # The MinHash Jaccard estimate: the fraction of permutations whose minima agree.
        agree = np.count_nonzero(self._signatures[candidates] == signature, axis=1)
        return [(int(row), float(n) / self.num_perm) for row, n in zip(candidates, agree)
                if float(n) / self.num_perm >= self.threshold]

    def add(self, key: Hashable, text: str) -> list[Hashable]:
        """Keep ``text`` under ``key`` and return ``[]``, or return the kept keys it near-duplicates."""
        if key in self._kept:
            raise ValueError(f"key {key!r} is already kept in the index")
        signature = self.minhash(text).hashvalues
        band_keys = self._band_keys(signature)
        hits = self._verify(signature, [self._heads.get(band_key) for band_key in band_keys])
        if hits:
            return [self._keys[row] for row, _ in hits]
        row = len(self._keys)
        assert row < 2**31 - 1, "row numbers are int32"
        if row == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.zeros_like(self._signatures)])
            self._next = np.concatenate([self._next, np.zeros_like(self._next)])
            self._next_at = memoryview(self._next.reshape(-1))
        self._signatures[row] = signature
        self._heads.reserve(self.bands)
        self._next[row] = [self._heads.put(band_key, row) for band_key in band_keys]
        self._keys.append(key)
        self._kept.add(key)
        return []
