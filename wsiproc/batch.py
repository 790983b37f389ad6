"""Many inputs, one at a time: each succeeds or fails on its own, finished ones are not redone.

A result counts as finished when its run record (`<stem>.json`, written last) names the same input file
(size and modification time), the same model (sha256) and the same output-affecting parameters, and
every output it lists is on disk. Anything else is processed again from scratch.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import RunConfig
from .errors import problem
from .inference import Predictor
from .pipeline import ProgressFn, run_slide

#: Parameters that change what a run writes; the others (workers, batch size, strictness) do not.
OUTPUT_PARAMETERS = ("model_mpp", "mpp", "tile_px", "halo_px", "threshold", "merge_radius_um", "tissue_mask",
                     "density_cell_um", "geojson_gz", "precision")


@dataclass
class Outcome:
    path: Path
    status: str  # "done", "skipped" (already complete) or "failed"
    detail: str = ""
    nuclei: int | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def input_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_complete(out_dir: Path, stem: str, path: Path, cfg: RunConfig, model_sha256: str) -> bool:
    record_path = out_dir / f"{stem}.json"
    try:
        record = json.loads(record_path.read_text())
        same_input = record["input"]["fingerprint"] == input_fingerprint(path)
        same_model = record["model"]["sha256"] == model_sha256
        params = cfg.to_dict()
        same_params = all(record["parameters"].get(k) == params[k] for k in OUTPUT_PARAMETERS)
        outputs_there = all((out_dir / name).is_file() for name in record["outputs"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return same_input and same_model and same_params and outputs_there


def remove_leftovers(out_dir: Path, stem: str) -> None:
    """Temporary files of an interrupted earlier run of this input (atomic writes never finished)."""
    for leftover in out_dir.glob(f".{stem}*.partial"):
        leftover.unlink(missing_ok=True)


def run_batch(inputs: list[Path], out_dir: Path, cfg: RunConfig, predictor: Predictor, resume: bool = True,
              echo: Callable[[str], None] = print, progress_for: Callable[[Path], ProgressFn | None] | None = None,
              client=None) -> list[Outcome]:
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for path in inputs:
        stem = path.stem
        remove_leftovers(out_dir, stem)
        if resume and path.is_file() and is_complete(out_dir, stem, path, cfg, predictor.sha256):
            outcomes.append(Outcome(path, "skipped", "outputs complete for this model and parameters"))
            echo(f"{path}: already done (outputs complete for this model and parameters); skipped")
            continue
        t0 = time.perf_counter()
        try:
            # A missing file has no fingerprint: open_slide then names the problem ("file not found").
            record = run_slide(path, out_dir, cfg, predictor, stem=stem,
                               progress=progress_for(path) if progress_for else None,
                               extra_input={"fingerprint": input_fingerprint(path)} if path.exists() else None, client=client)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one bad input must not stop the batch
            message = problem(exc, path)
            outcomes.append(Outcome(path, "failed", message, seconds=time.perf_counter() - t0))
            echo(f"{path}: {message}")
            continue
        outcome = Outcome(path, "done", "", record["nuclei"], time.perf_counter() - t0, record.get("warnings", []))
        outcomes.append(outcome)
        for warning in outcome.warnings:
            echo(f"{path}: warning: {warning}")
    return outcomes


def summary_table(outcomes: list[Outcome]) -> str:
    width = max([len(str(o.path)) for o in outcomes] + [5])
    lines = [f"{'input':<{width}}  {'status':<7}  {'nuclei':>8}  {'seconds':>8}  detail"]
    for o in outcomes:
        nuclei = "" if o.nuclei is None else str(o.nuclei)
        detail = o.detail or ("; ".join(o.warnings) if o.warnings else "")
        lines.append(f"{str(o.path):<{width}}  {o.status:<7}  {nuclei:>8}  {o.seconds:>8.1f}  {detail}")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    lines.append(f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']} of {len(outcomes)} inputs")
    return os.linesep.join(lines)
