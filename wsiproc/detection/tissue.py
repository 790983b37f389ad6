"""Where the tissue is: a low-resolution mask that decides which tiles are worth sending to the model.

Saturation separates stained tissue from glass in brightfield H&E; an Otsu threshold on it adapts to
the slide, and clamping that threshold keeps slides that are all tissue (or nearly all glass) sane.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .tiling import SlideSampler, TileGrid

#: Pixel size of the mask: coarse enough to be cheap on any slide, fine enough for 256 µm tiles.
MASK_MPP = 8.0
#: Source pixels decoded at once for the mask: bounds memory on slides without a pyramid.
READ_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TissueMask:
    mask: np.ndarray  # bool (h, w) on a grid of `mpp`
    mpp: float
    saturation_threshold: float
    median_brightness: float  # median of max(R, G, B) over the slide, 0–255

    @property
    def looks_brightfield(self) -> bool:
        """Brightfield slides are mostly bright (glass, pale stain); fluorescence is mostly dark."""
        return self.median_brightness >= 100

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def tiles_touching(self, grid: TileGrid, grid_mpp: float) -> list[tuple[int, int]]:
        """(row, col) of every tile whose core (grown by its halo) overlaps tissue."""
        f = grid_mpp / self.mpp
        h, w = self.mask.shape
        # Integral image: any-tissue test per tile in O(1).
        integral = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        out = []
        for r in range(grid.rows):
            for c in range(grid.cols):
                y0, x0, y1, x1 = grid.core(r, c)
                my0 = int(np.clip(np.floor((y0 - grid.halo_px) * f), 0, h))
                mx0 = int(np.clip(np.floor((x0 - grid.halo_px) * f), 0, w))
                my1 = int(np.clip(np.ceil((y1 + grid.halo_px) * f), 0, h))
                mx1 = int(np.clip(np.ceil((x1 + grid.halo_px) * f), 0, w))
                if my1 > my0 and mx1 > mx0:
                    total = integral[my1, mx1] - integral[my0, mx1] - integral[my1, mx0] + integral[my0, mx0]
                    if total > 0:
                        out.append((r, c))
        return out


def saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)


def tissue_mask(sampler: SlideSampler, mask_mpp: float = MASK_MPP, min_threshold: float = 0.04, max_threshold: float = 0.15) -> TissueMask:
    """Tissue mask of the whole slide at `mask_mpp` (finer for small images, so they keep a few pixels)."""
    h_t, w_t = sampler.shape_hw()
    mpp = min(mask_mpp, max(sampler.mpp, sampler.mpp * max(h_t, w_t) / 256))
    low = SlideSampler(sampler.path, sampler.mpp_override, mpp)
    h, w = low.shape_hw()
    # Read in strips: a slide without a pyramid would otherwise be decoded whole at level 0.
    slide = low.slide
    level_mpp = slide.require_mpp() * slide.level_downsamples[slide.best_level_for_mpp(mpp)]
    f = mpp / level_mpp
    strip_h = max(1, int(READ_BUDGET_BYTES / (3 * f * f * w)))
    rgb = np.concatenate([low.read(y, 0, min(strip_h, h - y), w) for y in range(0, h, strip_h)], axis=0)
    sat = saturation(rgb)
    value = rgb.max(axis=2)
    from skimage.filters import threshold_otsu  # lazy: about a second to import; only this step needs it

    candidates = sat[value > 30]  # ignore black scan padding
    otsu = float(threshold_otsu(candidates)) if candidates.size and np.ptp(candidates) > 0 else max_threshold
    threshold = float(np.clip(otsu, min_threshold, max_threshold))
    mask = (sat > threshold) & (value > 30)
    mask = ndimage.binary_opening(mask, structure=np.ones((2, 2)))
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    mask = ndimage.binary_dilation(mask, iterations=2)  # keep nuclei at tissue borders
    return TissueMask(mask, mpp, threshold, float(np.median(value)))
