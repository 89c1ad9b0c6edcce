"""User-facing errors: each one becomes a single line on stderr and exit code 2."""

from __future__ import annotations


class QCompileError(Exception):
    """Bad input or an impossible request. The message says what is wrong and what to do."""


class VerificationError(QCompileError):
    """A compiled model failed a numeric check."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
