"""The slide at the model's resolution as lazy dask arrays, cut into tiles that carry a halo.

Every pixel of the 0.5 µm/px grid is sampled from one common continuous mapping of the slide, whichever
tile asks for it, so neighbouring tiles agree on their overlap. Tiles are read from the pyramid level
nearest above the target resolution and resampled there. Outside the slide is white, as on glass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .model import SIZE_MULTIPLE_PX
from ..io.resample import resample_box
from ..io.slide import Slide, cached_slide

if TYPE_CHECKING:
    import dask.array as da


@dataclass(frozen=True)
class TileGrid:
    """Square tile cores of `tile_px` covering a `height_px` × `width_px` image, each read with `halo_px` around it."""

    height_px: int
    width_px: int
    tile_px: int
    halo_px: int
    #: Input sides must be multiples of this (the model's poolings); tile and halo too, so every tile starts on
    #: the same pooling phase as the untiled image and the output does not depend on the tiling.
    multiple_px: int = SIZE_MULTIPLE_PX

    def __post_init__(self) -> None:
        for name in ("tile_px", "halo_px"):
            if getattr(self, name) % self.multiple_px or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative multiple of {self.multiple_px}, got {getattr(self, name)}")
        if self.tile_px == 0:
            raise ValueError("tile_px must be positive")

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.height_px / self.tile_px))

    @property
    def cols(self) -> int:
        return max(1, math.ceil(self.width_px / self.tile_px))

    @property
    def block_px(self) -> int:
        """Side of a tile with its halo: what the model sees."""
        return self.tile_px + 2 * self.halo_px

    def core(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of a tile's core, clipped to the image."""
        y0, x0 = row * self.tile_px, col * self.tile_px
        return y0, x0, min(y0 + self.tile_px, self.height_px), min(x0 + self.tile_px, self.width_px)

    def __len__(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class SlideSampler:
    """Reads any box of the slide's `mpp` grid. Picklable (path, not handle), so dask workers can use it."""

    path: str
    mpp_override: float | None
    mpp: float

    @classmethod
    def for_slide(cls, slide: Slide, mpp: float) -> "SlideSampler":
        slide.require_mpp()
        override = slide.mpp if slide.mpp_source == "--mpp" else None
        return cls(str(slide.path), override, mpp)

    @property
    def slide(self) -> Slide:
        return cached_slide(self.path, self.mpp_override)

    def shape_hw(self) -> tuple[int, int]:
        w0, h0 = self.slide.dimensions
        f = self.slide.require_mpp() / self.mpp
        return max(1, int(round(h0 * f))), max(1, int(round(w0 * f)))

    def read(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """RGB uint8 of the box [y0, y0+height) × [x0, x0+width) on the target grid (may extend outside)."""
        slide = self.slide
        level = slide.best_level_for_mpp(self.mpp)
        level_mpp = slide.require_mpp() * slide.level_downsamples[level]
        f = self.mpp / level_mpp  # level pixels per target pixel
        bx0, by0, bx1, by1 = x0 * f, y0 * f, (x0 + width) * f, (y0 + height) * f
        if abs(f - 1.0) < 1e-9:
            return slide.read_level(level, x0, y0, width, height)
        margin = int(math.ceil(max(f, 1.0))) + 2  # the bilinear filter's support when reducing by f
        ix0, iy0 = int(math.floor(bx0)) - margin, int(math.floor(by0)) - margin
        ix1, iy1 = int(math.ceil(bx1)) + margin, int(math.ceil(by1)) + margin
        region = slide.read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        return resample_box(region, (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0), (width, height))

    def region(self, y0: int, x0: int, height: int, width: int) -> "RegionSampler":
        """The box [y0, y0+height) × [x0, x0+width) of this grid as an image of its own (`RegionSampler`)."""
        return RegionSampler(self, y0, x0, height, width)


@dataclass(frozen=True)
class RegionSampler:
    """A box of a `SlideSampler`'s grid seen as an image of its own (its top-left pixel is (0, 0)): what
    `loop.detect_region` tiles, so one region is detected by the code of a run. Reads beyond the box see the
    slide's own pixels, as a tile's halo inside a slide does. It has no tissue mask of its own (`tissue_mask`
    reads the whole slide): the caller chose the box. Picklable, as its slide sampler."""

    slide_sampler: SlideSampler
    y0_px: int
    x0_px: int
    height_px: int
    width_px: int

    @property
    def path(self) -> str:
        return self.slide_sampler.path

    @property
    def mpp(self) -> float:
        return self.slide_sampler.mpp

    def shape_hw(self) -> tuple[int, int]:
        return self.height_px, self.width_px

    def read(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """RGB uint8 of the box [y0, y0+height) × [x0, x0+width) of the region (may extend beyond it)."""
        return self.slide_sampler.read(self.y0_px + y0, self.x0_px + x0, height, width)


def slide_array(sampler: SlideSampler, chunk_px: int = 512) -> da.Array:
    """The whole slide on the target grid as a lazy (height, width, 3) uint8 dask array."""
    h, w = sampler.shape_hw()

    def block(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        return sampler.read(y0, x0, y1 - y0, x1 - x0)

    import dask.array as da  # lazy: `wsiproc info` and the samplers need no dask

    return da.map_blocks(block, chunks=(_splits(h, chunk_px), _splits(w, chunk_px), (3,)), dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))


def halo_tiles(sampler: SlideSampler | RegionSampler, grid: TileGrid) -> da.Array:
    """Tiles with their halos, block (r, c) being tile (r, c) padded to `grid.block_px` (white outside).

    Laid out as dask's own overlap does (block after block), so `.blocks[r, c]` is one model input.
    """
    b = grid.block_px

    def block(block_info=None):
        r, c, _ = block_info[None]["chunk-location"]
        return sampler.read(r * grid.tile_px - grid.halo_px, c * grid.tile_px - grid.halo_px, b, b)

    import dask.array as da  # lazy: `wsiproc info` and the samplers need no dask

    return da.map_blocks(block, chunks=((b,) * grid.rows, (b,) * grid.cols, (3,)), dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))


def _splits(total: int, step: int) -> tuple[int, ...]:
    sizes = [step] * (total // step)
    if total % step:
        sizes.append(total % step)
    return tuple(sizes) or (total,)
