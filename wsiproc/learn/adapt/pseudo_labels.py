"""Pseudo-labels from confidence maps: the paper's rule, the consistency rule, and the block targets drawn from them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ...detection.postprocess import Postprocess, find_nuclei
from ..targets import disk_targets
from .config import AdaptConfig

#: Block target values in the store: background, nucleus, and "unsure" (weight 0 in the loss).
BACKGROUND, NUCLEUS, UNSURE = 0, 1, 2


@dataclass
class PseudoLabels:
    """One tile's pseudo-labels, in its pixel-index coordinates (x = column, y = row)."""

    hard_xy: np.ndarray  # (n, 2) block centres: confident nuclei
    nuclei_xy: np.ndarray  # (m, 2) drawn as disks into every block's target
    unsure_xy: np.ndarray  # (k, 2) disks of weight 0: neither nucleus nor background


def paper_labels(conf: np.ndarray, cfg: AdaptConfig) -> PseudoLabels:
    """The paper's rule on one map: hard positives above `high`, targets above `low` (components)."""
    hard, low = find_nuclei(conf, cfg.high), find_nuclei(conf, cfg.low)
    return PseudoLabels(np.stack([hard.x, hard.y], 1), np.stack([low.x, low.y], 1), np.zeros((0, 2)))


def consistent_labels(maps: np.ndarray, cfg: AdaptConfig, post: Postprocess) -> PseudoLabels:
    """Consistency over confidence: pseudo-nuclei are peaks of the views' mean map that every view also finds.

    A view "finds" a candidate when its own map exceeds `low` within one pixel of the candidate's peak.
    """
    mean = maps.mean(axis=0)
    found = dataclasses.replace(post, threshold=cfg.ignore_below)(mean)
    xy = np.stack([found.x, found.y], 1)
    if len(found) == 0:
        return PseudoLabels(xy, xy, xy)
    near = ndimage.maximum_filter(maps, size=(1, 3, 3), mode="nearest")  # within one pixel of the peak
    rows = np.clip(np.round(found.y).astype(int), 0, mean.shape[0] - 1)
    cols = np.clip(np.round(found.x).astype(int), 0, mean.shape[1] - 1)
    agree = (near[:, rows, cols] > cfg.low).all(axis=0)
    nucleus = agree & (found.confidence >= cfg.low)
    hard = nucleus & (found.confidence >= cfg.high)
    return PseudoLabels(xy[hard], xy[nucleus], xy[~nucleus])


def block_targets(shape_hw: tuple[int, int], labels: PseudoLabels, radius_px: int) -> np.ndarray:
    """uint8 target of a block: NUCLEUS disks, UNSURE disks (one pixel wider) where no nucleus is, else BACKGROUND."""
    target = np.full(shape_hw, BACKGROUND, np.uint8)
    if len(labels.unsure_xy):
        target[disk_targets(shape_hw, labels.unsure_xy, radius_px + 1, round_centres=True, drop_outside=True)] = UNSURE
    target[disk_targets(shape_hw, labels.nuclei_xy, radius_px, round_centres=True, drop_outside=True)] = NUCLEUS
    return target
