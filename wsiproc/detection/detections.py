"""The one record type that flows from post-processing to the outputs: detected nuclei of one image."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Nucleus centroids in level-0 pixel-index coordinates of the input (x = column, y = row).

    `confidence` is the maximum of the confidence map inside the nucleus' component; `area_um2` its area.
    """

    x_px: np.ndarray
    y_px: np.ndarray
    confidence: np.ndarray
    area_um2: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.x_px)
        for name in ("y_px", "confidence", "area_um2"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Detections.{name} has {len(getattr(self, name))} entries, x_px has {n}")

    def __len__(self) -> int:
        return len(self.x_px)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros(0), np.zeros(0), np.zeros(0, np.float32), np.zeros(0, np.float32))

    @classmethod
    def concat(cls, parts: list["Detections"]) -> "Detections":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.x_px for p in parts]).astype(np.float64),
            np.concatenate([p.y_px for p in parts]).astype(np.float64),
            np.concatenate([p.confidence for p in parts]).astype(np.float32),
            np.concatenate([p.area_um2 for p in parts]).astype(np.float32),
        )

    def take(self, index: np.ndarray) -> "Detections":
        return Detections(self.x_px[index], self.y_px[index], self.confidence[index], self.area_um2[index])

    @property
    def xy(self) -> np.ndarray:
        return np.stack([self.x_px, self.y_px], axis=1)
