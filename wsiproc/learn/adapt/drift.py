"""The cohort's own statistics as a check on fine-tuning: does the student find as many nuclei as its teacher?

Self-training inflates confidence: a student taught on its own confident nuclei reaches 0.5 on more candidates
than the teacher did, so on a lab the model already knew it finds look-alikes as nuclei (measured: −0.056 F1 on
crc-dev for the shipped model). The teacher's detection count on the cohort's sampled tiles is the cohort's
density as calibration left it; `match_density` folds the threshold at which the student finds that same number
into the student's last bias, so fine-tuning may change *which* nuclei are found, not how many. The tiles are the
ones calibration sampled (the same seeds), read with the slide colours a run of the model applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ...config import RunConfig
from ...detection.colour import SlideColour
from ...detection.inference import Predictor
from ...detection.model import load_model, save_model
from ...errors import one_line
from ..calibrate import PEAK_FLOOR, THRESHOLD_BOUNDS, fold_threshold
from .calibration import _slide_colour_of
from .config import AdaptConfig
from .mining import _peaks_of_tiles, tile_seed


@dataclass(frozen=True)
class DensityCheck:
    """Detections on the cohort's sampled tiles: the teacher's, the student's before and after the folded threshold."""

    tiles: int
    teacher_detections: int
    student_detections: int  # at 0.5, straight from fine-tuning
    threshold: float  # folded into the student (0.5: nothing folded)
    adapted_detections: int  # at the folded threshold

    @property
    def student_ratio(self) -> float:
        """Student / teacher detections before the fold: above 1 the student over-detects."""
        return self.student_detections / max(1, self.teacher_detections)


def cohort_peaks(slides: list[tuple[Path, int, SlideColour | None]], run_cfg: RunConfig, predictor: Predictor,
                 cfg: AdaptConfig) -> tuple[np.ndarray, int]:
    """Candidate peak confidences (>= PEAK_FLOOR) on the sampled tiles of each (slide, tile seed, its colour
    transform as a run of the model aligns it), and the number of tiles."""
    peaks, tiles = [np.zeros(0, np.float32)], 0
    for path, seed, colour in slides:
        p, n = _peaks_of_tiles(path, run_cfg, predictor, cfg.calibration_tiles, seed, aligned=colour)
        peaks.append(p)
        tiles += n
    return np.concatenate(peaks), tiles


def density_threshold(student_peaks: np.ndarray, wanted: int) -> float:
    """The threshold at which `wanted` of the student's candidate peaks reach it (within THRESHOLD_BOUNDS)."""
    peaks = np.asarray(student_peaks, np.float64)
    peaks = np.sort(peaks[peaks >= PEAK_FLOOR])[::-1]
    if wanted <= 0 or len(peaks) == 0:
        return 0.5
    if wanted >= len(peaks):
        return float(THRESHOLD_BOUNDS[0])
    t = float((peaks[wanted - 1] + peaks[wanted]) / 2)  # between the last kept and the first left out
    return float(np.clip(t, *THRESHOLD_BOUNDS))


def match_density(inputs: list[Path], run_cfg: RunConfig, teacher: Predictor, student_path: Path, cfg: AdaptConfig,
                  echo: Callable[[str], None] = print) -> DensityCheck:
    """Fold into the fine-tuned model at `student_path` the threshold that gives the teacher's detection count on
    the cohort's sampled tiles; the model file is rewritten in place."""
    slides = []  # calibration's tiles; the student aligns as its teacher does (the same colours file beside it)
    for i, path in enumerate(inputs):
        try:
            slides.append((path, tile_seed(cfg, i), _slide_colour_of(path, run_cfg, teacher.colours) if teacher.colours is not None else None))
        except Exception as exc:  # named once by mining already; the check goes on without the slide
            echo(one_line(exc, path))
    teacher_peaks, tiles = cohort_peaks(slides, run_cfg, teacher, cfg)
    student = Predictor(student_path, precision=run_cfg.precision, engine=run_cfg.engine)
    student_peaks, _ = cohort_peaks(slides, run_cfg, student, cfg)
    wanted = int((teacher_peaks >= 0.5).sum())
    before = int((student_peaks >= 0.5).sum())
    threshold = round(density_threshold(student_peaks, wanted), 4) if before != wanted else 0.5
    if threshold != 0.5:
        model = load_model(student_path)
        fold_threshold(model, threshold)
        save_model(model, student_path)
    check = DensityCheck(tiles, wanted, before, threshold, int((student_peaks >= threshold).sum()))
    echo(f"cohort density: the teacher finds {wanted} nuclei on {tiles} sampled tiles, the fine-tuned model {before} "
         f"({check.student_ratio:.2f}x) -> threshold {threshold:.2f} folded ({check.adapted_detections} nuclei)")
    return check
