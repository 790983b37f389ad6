"""The files one model is made of, where each lies, how each is read, and when the int8 one may run.

A model is a `.keras` file and the files that travel beside it. One naming rule for all of them, one JSON
reader, and one check that an int8 file belongs to the model it lies beside; every other module asks here:

| file | what it holds | written by |
|---|---|---|
| ``X.keras`` | the network (float16 or float32 weights) | `wsiproc train`, `wsiproc adapt` |
| ``X.int8.xml`` + ``X.int8.bin`` | the OpenVINO int8 network | `wsiproc quantize` |
| ``X.int8.xml.json`` | the int8 file's record: its source's sha256, the pair's sha256s, calibration, validation | `wsiproc quantize` |
| ``X.colours.json`` | per-slide colour alignment a run applies | `wsiproc adapt` (calibration) |
| ``X.reference.json`` | colour and confidence statistics of the training data | `benchmarks/reference_stats.py` |
| ``X.json`` | provenance: how the model was trained or adapted | `wsiproc train`, `wsiproc adapt` |
| ``X.classes.json`` | the class head's recipe, data and result | `wsiproc train --task classes` |

Why the int8 record matters: an int8 file whose source `.keras` has since changed, or that is not the pair its
record describes, is refused (`check_ir`) instead of silently running old weights; and `--precision auto`
picks int8 only when the record's own validation (the domains it was scored on, the tolerance it was judged
with: the shipped model's four held-out domains, or a lab's own) shows an F1 loss within that tolerance on
every domain (`int8_accepted`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..io.files import file_sha256

#: Largest F1 loss against float32, on any validated domain, at which auto still picks int8 (the default
#: `wsiproc quantize --validate` records as the tolerance it judged with).
F1_TOLERANCE = 0.005
INT8_SUFFIX = ".int8.xml"
RECORD_SUFFIX = ".json"


def _beside(suffix: str, doc: str) -> property:
    """A `ModelFiles` property: the file `<stem><suffix>` beside the model."""
    return property(lambda files: files.model.with_name(files.stem + suffix), doc=doc)


@dataclass(frozen=True)
class ModelFiles:
    """Where the files of the model `model` (its `.keras`, or its `X.int8.xml`) lie; they need not exist."""

    model: Path

    @classmethod
    def of(cls, model_path: str | Path) -> "ModelFiles":
        return cls(Path(model_path))

    @property
    def stem(self) -> str:
        """`X` for `X.keras` and for `X.int8.xml`: the files beside an int8 model are its source's."""
        p = self.model
        return p.stem[: -len(".int8")] if p.suffix.lower() == ".xml" and p.stem.endswith(".int8") else p.stem

    int8 = _beside(INT8_SUFFIX, "Where `wsiproc quantize` puts, and the engine looks for, the int8 model (``X.int8.xml``).")
    colours = _beside(".colours.json", "The per-slide colour alignment a run applies (``X.colours.json``).")
    reference = _beside(".reference.json", "The training data's colour and confidence statistics (``X.reference.json``).")
    provenance = _beside(".json", "How the model was trained or adapted (``X.json``).")
    class_head = _beside(".classes.json", "The class head's recipe, data and result (``X.classes.json``).")

    @property
    def int8_record(self) -> Path:
        return record_path(self.int8)


def record_path(ir_path: str | Path) -> Path:
    """The record of an OpenVINO file: ``<name>.json`` beside it (``X.int8.xml.json``)."""
    ir_path = Path(ir_path)
    return ir_path.with_name(ir_path.name + RECORD_SUFFIX)


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from `path`; a ValueError naming the file and `what` it should have been otherwise."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable {what} ({exc.__class__.__name__})") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{path}: unreadable {what} (not a JSON object)")
    return record


def read_record(ir_path: str | Path) -> dict | None:
    """The record beside an OpenVINO file, or None where there is none."""
    ir_path = Path(ir_path)
    side = record_path(ir_path)
    return read_json(side, f"sidecar of {ir_path.name}") if side.is_file() else None


def _sha256_of_digests(*digests: str) -> str:
    digest = hashlib.sha256()
    for part in digests:
        digest.update(part.encode())
    return digest.hexdigest()


