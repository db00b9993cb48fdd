"""User-facing errors.

Anything a user can cause (a bad config key, a malformed data row, a missing file) raises
:class:`PosttrainError` or a subclass. The CLI prints its message and exits with status 2, without a
traceback. Internal invariants use ``assert``.
"""

from __future__ import annotations


class PosttrainError(Exception):
    """An error caused by user input; the message names the field/file and the fix."""


class ConfigError(PosttrainError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class DataError(PosttrainError):
    """A data row or file is invalid.

    ``where`` locates it the way an editor would: ``train.jsonl:12`` (line, for JSONL/CSV) or
    ``train.parquet row 5`` (1-based row, for columnar formats); ``reason`` says what was expected.
    """

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")


class TrainingDiverged(PosttrainError):
    """Loss became NaN or infinite; the last good checkpoint is kept."""
