"""How problems are reported: one line per file, `path: problem`, never a traceback.

The package's own failures form one small hierarchy; the command line maps it to exit codes in one place
(`wsiproc.cli.common.EXIT_CODES`):

    WsiprocError            a problem the user can act on (exit 1); its message is the line to show
    ├── UsageError          the command line or a config file is wrong (exit 2, shown as `error: …`)
    ├── SlideError          a slide or image that cannot be used (the message starts with its path)
    ├── ModelError          a model file that cannot be used (the message starts with its path)
    │   └── ModelNotFoundError
    └── OutputFolderError   the output folder cannot take files

They also derive from the built-in type callers caught before they existed (ValueError, FileNotFoundError,
OSError), so `except ValueError` around a slide still catches a SlideError.
"""
from __future__ import annotations

import errno
import os
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


class WsiprocError(Exception):
    """A problem the user can act on; its message is the one line to show."""


class UsageError(WsiprocError, ValueError):
    """The command line or a config file asks for something impossible."""


class SlideError(WsiprocError, ValueError):
    """A slide that cannot be used; the message starts with the file name."""


class ModelError(WsiprocError, ValueError):
    """A model that cannot be used; the message starts with the model file's name."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model file does not exist."""


class OutputFolderError(WsiprocError, OSError):
    """The output folder cannot take files (full, read-only, not permitted): every slide would fail alike."""


#: What stops a batch at once when writing into the output folder: no later slide could be written either.
FOLDER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _inside(filename: object, folder: Path) -> bool:
    try:
        return Path(os.fsdecode(filename)).resolve().is_relative_to(folder.resolve())
    except (TypeError, ValueError, OSError):
        return False


def folder_problem(exc: BaseException, folder: str | Path) -> str | None:
    """"no space left on device", "read-only file system"…: when `exc` (or what caused it) is the output folder
    refusing a write; None for any other failure. An error naming a file outside `folder` is not the folder's;
    one naming no file (a failed write() names none) is, for a full disk, but not for a permission error
    (reading a slide can be refused too, and writes are refused when the file is opened, which names it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FOLDER_ERRNOS:
            named = exc.filename is not None
            if _inside(exc.filename, Path(folder)) if named else exc.errno not in (errno.EACCES, errno.EPERM):
                return os.strerror(exc.errno).lower()
        exc = exc.__cause__ or exc.__context__
    return None
