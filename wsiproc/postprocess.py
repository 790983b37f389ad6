"""Confidence map → nuclei, as in the paper: threshold, 8-connected components, centre of mass."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Components:
    """Components of one confidence map, in that map's pixel-index coordinates."""

    y: np.ndarray
    x: np.ndarray
    confidence: np.ndarray  # max of the map inside the component
    area_px: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def find_nuclei(confidence: np.ndarray, threshold: float = 0.5) -> Components:
    """Components of `confidence > threshold` with their (unweighted) centre of mass."""
    mask = confidence > threshold
    labels, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if n == 0:
        empty = np.zeros(0)
        return Components(empty, empty, empty.astype(np.float32), empty)
    index = np.arange(1, n + 1)
    area = ndimage.sum_labels(np.ones_like(labels, dtype=np.float64), labels, index)
    rows, cols = np.indices(labels.shape, dtype=np.float64)
    y = ndimage.sum_labels(rows, labels, index) / area
    x = ndimage.sum_labels(cols, labels, index) / area
    peak = ndimage.maximum(confidence, labels, index).astype(np.float32)
    return Components(y, x, peak, area)
