"""Annotated images for training: each image file paired with its annotations, read at level 0."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..evaluate.annotations import image_key
from ..io.slide import open_slide
from .training import TrainingImage


def annotation_key(path: Path, points: dict[str, np.ndarray]) -> str | None:
    """The name under which `points` holds the annotations of image `path` (its stem, or its image key), or None."""
    key = path.stem if path.stem in points else image_key(path)
    return key if key in points else None


def annotated_images(image_files: list[Path], points: dict[str, np.ndarray], mpp: float,
                     skipped: Callable[[Path], None] = lambda path: None) -> list[TrainingImage]:
    """Every image that has annotations, read whole at `mpp` µm/px; `skipped(path)` hears of those that have none."""
    samples = []
    for path in image_files:
        key = annotation_key(path, points)
        if key is None:
            skipped(path)
            continue
        slide = open_slide(path, mpp)
        w, h = slide.dimensions
        rgb = slide.read_level(0, 0, 0, w, h)
        slide.close()
        samples.append(TrainingImage.from_level0(key, rgb, points[key], mpp))
    return samples
