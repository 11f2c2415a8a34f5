"""The one error type for a dataset that cannot be used as given."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset folder, split or sample that training cannot use; the message says how to fix it."""
