"""The project's own error types: bad input that the user can fix, reported as one sentence.

`dkn.cli.main` prints these (and `ValueError`s, the library's convention for bad arguments) as one line
with exit status 2; anything else is a bug and keeps its traceback.  Modules with their own error types
(`models.ModelLoadError`, `query.QueryError`, `datasets.DatasetError`, `cache.CacheError`) derive them
from `DknError` or `ValueError`, so this module imports nothing else and costs nothing to import.
"""

from __future__ import annotations


class DknError(Exception):
    """Base of the user-facing errors: the message says what to do."""


class UsageError(DknError):
    """Arguments that do not fit together (e.g. --suppress and --amplify at once)."""


USER_ERRORS: tuple[type[BaseException], ...] = (DknError, ValueError, FileNotFoundError, NotADirectoryError)
