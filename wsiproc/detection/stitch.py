"""Tile results → one set of nuclei for the slide: each tile owns its core, seams are deduplicated.

A nucleus is reported by the tile whose core holds its centroid; the halo only gives the model context.
Components are seen whole as long as they are smaller than the halo, so neighbouring tiles agree; the
final merge of detections from different tiles closer than `merge_radius_px` catches the rare rest.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .postprocess import Components
from .tiling import TileGrid


def owned(y: np.ndarray, x: np.ndarray, core: tuple[int, int, int, int]) -> np.ndarray:
    """Which centroids (pixel-index coordinates) a tile with this (y0, x0, y1, x1) core owns: the one rule that
    stitching, adaptation's mining and explain share, so every nucleus is counted by exactly one tile.

    Pixel i spans [i − 0.5, i + 0.5); a centroid on a boundary belongs to the tile below / to the right."""
    y0, x0, y1, x1 = core
    return (y >= y0 - 0.5) & (y < y1 - 0.5) & (x >= x0 - 0.5) & (x < x1 - 0.5)


def keep_core(components: Components, grid: TileGrid, row: int, col: int) -> tuple[np.ndarray, ...]:
    """(y, x, confidence, area_px, class_probs or None) of the components whose centroid lies in the tile's
    core, in image pixels."""
    y0, x0, _, _ = core = grid.core(row, col)
    y = components.y + (y0 - grid.halo_px)
    x = components.x + (x0 - grid.halo_px)
    inside = owned(y, x, core)
    probs = None if components.class_probs is None else components.class_probs[inside]
    return y[inside], x[inside], components.confidence[inside], components.area_px[inside], probs


def merge_across_tiles(y: np.ndarray, x: np.ndarray, confidence: np.ndarray, tile_id: np.ndarray, merge_radius_px: float) -> np.ndarray:
    """Indices to keep: of two detections from different tiles closer than the radius, the more confident."""
    if len(x) < 2 or merge_radius_px <= 0:
        return np.arange(len(x))
    pairs = cKDTree(np.stack([x, y], axis=1)).query_pairs(merge_radius_px, output_type="ndarray")
    if len(pairs) == 0:
        return np.arange(len(x))
    pairs = pairs[tile_id[pairs[:, 0]] != tile_id[pairs[:, 1]]]
    drop = np.zeros(len(x), dtype=bool)
    # Most confident first, so a chain keeps its best member.
    order = np.argsort(-np.minimum(confidence[pairs[:, 0]], confidence[pairs[:, 1]]), kind="stable")
    for a, b in pairs[order]:
        if drop[a] or drop[b]:
            continue
        weaker = b if (confidence[a], -a) >= (confidence[b], -b) else a
        drop[weaker] = True
    return np.flatnonzero(~drop)
