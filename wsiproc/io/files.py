"""Files that are complete or absent: atomic writes (a killed run never leaves a truncated file under its final
name) and file digests."""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
import glob


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `final`; move it onto `final` only if the block finishes.

    The temporary file lives in the same directory so that `os.replace` is an atomic rename on the same
    file system. It is fsynced first, so even a power cut cannot leave a truncated file under the final
    name. Its name starts with a dot and ends with `.partial` so listings and globs for results skip it.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.partial")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort, since not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()




def expand(spec: str, suffixes: set[str] | None = None) -> list[Path]:
    """A file, a folder (its files) or a glob pattern → sorted file list (only those ending in `suffixes`,
    where given; two-part suffixes such as `.geojson.gz` count)."""
    path = Path(spec)
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in sorted(glob.glob(spec)) if Path(p).is_file()]
    if suffixes is not None:
        files = [p for p in files if "".join(p.suffixes[-2:]).lower() in suffixes or p.suffix.lower() in suffixes]
    return files
