"""The one exception of the input pipeline."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A problem with the data or the data tooling; its message is the one line the user sees."""
