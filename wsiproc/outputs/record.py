"""The run record `<stem>.json`: what was run on which input with which model and parameters, what it found,
and how long it took. Written last, it marks a complete result (see `wsiproc.cohort.batch`).

What it found: "nuclei", and with nucleus types (`wsiproc.detection.classes`) "classes", each class' count and
density per mm² of tissue (`class_figures`); a record without classes has no "classes" key at all."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from ..io.files import atomic_write_text
from ..detection.model import MODEL_MPP
from ..detection.tiling import SlideSampler
from ..detection.tissue import tissue_mask

if TYPE_CHECKING:
    from ..detection.loop import SlideDetections
    from ..io.slide import Slide


@dataclass
class RunRecord:
    """The run record, field by field; `<stem>.json` holds `to_dict()` with sorted keys."""

    input: dict  # slide_summary + the input's fingerprint
    model: dict  # path, sha256, device, precision
    engine: dict  # engine_record
    parameters: dict  # RunConfig.to_dict
    mpp_used: float  # the level-0 pixel size the coordinates were converted with
    tiles: dict  # the grid and the tissue
    timings_s: dict
    stats: dict  # tile and halo sides, seams merged, failed tiles…
    warnings: list[str]
    nuclei: int = 0
    outputs: dict[str, str] = field(default_factory=dict)  # key → file name in the output folder
    wsiproc_version: str = __version__
    classes: dict | None = None  # class_figures; None (and no "classes" key in the file) without classes

    @classmethod
    def of(cls, slide: Slide, predictor, parameters: dict, result: SlideDetections, extra_input: dict | None = None) -> "RunRecord":
        """The record of one run; `parameters` is every run parameter (`RunConfig.to_dict()`, a layer above)."""
        record = cls(
            input={**slide_summary(slide), **(extra_input or {})},
            model={"path": str(predictor.model_path), "sha256": predictor.sha256, "device": predictor.device,
                   "precision": getattr(predictor, "precision", "float32"),
                   **({"colours_sha256": predictor.colours_sha256} if getattr(predictor, "colours_sha256", None) else {})},
            engine=engine_record(predictor),
            parameters=dict(parameters),
            mpp_used=slide.require_mpp(),
            tiles=dict(result.tiles), timings_s=dict(result.timings_s), stats=dict(result.figures),
            warnings=list(result.warnings), nuclei=len(result.detections),
        )
        counts = result.detections.class_counts()
        if counts is not None:
            record.classes = class_figures(counts, {"tiles": record.tiles, "mpp_used": record.mpp_used, "input": record.input})
        return record

    def to_dict(self) -> dict:
        record = asdict(self)
        if record["classes"] is None:
            del record["classes"]
        return record


def tissue_mm2(record: dict) -> float | None:
    """The tissue area of a run record's slide: the tissue mask's (8 µm grid, borders grown by 16 µm) share of
    the slide; None where the record does not say (no tissue mask, --no-tissue-mask)."""
    try:
        fraction = record["tiles"]["tissue_fraction"]
        mpp, info = record["mpp_used"], record["input"]
        return fraction * info["level0_width_px"] * mpp * info["level0_height_px"] * mpp / 1e6
    except (KeyError, TypeError):
        return None


def per_mm2(count: int | None, area_mm2: float | None) -> float | None:
    """Nuclei per mm² of tissue, one decimal; None where the count or the area is unknown (or the area is 0)."""
    return round(count / area_mm2, 1) if area_mm2 and count is not None else None


def class_figures(counts: dict[str, int], record: dict) -> dict:
    """The record's "classes": per class (`Detections.class_counts`, by most probable class) its nuclei and their
    density per mm² of the record's tissue (`tissue_mm2`, None where unknown), as "nuclei_per_mm2" is."""
    area = tissue_mm2(record)
    return {name: {"nuclei": int(n), "per_mm2": per_mm2(int(n), area)} for name, n in counts.items()}


def _json_default(value: Any) -> Any:
    """Let records carry numpy scalars/arrays and paths, which pipelines produce naturally."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"run record value of type {type(value).__name__} is not JSON serialisable")


def write_run_record(path: str | os.PathLike[str], record: dict) -> Path:
    """Pretty, key-sorted JSON so records of different runs diff cleanly."""
    text = json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def read_run_record(path: str | os.PathLike[str]) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


#: What of `Predictor.describe()` changes from one process to the next (start-up, cache hits): kept out of the
#: run record, whose content must depend only on the input, the model and the parameters.
_VOLATILE_ENGINE_KEYS = ("startup_s", "load_s", "cache", "cache_status")


def engine_record(predictor) -> dict:
    """The engine, precision and why, the CPU flags that mattered and the engine versions, for the run record."""
    if not hasattr(predictor, "describe"):
        return {}
    return {k: v for k, v in predictor.describe().items() if k not in _VOLATILE_ENGINE_KEYS}


def slide_summary(slide: Slide) -> dict:
    return {
        "path": str(slide.path),
        "reader": slide.reader,
        "vendor": slide.vendor,
        "level0_width_px": slide.dimensions[0],
        "level0_height_px": slide.dimensions[1],
        "levels": slide.level_count,
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
    }


def slide_info(slide: Slide) -> dict:
    """What `wsiproc info` shows: `slide_summary`, the pyramid, and the tissue fraction (None without a pixel size)."""
    info = slide_summary(slide)
    info["level_dimensions"] = [list(d) for d in slide.level_dimensions]
    info["level_downsamples"] = [round(d, 4) for d in slide.level_downsamples]
    info["tissue_fraction"] = (round(tissue_mask(SlideSampler.for_slide(slide, MODEL_MPP)).fraction, 4)
                               if slide.mpp is not None else None)
    return info
