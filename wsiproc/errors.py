"""How problems are reported: one line per file, `path: problem`, never a traceback."""
from __future__ import annotations

from pathlib import Path


def problem(exc: BaseException, path: str | Path | None = None) -> str:
    """The first line of the exception's message (its type name when it has none), without a leading `path: `."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    if path is not None:
        for prefix in (f"{path}: ", f"{Path(path).resolve()}: "):
            if text.startswith(prefix):
                return text[len(prefix):]
    return text


def one_line(exc: BaseException, path: str | Path) -> str:
    """`path: problem`, naming the file once whether or not the message already did."""
    return f"{path}: {problem(exc, path)}"
