"""Errors raised by the data package.

`DataError` subclasses `ValueError`, so callers that already catch bad-input
`ValueError`s keep working; every message names the bad value and the fix.
"""


class DataError(ValueError):
    """Bad data configuration or malformed input data (names the value and fix)."""
