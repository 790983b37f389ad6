"""The cohort summary: `summary.csv` in the output folder, one row per input, the table a lab opens first.

Several processes may share the output folder, so no process owns the table. Each one leaves what it did
with an input on disk, next to the outputs: the run record `<stem>.json` of a computed slide, and a small
outcome note `.<stem>.outcome.json` (done, skipped or failed with the reason, and the seconds it took).
The summary is rebuilt from those files and from the live claims, under a short lock so that two rebuilds
do not interleave, and replaced atomically: every process's rows survive, whoever writes last.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import claims
from ..detection.classes import CLASSES
from ..io.files import atomic_write_text
from ..outputs.record import per_mm2, tissue_mm2

SUMMARY_NAME = "summary.csv"
COLUMNS = ("input", "status", "detail", "nuclei", "tissue_mm2", "nuclei_per_mm2", "model_sha256", "seconds")
#: Per nucleus type, its count and its density per mm² of tissue: after `COLUMNS`, and only in a table where
#: some slide has classes (a cohort without any keeps the table of before classes; slides without classes
#: leave the cells empty). After, not among them, so existing columns keep their positions.
CLASS_COLUMNS = (*CLASSES, *(f"{name}_per_mm2" for name in CLASSES))
NOTE_SUFFIX = ".outcome.json"
CLAIM_SUFFIX = ".claim"
LOCK_NAME = f".{SUMMARY_NAME}.lock"
#: A rebuild takes well under a second; one held longer than this was abandoned (other hosts).
LOCK_TIMEOUT_S = 600.0
#: How long a process waits for another's rebuild before leaving this one to the next.
LOCK_WAIT_S = 60.0


@dataclass(frozen=True)
class Note:
    """What the last process to handle an input did with it: the record of a skip or a failure too."""

    input: str
    status: str  # "done", "skipped" or "failed"
    detail: str = ""
    seconds: float | None = None  # of the computation that made the outputs
    host: str = claims.HOST
    pid: int = field(default_factory=os.getpid)
    time: float = field(default_factory=time.time)


def note_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f".{stem}{NOTE_SUFFIX}"


def claim_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f".{stem}{CLAIM_SUFFIX}"


def write_note(out_dir: Path, stem: str, note: Note) -> None:
    atomic_write_text(note_path(out_dir, stem), json.dumps(asdict(note), indent=1) + "\n")


def read_note(path: Path) -> Note | None:
    """The note at `path`; None when absent or unreadable (a row then comes from the record alone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Note(**{k: data[k] for k in ("input", "status", "detail", "seconds", "host", "pid", "time")})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_record(path: Path) -> dict | None:
    """A run record, or None for anything else (a missing file, another tool's JSON)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "nuclei" in record and "wsiproc_version" in record else None


def _stems(out_dir: Path) -> set[str]:
    """Every input the folder knows of: by its note, its claim or its run record."""
    stems = set()
    for entry in os.scandir(out_dir):
        name = entry.name
        if name.startswith(".") and name.endswith(NOTE_SUFFIX):
            stems.add(name[1 : -len(NOTE_SUFFIX)])
        elif name.startswith(".") and name.endswith(CLAIM_SUFFIX):
            stems.add(name[1 : -len(CLAIM_SUFFIX)])
        elif name.endswith(".json") and not name.startswith("."):
            stems.add(name[: -len(".json")])
    return stems


def _metrics(record: dict) -> dict:
    """Nuclei, tissue area and density, model: what the run record says of a finished slide; with classes
    (the record's "classes"), each class' count and density too.

    The tissue area is the tissue mask's (8 µm grid, borders grown by 16 µm) share of the slide
    (`record.tissue_mm2`); without a mask (--no-tissue-mask) it is unknown, and so are the densities.
    """
    nuclei = record.get("nuclei")
    area = tissue_mm2(record)
    metrics = {
        "nuclei": nuclei,
        "tissue_mm2": None if area is None else round(area, 4),
        "nuclei_per_mm2": per_mm2(nuclei, area),
        "model_sha256": (record.get("model") or {}).get("sha256"),
    }
    classes = record.get("classes")
    if isinstance(classes, dict):
        for name in CLASSES:
            count = (classes.get(name) or {}).get("nuclei")
            metrics[name] = count
            metrics[f"{name}_per_mm2"] = per_mm2(count, area)
    return metrics


def _claim_row(claim: claims.Claim, note: Note | None, stem: str, timeout_s: float) -> dict:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claim.started))
    why = claim.stale_reason(timeout_s)
    detail = f"claimed by {claim.owner} since {since}" + (f" (stale: {why}; the next run takes it over)" if why else "")
    return {"input": claim.input or (note.input if note else stem), "status": "claimed", "detail": detail}


def row(out_dir: Path, stem: str, timeout_s: float = claims.DEFAULT_TIMEOUT_S) -> dict | None:
    """One input's row: claimed while a process holds it, else the last outcome with the record's figures."""
    note = read_note(note_path(out_dir, stem))
    claim = claims.Claim.read(claim_path(out_dir, stem))
    if claim is not None:
        return _claim_row(claim, note, stem, timeout_s)
    record = _read_record(out_dir / f"{stem}.json")
    if note is None and record is None:
        return None
    if note is None:  # outputs of a run from before outcome notes existed
        note = Note(record["input"].get("path", stem), "done", seconds=None)
    result = {"input": note.input, "status": note.status, "detail": note.detail,
              "seconds": None if note.seconds is None else round(note.seconds, 1)}
    if note.status in ("done", "skipped"):
        if record is None:
            result["detail"] = "run record missing: outputs incomplete"
        else:
            result.update(_metrics(record))
    return result


def cohort_rows(out_dir: Path, timeout_s: float = claims.DEFAULT_TIMEOUT_S) -> list[dict]:
    rows = [r for r in (row(out_dir, stem, timeout_s) for stem in _stems(out_dir)) if r is not None]
    return sorted(rows, key=lambda r: r["input"])


def columns(rows: list[dict]) -> tuple[str, ...]:
    """`COLUMNS`, and `CLASS_COLUMNS` after them where some row has class figures."""
    with_classes = any(r.get(name) is not None for r in rows for name in CLASSES)
    return COLUMNS + CLASS_COLUMNS if with_classes else COLUMNS


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    names = columns(rows)
    writer = csv.DictWriter(buffer, names, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in names})
    return buffer.getvalue()


def remove_leftovers(out_dir: Path) -> None:
    """Temporary files of a rebuild that was killed; only the lock holder writes the summary, so any is a leftover."""
    pattern = re.compile(re.escape(f".{SUMMARY_NAME}.") + r"[0-9a-f]+\.partial|" + re.escape(f"{LOCK_NAME}.") + r"[0-9a-f]+\.stale")
    for entry in os.scandir(out_dir):
        if pattern.fullmatch(entry.name):
            Path(entry.path).unlink(missing_ok=True)


def rebuild(out_dir: Path, timeout_s: float = claims.DEFAULT_TIMEOUT_S, wait_s: float = LOCK_WAIT_S) -> Path | None:
    """Rewrite `summary.csv` from the folder; None when another process kept the lock for `wait_s` seconds.

    Without the lock, a process that read the folder before another's change could rename its table over
    the newer one; with it, each rebuild sees every change made before it started.
    """
    attempt = claims.wait_for(out_dir / LOCK_NAME, timeout_s=LOCK_TIMEOUT_S, wait_s=wait_s)
    if attempt.claim is None:
        return None
    try:
        remove_leftovers(out_dir)
        return atomic_write_text(out_dir / SUMMARY_NAME, to_csv(cohort_rows(out_dir, timeout_s)))
    finally:
        claims.release(attempt.claim)
