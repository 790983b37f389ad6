"""Annotations rasterised onto a pixel grid: nucleus disks (what is taught) and annotated regions (where).

`disk_targets` is the one disk renderer of every recipe: the paper's blocks and adapt's pseudo-labels draw
disks around points rounded to pixels, the domain crops around sub-pixel points; both are a flag, not a second
renderer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry


def disk_targets(shape_hw: tuple[int, int], points_xy: np.ndarray, radius_px: float, *, round_centres: bool,
                 drop_outside: bool) -> np.ndarray:
    """Bool mask of the pixels whose centre lies within `radius_px` of a point (the edge included).

    `round_centres`: each point is first moved to its nearest pixel (half to even), so every disk is the same
    digital shape (the paper's blocks: radius 4 px is 49 pixels); otherwise a disk follows its sub-pixel centre
    (the domain crops, whose points are moved by the resolution jitter). `drop_outside`: a point whose (rounded)
    centre lies outside the image draws nothing; otherwise the part of its disk inside the image is drawn (a
    nucleus just beyond a crop's edge still shows).
    """
    h, w = shape_hw
    target = np.zeros((h, w), dtype=bool)
    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    if round_centres:
        pts = np.round(pts)
    if drop_outside:
        pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)]
    if len(pts) == 0:
        return target
    r = int(np.ceil(radius_px)) + 1
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    cx, cy = np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)
    xx, yy = cx[:, None] + dx.ravel(), cy[:, None] + dy.ravel()  # candidate pixels around each point
    inside = (xx - pts[:, :1]) ** 2 + (yy - pts[:, 1:]) ** 2 <= radius_px**2
    inside &= (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
    target[yy[inside], xx[inside]] = True
    return target


def rasterise_regions(regions: Sequence[BaseGeometry], shape_hw: tuple[int, int], scale: float) -> np.ndarray:
    """Polygons in level-0 pixel-index coordinates as a mask on a grid `scale`× as coarse (holes left out).

    A coarse pixel is inside when its centre is: level-0 coordinate v sits at (v + 0.5) / scale - 0.5 on the coarse
    grid (edges aligned), and scikit-image's `polygon` fills the pixels whose centres lie inside."""
    from skimage.draw import polygon as fill  # lazy: scikit-image's submodules load slowly; only partly annotated images need it

    mask = np.zeros(shape_hw, dtype=bool)

    def pixels(coords) -> tuple[np.ndarray, np.ndarray]:
        xy = (np.asarray(coords)[:, :2] + 0.5) / scale - 0.5
        return fill(xy[:, 1], xy[:, 0], shape_hw)

    def polygons(geometry):
        """Every polygon of a (multi)polygon or of the collections `make_valid` returns; lines and points enclose nothing."""
        if isinstance(geometry, Polygon):
            yield geometry
        elif hasattr(geometry, "geoms"):
            for part in geometry.geoms:
                yield from polygons(part)

    for region in regions:
        for part in polygons(region):
            if part.is_empty:
                continue
            mask[pixels(part.exterior.coords)] = True
            for hole in part.interiors:
                mask[pixels(hole.coords)] = False
    return mask
