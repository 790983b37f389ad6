"""Resampling between a slide's pixel grid and the model's 0.5 µm/px grid.

Coordinates follow the pixel-index convention used by every output: the centre of pixel (0, 0) is
(0.0, 0.0). Two grids with pixel sizes `a` and `b` µm share the top-left edge, so a pixel-index
coordinate `u` on grid `a` sits at `(u + 0.5) * a / b - 0.5` on grid `b`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def map_coords(u: np.ndarray | float, from_mpp: float, to_mpp: float) -> np.ndarray | float:
    """Map pixel-index coordinates between two grids that share their top-left edge."""
    return (np.asarray(u, dtype=np.float64) + 0.5) * (from_mpp / to_mpp) - 0.5


def rescale_rgb(rgb: np.ndarray, from_mpp: float, to_mpp: float) -> np.ndarray:
    """Resample a whole RGB uint8 image from `from_mpp` to `to_mpp` (bilinear with antialiasing)."""
    if abs(from_mpp - to_mpp) < 1e-9:
        return rgb
    h, w = rgb.shape[:2]
    out_w = max(1, int(round(w * from_mpp / to_mpp)))
    out_h = max(1, int(round(h * from_mpp / to_mpp)))
    box = (0.0, 0.0, out_w * to_mpp / from_mpp, out_h * to_mpp / from_mpp)
    # Rounding the output size can make the box end up to half an output pixel past the image's edge, which
    # Pillow refuses ("box can't exceed original image size"). Replicating the last row and column keeps the
    # grid exact (no rescaling of the box) and gives those edge pixels the edge's colour.
    pad_y, pad_x = max(0, int(np.ceil(box[3])) - h), max(0, int(np.ceil(box[2])) - w)
    src = np.pad(rgb[..., :3], ((0, pad_y), (0, pad_x), (0, 0)), mode="edge") if pad_y or pad_x else rgb[..., :3]
    img = Image.fromarray(np.ascontiguousarray(src))
    return np.asarray(img.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box))


def resample_box(rgb: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """Resample the continuous box (x0, y0, x1, y1) of `rgb` onto `size` = (w, h) output pixels.

    Tiles of one slide are cut by boxes on one common continuous grid, so every output pixel samples the
    same source position whichever tile it falls in: what makes tiled output equal untiled output.
    """
    img = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR, box=box))
