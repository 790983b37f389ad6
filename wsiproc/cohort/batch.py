"""Many inputs, one at a time: each succeeds or fails on its own, finished ones are not redone.

A result counts as finished when its run record (`<stem>.json`, written last) names the same input file
(size and modification time), the same model (sha256) and the same output-affecting parameters, and
every output it lists is on disk. Anything else is processed again from scratch.

Several processes may work through the same inputs into one folder (SLURM array jobs, two terminals,
machines sharing an NFS folder): each input is claimed first (`claims`), so exactly one process computes
it and the others report it as claimed; every write for an input happens under its claim. After each
slide the cohort table `summary.csv` is rebuilt from the folder (`summary`). A folder that refuses writes
(full, read-only, not permitted) stops the batch at once with one line, instead of failing every slide.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import claims, summary
from ..config import RunConfig
from ..errors import OutputFolderError, folder_problem, problem
from ..outputs.formats import RESULT_SUFFIXES
from ..detection.inference import Predictor
from ..detection.params import output_fields
from ..detection.loop import ProgressFn
from .one_slide import run_slide

#: Parameters that change what a run writes, as their fields mark them (`wsiproc.detection.params.OUTPUT`); the
#: others (model path: its sha256 is compared instead; workers, batch size, strictness) do not.
OUTPUT_PARAMETERS = output_fields(RunConfig)
#: Output parameters added after records were first written, and what a record without one ran as: a run from
#: before nucleus types wrote no classes, as a run with classes on does with a model that has no class head
#: (for a model with one, `is_complete` sees that the record has no classes).
PARAMETERS_OF_OLDER_RECORDS = {"classes": True}


@dataclass
class Outcome:
    path: Path
    status: str  # "done", "skipped" (already complete), "failed", "claimed" (by another process) or "not run"
    detail: str = ""
    nuclei: int | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def input_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_complete(out_dir: Path, stem: str, path: Path, cfg: RunConfig, model_sha256: str,
                colours_sha256: str | None = None, model_classes: bool | None = None) -> bool:
    """Whether `<stem>.json` says this input was done with this model (and its per-slide colour alignment, if
    any), these output parameters, and its outputs are all there.

    `model_classes` (whether the model has a class head; None: not checked): the record must then have
    classes exactly when `cfg.classes` asks for them (a record written by a version that ignored the head has none).
    """
    record_path = out_dir / f"{stem}.json"
    try:
        record = json.loads(record_path.read_text())
        same_input = record["input"]["fingerprint"] == input_fingerprint(path)
        same_model = (record["model"]["sha256"] == model_sha256
                      and record["model"].get("colours_sha256") == colours_sha256)
        params, recorded = cfg.to_dict(), {**PARAMETERS_OF_OLDER_RECORDS, **record["parameters"]}
        same_params = all(recorded.get(k) == params[k] for k in OUTPUT_PARAMETERS)
        outputs_there = all((out_dir / name).is_file() for name in record["outputs"].values())
        same_classes = model_classes is None or ("classes" in record) == bool(cfg.classes and model_classes)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return same_input and same_model and same_params and outputs_there and same_classes


def remove_leftovers(out_dir: Path, stem: str) -> None:
    """Temporary files of an interrupted earlier run of this input (atomic writes never finished), and a claim
    set aside by a takeover that was itself interrupted. Called under the input's claim: the temporary files of
    a process working on another input, even one whose name starts alike, are never touched."""
    names = [stem + suffix for suffix in RESULT_SUFFIXES] + [summary.note_path(out_dir, stem).name]
    pattern = re.compile("|".join(re.escape(f".{name}.") + r"[0-9a-f]+\.partial" for name in names)
                         + "|" + re.escape(f"{summary.claim_path(out_dir, stem).name}.") + r"[0-9a-f]+\.stale")
    for entry in os.scandir(out_dir):
        if pattern.fullmatch(entry.name):
            Path(entry.path).unlink(missing_ok=True)


def remove_incomplete(out_dir: Path, stem: str) -> None:
    """After a write failed: a slide's files without its run record are an incomplete set; they go (freeing space)."""
    if (out_dir / f"{stem}.json").exists():
        return
    for suffix in RESULT_SUFFIXES:
        (out_dir / f"{stem}{suffix}").unlink(missing_ok=True)
    remove_leftovers(out_dir, stem)


