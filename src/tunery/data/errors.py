"""Errors of the data pipeline: every message names the file, the row (1-based) and the field."""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used as configured. The message says what, where, and how to fix it."""


class RowError(Exception):
    """A malformed row, raised inside a format; the pipeline adds the file and row number."""

    def __init__(self, field: str | None, message: str):
        self.field = field
        self.message = message
        super().__init__(f"field '{field}': {message}" if field else message)


def row_error_message(source: str, row: int, err: RowError, hint: bool = True) -> str:
    where = f"{source}: row {row}"
    if err.field:
        where += f": field '{err.field}'"
    text = f"{where}: {err.message}"
    if hint:
        text += " (fix the row, or set skip_invalid_rows: true to skip malformed rows and count them)"
    return text
