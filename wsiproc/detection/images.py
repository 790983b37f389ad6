"""Detection on annotated images (crops, not slides) through the same `loop.detect` as a run.

Every accuracy figure of a model (held-out checks, int8 validation, `benchmarks/accuracy.py`) is computed from
these, so a score can never come from a code path a user's run does not take.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .detections import Detections
from .loop import detect
from ..io.slide import open_slide


def detections_of_images(images: Iterable, predictor, cfg) -> dict[str, Detections]:
    """`Detections` (centres, and class probabilities where the model has a class head and `cfg.classes`) of
    annotated images (anything with `name`, `path` and `mpp`: `datasets.AnnotatedImage`, `annotated.LabImage`)."""
    out = {}
    for im in images:
        with open_slide(im.path, mpp=im.mpp) as slide:
            out[im.name] = detect(slide, cfg, predictor).detections
    return out


def detect_images(images: Iterable, predictor, cfg) -> dict[str, np.ndarray]:
    """Nucleus centres (level-0 x, y) of annotated images, by image name."""
    return {name: det.xy for name, det in detections_of_images(images, predictor, cfg).items()}


__all__ = ["detect_images", "detections_of_images"]