@contextlib.contextmanager
def folder_errors(out_dir: Path, doing: str) -> Iterator[None]:
    """Turn the folder refusing a write into OutputFolderError: one line naming the folder, and the batch stops."""
    try:
        yield
    except OutputFolderError:
        raise
    except OSError as exc:
        reason = folder_problem(exc, out_dir)
        if reason is None:
            raise
        raise OutputFolderError(f"{out_dir}: {reason} ({doing})") from exc


def check_output_folder(out_dir: Path) -> None:
    """Create the folder and write a byte there before the first slide: an unusable folder is named at once.

    Not the only check: the disk can fill up later, which the writes themselves report. The test file has no
    name (O_TMPFILE where the file system has it), so even a kill leaves nothing behind.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir) as fh:
            fh.write(b"\0")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OutputFolderError(f"{out_dir}: cannot write there: {folder_problem(exc, out_dir) or problem(exc)}") from exc


def _stale_warning(path: Path, attempt: claims.Attempt) -> str:
    old = attempt.replaced
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(old.started))
    return f"{path}: warning: took over the stale claim of {old.owner} (since {since}; {attempt.replaced_because})"


def _compute(path: Path, out_dir: Path, cfg: RunConfig, predictor: Predictor, echo: Callable[[str], None],
             progress: ProgressFn | None, client) -> Outcome:
    """Run one claimed slide; a bad input is a failed outcome, the folder refusing a write stops the batch."""
    t0 = time.perf_counter()
    try:
        # A missing file has no fingerprint: open_slide then names the problem ("file not found").
        record = run_slide(path, out_dir, cfg, predictor, stem=path.stem, progress=progress,
                           extra_input={"fingerprint": input_fingerprint(path)} if path.exists() else None, client=client)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one bad input must not stop the batch
        reason = folder_problem(exc, out_dir)
        if reason is not None:
            remove_incomplete(out_dir, path.stem)
            message = f"{out_dir}: {reason} (writing the results of {path.name})"
            with contextlib.suppress(OSError):
                summary.write_note(out_dir, path.stem, summary.Note(str(path), "failed", message, time.perf_counter() - t0))
            raise OutputFolderError(message) from exc
        message = problem(exc, path)
        echo(f"{path}: {message}")
        return Outcome(path, "failed", message, seconds=time.perf_counter() - t0)
    outcome = Outcome(path, "done", "", record["nuclei"], time.perf_counter() - t0, record.get("warnings", []))
    for warning in outcome.warnings:
        echo(f"{path}: warning: {warning}")
    return outcome


def _note(out_dir: Path, outcome: Outcome) -> None:
    """Leave the outcome on disk for the cohort summary. A skip keeps the seconds of the run that made the
    outputs, and is not rewritten when the note already says so (a rerun of a finished cohort writes nothing)."""
    stem = outcome.path.stem
    seconds: float | None = outcome.seconds
    if outcome.status == "skipped":
        previous = summary.read_note(summary.note_path(out_dir, stem))
        if previous is not None and previous.status == "skipped":
            return
        seconds = previous.seconds if previous is not None and previous.status == "done" else None
    summary.write_note(out_dir, stem, summary.Note(str(outcome.path), outcome.status, outcome.detail, seconds))


def process_input(path: Path, out_dir: Path, cfg: RunConfig, predictor: Predictor, resume: bool,
                  echo: Callable[[str], None], progress_for: Callable[[Path], ProgressFn | None] | None, client,
                  claim_timeout_s: float) -> Outcome:
    """One input under its claim: claimed elsewhere, skipped (done), done or failed."""
    stem = path.stem
    if f"{stem}.csv" == summary.SUMMARY_NAME:  # its detections would overwrite the cohort table (the CLI refuses it)
        message = f"the output name '{stem}' is taken by the cohort table {summary.SUMMARY_NAME}: rename the input"
        echo(f"{path}: {message}")
        return Outcome(path, "failed", message)
    with folder_errors(out_dir, f"claiming {path.name}"):
        attempt = claims.acquire(summary.claim_path(out_dir, stem), str(path), claim_timeout_s)
    if attempt.replaced is not None:
        echo(_stale_warning(path, attempt))
    if attempt.claim is None:
        echo(f"{path}: claimed by {attempt.holder.owner}; skipped")
        return Outcome(path, "claimed", f"claimed by {attempt.holder.owner}")
    try:
        with folder_errors(out_dir, f"cleaning up after an earlier run of {path.name}"):
            remove_leftovers(out_dir, stem)
        # Checked under the claim: a process that finished this input a moment ago has released it by now.
        if resume and path.is_file() and is_complete(out_dir, stem, path, cfg, predictor.sha256, getattr(predictor, "colours_sha256", None),
                                                     bool(getattr(predictor, "classes", None))):
            outcome = Outcome(path, "skipped", "outputs complete for this model and parameters")
            echo(f"{path}: already done (outputs complete for this model and parameters); skipped")
        else:
            outcome = _compute(path, out_dir, cfg, predictor, echo, progress_for(path) if progress_for else None, client)
        with folder_errors(out_dir, f"writing the outcome of {path.name}"):
            _note(out_dir, outcome)
        return outcome
    finally:
        claims.release(attempt.claim)


def rebuild_summary(out_dir: Path, claim_timeout_s: float, echo: Callable[[str], None]) -> None:
    """summary.csv from the folder; a folder refusing the write stops the batch like any other write."""
    with folder_errors(out_dir, f"writing {summary.SUMMARY_NAME}"):
        if summary.rebuild(out_dir, claim_timeout_s) is None:
            echo(f"{out_dir / summary.SUMMARY_NAME}: warning: not updated (another process held its lock for "
                 f"{summary.LOCK_WAIT_S:g} s); a later slide updates it")


class Outcomes(list):
    """The outcome of every input, in order; `stopped` names why the batch stopped early (else empty)."""

    stopped: str = ""


def _stop(outcomes: Outcomes, rest: list[Path], exc: OutputFolderError, out_dir: Path, claim_timeout_s: float,
          echo: Callable[[str], None]) -> Outcomes:
    """The folder refused a write: one line, the rest "not run", and a last try at the summary (space may be freed)."""
    echo(f"{exc}; batch stopped, {len(rest)} input(s) not started" if rest else f"{exc}; batch stopped")
    outcomes.stopped = str(exc)
    outcomes.extend(Outcome(p, "not run", "batch stopped: the output folder is unusable") for p in rest)
    with contextlib.suppress(Exception):
        summary.rebuild(out_dir, claim_timeout_s, wait_s=5.0)
    return outcomes


def run_batch(inputs: list[Path], out_dir: Path, cfg: RunConfig, predictor: Predictor, resume: bool = True,
              echo: Callable[[str], None] = print, progress_for: Callable[[Path], ProgressFn | None] | None = None,
              client=None, claim_timeout_s: float = claims.DEFAULT_TIMEOUT_S) -> Outcomes:
    """Every input in turn; raises OutputFolderError when the folder is unusable before the first slide.

    When it becomes unusable later (a full disk), the batch stops with one line: the slide being written
    fails, leaving none of its files, and the inputs after it are "not run".
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    outcomes = Outcomes()
    for i, path in enumerate(inputs):
        t0 = time.perf_counter()
        try:
            outcome = process_input(path, out_dir, cfg, predictor, resume, echo, progress_for, client, claim_timeout_s)
        except OutputFolderError as exc:
            outcomes.append(Outcome(path, "failed", str(exc), seconds=time.perf_counter() - t0))
            return _stop(outcomes, inputs[i + 1 :], exc, out_dir, claim_timeout_s, echo)
        except OSError as exc:  # its claim or note could not be handled (a name too long, an NFS I/O error)
            outcome = Outcome(path, "failed", f"in {out_dir}: {problem(exc)}", seconds=time.perf_counter() - t0)
            echo(f"{path}: {outcome.detail}")
        outcomes.append(outcome)
        try:
            if outcome.status in ("done", "failed") or i == len(inputs) - 1:
                rebuild_summary(out_dir, claim_timeout_s, echo)
        except OutputFolderError as exc:
            return _stop(outcomes, inputs[i + 1 :], exc, out_dir, claim_timeout_s, echo)
    return outcomes


def summary_table(outcomes: list[Outcome]) -> str:
    width = max([len(str(o.path)) for o in outcomes] + [5])
    lines = [f"{'input':<{width}}  {'status':<7}  {'nuclei':>8}  {'seconds':>8}  detail"]
    for o in outcomes:
        nuclei = "" if o.nuclei is None else str(o.nuclei)
        detail = o.detail or ("; ".join(o.warnings) if o.warnings else "")
        lines.append(f"{str(o.path):<{width}}  {o.status:<7}  {nuclei:>8}  {o.seconds:>8.1f}  {detail}")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed", "claimed", "not run")}
    line = f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']} of {len(outcomes)} inputs"
    if counts["claimed"]:
        line += f"; {counts['claimed']} claimed by other processes"
    if counts["not run"]:
        line += f"; {counts['not run']} not run (batch stopped)"
    lines.append(line)
    return os.linesep.join(lines)
