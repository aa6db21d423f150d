"""Errors as the one line a log, a diagnostics value or a command's message shows."""
from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message with its white space folded (its kind when it has none), cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
