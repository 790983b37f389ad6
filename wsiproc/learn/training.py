"""What training learns from: the paper recipe's knobs (`TrainConfig`) and annotated images at 0.5 µm/px
(`TrainingImage`).

Their targets are drawn by `targets`, augmented by `augment` and cut into batches by `sampling`; the loop
that trains on them is `trainer.fit`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from shapely.geometry.base import BaseGeometry

from ..detection.model import MODEL_MPP
from ..io.resample import map_coords, rescale_rgb
from .targets import rasterise_regions


@dataclass
class TrainConfig:
    """Every knob of a training run; recorded in the checkpoint folder and the model card."""

    block_px: int = 64
    batch_size: int = 16
    epochs: int = 2
    steps_per_epoch: int | None = None  # None: one block per annotated nucleus per epoch (the paper's epoch)
    learning_rate: float = 1e-4
    disk_radius_px: int = 4
    background_fraction: float = 0.25  # share of blocks at random positions (beyond the paper)
    hue_shift_mean: float = 0.1
    hue_shift_sd: float = 0.1  # the paper's N(0.1, 0.01) read as mean 0.1, variance 0.01
    noise_sd: float = 0.01
    dropout: float = 0.5
    freeze_vgg: bool = False
    seed: int = 0
    arch: str = "paper"  # a name from wsiproc.detection.architectures (when not starting from a model)


@dataclass
class TrainingImage:
    """One annotated image at the model's resolution: RGB uint8, its points in model pixels and, where only parts
    of it were annotated (QuPath points inside drawn regions), a mask of those parts."""

    name: str
    rgb: np.ndarray
    points_xy: np.ndarray  # (N, 2) x = column, y = row, pixel-index coordinates at 0.5 µm/px
    region_mask: np.ndarray | None = None  # (H, W) bool at 0.5 µm/px: True where annotated; None: everywhere

    @classmethod
    def from_level0(cls, name: str, rgb: np.ndarray, points_xy: np.ndarray, mpp: float,
                    regions: Sequence[BaseGeometry] | None = None) -> "TrainingImage":
        """Resample an image at `mpp`, its level-0 points and its annotated regions (shapely polygons in level-0
        pixels; None or empty: the whole image) to the model's 0.5 µm/px grid."""
        pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        small = rescale_rgb(np.asarray(rgb)[..., :3], mpp, MODEL_MPP)
        mask = rasterise_regions(regions, small.shape[:2], mpp / MODEL_MPP) if regions else None
        return cls(name, small, map_coords(pts, mpp, MODEL_MPP), mask)

    @property
    def annotated_px(self) -> int:
        """Pixels that teach (the regions, or the whole image)."""
        return int(self.region_mask.sum()) if self.region_mask is not None else self.rgb.shape[0] * self.rgb.shape[1]

