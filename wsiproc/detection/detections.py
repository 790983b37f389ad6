"""The one record type that flows from post-processing to the outputs: detected nuclei of one image."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .classes import CLASSES, class_names


@dataclass(frozen=True)
class Detections:
    """Nucleus centroids in level-0 pixel-index coordinates of the input (x = column, y = row).

    `confidence` is the maximum of the confidence map inside the nucleus' component; `area_um2` its area.
    `class_probs` is (N, len(CLASSES)) probabilities of the nucleus types of `wsiproc.detection.classes` when
    the model has a class head and classes are on, else None (and no output mentions classes).
    """

    x_px: np.ndarray
    y_px: np.ndarray
    confidence: np.ndarray
    area_um2: np.ndarray
    class_probs: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.x_px)
        for name in ("y_px", "confidence", "area_um2"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Detections.{name} has {len(getattr(self, name))} entries, x_px has {n}")
        if self.class_probs is not None and (self.class_probs.ndim != 2 or len(self.class_probs) != n
                                             or self.class_probs.shape[1] != len(CLASSES)):
            raise ValueError(f"Detections.class_probs has shape {self.class_probs.shape}, expected ({n}, {len(CLASSES)})")

    @property
    def classes(self) -> np.ndarray | None:
        """Each nucleus' most probable class name (`CLASSES`), or None without classes."""
        return None if self.class_probs is None else class_names(self.class_probs)

    def class_counts(self) -> dict[str, int] | None:
        """Nuclei per class (every class present, zeros included), or None without classes."""
        if self.class_probs is None:
            return None
        winners = np.argmax(self.class_probs, axis=1) if len(self) else np.zeros(0, np.int64)
        counts = np.bincount(winners, minlength=len(CLASSES))
        return {name: int(c) for name, c in zip(CLASSES, counts)}

    def without_classes(self) -> "Detections":
        return Detections(self.x_px, self.y_px, self.confidence, self.area_um2)

    def __len__(self) -> int:
        return len(self.x_px)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros(0), np.zeros(0), np.zeros(0, np.float32), np.zeros(0, np.float32))

    @classmethod
    def concat(cls, parts: list["Detections"]) -> "Detections":
        with_classes = bool(parts) and all(p.class_probs is not None for p in parts)
        parts = [p for p in parts if len(p)]
        if not parts:
            empty = cls.empty()
            return Detections(*(getattr(empty, n) for n in ("x_px", "y_px", "confidence", "area_um2")),
                              np.zeros((0, len(CLASSES)), np.float32)) if with_classes else empty
        return cls(
            np.concatenate([p.x_px for p in parts]).astype(np.float64),
            np.concatenate([p.y_px for p in parts]).astype(np.float64),
            np.concatenate([p.confidence for p in parts]).astype(np.float32),
            np.concatenate([p.area_um2 for p in parts]).astype(np.float32),
            np.concatenate([p.class_probs for p in parts]).astype(np.float32) if with_classes else None,
        )

    def take(self, index: np.ndarray) -> "Detections":
        probs = None if self.class_probs is None else self.class_probs[index]
        return Detections(self.x_px[index], self.y_px[index], self.confidence[index], self.area_um2[index], probs)

    @property
    def xy(self) -> np.ndarray:
        return np.stack([self.x_px, self.y_px], axis=1)