def ir_sha256(xml_path: str | Path) -> str:
    """One digest for an IR pair: the sha256 of the .xml's and the .bin's sha256s (weights included)."""
    xml_path = Path(xml_path)
    bin_path = xml_path.with_suffix(".bin")
    if not bin_path.is_file():
        raise FileNotFoundError(f"{xml_path}: its weights file {bin_path.name} is missing")
    return _sha256_of_digests(file_sha256(xml_path), file_sha256(bin_path))


def _source_of(path: Path, record: dict) -> Path | None:
    """The source `.keras` named in the record: beside the model first (files moved together), else where it was."""
    beside = path.with_name(str(record.get("source_model", "")))
    if record.get("source_model") and beside.is_file():
        return beside
    recorded = Path(str(record.get("source_path", "")))
    return recorded if record.get("source_path") and recorded.is_file() else None


def check_ir(path: str | Path, source: str | Path | None = None, source_sha256: str | None = None) -> dict | None:
    """Refuse a stale OpenVINO model: one that is not the pair its record describes, or whose source `.keras` changed.

    `source`: the `.keras` the model must have been made from (the engine looking beside a model); then a
    missing record is refused too, since nothing says which model the file belongs to. Without `source` (an
    IR given as the model), no record means nothing to check (None), and the source named in the record is
    checked where it can be found (beside the IR, or where it was converted from).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    record = read_record(path)
    if record is None:
        if source is not None:
            raise ValueError(f"{path}: no sidecar {record_path(path).name}, so nothing says it was made from "
                             f"{Path(source).name}; rerun wsiproc quantize")
        return None
    bin_path = path.with_suffix(".bin")
    if (record.get("xml_sha256") != file_sha256(path) or not bin_path.is_file()
            or record.get("bin_sha256") != file_sha256(bin_path)):
        raise ValueError(f"{path}: does not match its sidecar {record_path(path).name} (file replaced or "
                         "half-written); rerun wsiproc quantize")
    source = Path(source) if source is not None else _source_of(path, record)
    if source is not None:
        actual = source_sha256 or file_sha256(source)
        if actual != record.get("source_sha256"):
            raise ValueError(f"{path}: stale, made from an earlier version of {source} "
                             f"(sha256 {str(record.get('source_sha256'))[:12]}…); rerun wsiproc quantize {source}")
    return record


def stored_precision(path: str | Path) -> str:
    """'int8' or 'float32': what an IR file holds (its record says; else the graph's FakeQuantize nodes do)."""
    path = Path(path)
    record = read_record(path)
    if record and record.get("precision") in ("int8", "float32"):
        return str(record["precision"])
    try:
        return "int8" if b"FakeQuantize" in path.read_bytes() else "float32"
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def int8_accepted(record: dict | None) -> tuple[bool, str]:
    """Whether the record's validation lets `--precision auto` pick the int8 model, and why (one line).

    Judged from the validation's own domains and tolerance: a lab that validated its int8 model on its own
    held-out images gets it chosen on the same terms as the shipped model on its four training domains. A
    tolerance above `F1_TOLERANCE` is a user's explicit choice (`wsiproc quantize --tolerance`), recorded.
    """
    validation = (record or {}).get("validation")
    if not validation or not validation.get("domains"):
        return False, "not validated (wsiproc quantize --validate DATA scores it on held-out images)"
    tolerance = float(validation.get("tolerance", F1_TOLERANCE))
    losses = {name: d["f1_loss"] for name, d in validation["domains"].items()}
    worst = max(losses, key=losses.get)
    text = ", ".join(f"{name} {loss:+.4f}" for name, loss in losses.items())
    if losses[worst] > tolerance:
        return False, f"F1 loss {losses[worst]:.4f} on {worst} > {tolerance} (losses: {text})"
    return True, f"F1 loss <= {tolerance} on every validated domain ({text})"


__all__ = ["ModelFiles", "F1_TOLERANCE", "INT8_SUFFIX", "record_path", "read_json", "read_record", "ir_sha256",
           "check_ir", "stored_precision", "int8_accepted"]
