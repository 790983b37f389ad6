"""Per-slide colour alignment: a slide's tissue colours mapped onto the nearest of the model's training domains.

Why per slide and why only after `wsiproc adapt` switched it on (`benchmarks/colour_alignment.py`, the README's
adaptation section): a model that never saw a lab's colours gains from it (a colorectal-blind base: crc-dev
+0.022, CoNSeP +0.081; a breast-blind base: BRCA +0.015), but the shipped model loses up to 0.04 on labs it knows,
and colour distance alone cannot tell the two apart. `adapt`'s calibration can (the share of confident peaks,
`wsiproc.learn.calibrate`), so it writes `<model>.colours.json` beside an adapted model only for a cohort it
judged foreign, and every run of that model then aligns each slide on its own. Per slide, not per cohort folded
into the network: a transform folded into the weights moves every other lab too (measured: CoNSeP −0.058).

The transform is affine in RGB (whitening by the slide's tissue covariance, colouring by the domain's), measured
on a fixed random sample of 256² windows of the slide's tissue at the model's resolution (`slide_colour`),
so every tile of a slide gets the same transform (seams stay seamless), whatever the tile size, and a rerun gets
the same one (resume).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .model_files import ModelFiles
from .tiles import every_tile, iter_tile_batches, sample_tiles
from .tiling import TileGrid
from .tissue import tissue_mask
from ..io.files import atomic_write_text

if TYPE_CHECKING:
    from .tiling import SlideSampler
    from .tissue import TissueMask

#: A pixel is tissue for the colour statistics when its darkest channel is below this (of 255): not glass.
TISSUE_MIN_CHANNEL = 216
#: Fewer tissue pixels than this make colour moments meaningless: no alignment.
MIN_TISSUE_PIXELS = 1000


@dataclass
class ColourStats:
    """Running first and second moments of tissue RGB in [0, 1]: merged over tiles, slides, domains."""

    n: int = 0
    sum_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sum_outer: tuple[tuple[float, ...], ...] = ((0.0,) * 3,) * 3

    def add(self, rgb_uint8: np.ndarray, step: int = 2) -> "ColourStats":
        """Add the tissue pixels of an (h, w, 3) uint8 image, every `step`-th row and column."""
        px = np.asarray(rgb_uint8)[::step, ::step, :3].reshape(-1, 3)
        px = px[px.min(axis=1) < TISSUE_MIN_CHANNEL].astype(np.float64) / 255.0
        self.n += len(px)
        self.sum_rgb = tuple(np.asarray(self.sum_rgb) + px.sum(axis=0))
        self.sum_outer = tuple(map(tuple, np.asarray(self.sum_outer) + px.T @ px))
        return self

    def merged(self, other: "ColourStats") -> "ColourStats":
        """The moments of both pixel sets together."""
        return ColourStats(self.n + other.n, tuple(np.add(self.sum_rgb, other.sum_rgb)),
                           tuple(map(tuple, np.add(self.sum_outer, other.sum_outer))))

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.sum_rgb) / max(self.n, 1)

    @property
    def cov(self) -> np.ndarray:
        m = self.mean
        return np.asarray(self.sum_outer) / max(self.n, 1) - np.outer(m, m)


def sqrtm_spd(m: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Square root (or its inverse) of a symmetric positive definite matrix, through its eigenvectors."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    w = np.maximum(w, 1e-8)
    return (v * (w ** (-0.5 if inverse else 0.5))) @ v.T


def affine_onto(stats: ColourStats, mean_rgb, cov_rgb) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) with `A @ rgb + c` giving the tissue of `stats` the mean `mean_rgb` and covariance `cov_rgb`."""
    a = sqrtm_spd(np.asarray(cov_rgb)) @ sqrtm_spd(stats.cov, inverse=True)
    return a, np.asarray(mean_rgb) - a @ stats.mean


def wasserstein2(stats: ColourStats, mean_rgb, cov_rgb) -> float:
    """Distance between the Gaussians of two colour moment pairs (RGB in [0, 1])."""
    c1, c2 = stats.cov, np.asarray(cov_rgb)
    root = sqrtm_spd(c2)
    trace = np.trace(c1 + c2 - 2 * sqrtm_spd(root @ c1 @ root))
    return float(np.sqrt(np.sum((stats.mean - np.asarray(mean_rgb)) ** 2) + max(trace, 0.0)))


@dataclass(frozen=True)
class SlideColour:
    """One slide's colour transform: `a @ rgb + c` on RGB in [0, 1], towards training domain `domain`."""

    domain: str
    distance: float  # Wasserstein-2 distance of the slide's tissue moments to that domain's, before alignment
    a: tuple[tuple[float, ...], ...]
    c: tuple[float, ...]
    tissue_pixels: int

    def apply(self, tiles: np.ndarray) -> np.ndarray:
        """(…, 3) uint8 → the same shape, aligned, uint8 (as the model takes it)."""
        x = tiles.reshape(-1, 3).astype(np.float32) / 255.0
        y = x @ np.asarray(self.a, np.float32).T + np.asarray(self.c, np.float32)
        return (np.clip(y, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(tiles.shape)

    def to_dict(self) -> dict:
        return {"domain": self.domain, "distance": round(self.distance, 4), "tissue_pixels": self.tissue_pixels,
                "a": [[round(v, 6) for v in row] for row in self.a], "c": [round(v, 6) for v in self.c]}


@dataclass
class DomainColours:
    """The tissue colour moments of a model's training domains, and how a slide's own moments are sampled."""

    domains: dict[str, dict[str, list]]  # name → {"mean_rgb": [3], "cov_rgb": [3][3]}
    windows_per_slide: int = 8  # 256² tissue windows a slide's own moments are measured on (`slide_colour`)
    seed: int = 0
    source: str = ""

    @staticmethod
    def beside(model_path: str | Path) -> Path:
        """`<model>.colours.json` beside a `.keras` (also for its `<model>.int8.xml`): `ModelFiles.colours`."""
        return ModelFiles.of(model_path).colours

    @classmethod
    def load(cls, path: str | Path) -> "DomainColours":
        try:
            raw = json.loads(Path(path).read_text())
            out = cls(**raw)
            for name, moments in out.domains.items():
                if np.asarray(moments["mean_rgb"]).shape != (3,) or np.asarray(moments["cov_rgb"]).shape != (3, 3):
                    raise ValueError(f"domain {name!r}: mean_rgb must have 3 values and cov_rgb 3 × 3")
            if not out.domains:
                raise ValueError("no domains")
            return out
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: not a colour-alignment file (training domains' colour moments): {exc}") from exc

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), json.dumps(asdict(self), indent=1))

    def for_stats(self, stats: ColourStats) -> SlideColour | None:
        """The transform onto the nearest domain; None when the moments rest on too little tissue."""
        if stats.n < MIN_TISSUE_PIXELS:
            return None
        distance = {name: wasserstein2(stats, m["mean_rgb"], m["cov_rgb"]) for name, m in self.domains.items()}
        near = min(distance, key=distance.get)
        a, c = affine_onto(stats, self.domains[near]["mean_rgb"], self.domains[near]["cov_rgb"])
        return SlideColour(near, distance[near], tuple(map(tuple, a.tolist())), tuple(c.tolist()), stats.n)

    def for_tiles(self, images: Iterable[np.ndarray]) -> SlideColour | None:
        """The transform for a slide from images of its tissue (uint8, at the model's resolution)."""
        stats = ColourStats()
        for img in images:
            stats.add(img)
        return self.for_stats(stats)


#: Side of the windows a slide's colour moments are measured on (at the model's resolution).
COLOUR_WINDOW_PX = 256


def slide_colour(sampler: SlideSampler, colours: DomainColours, mask: TissueMask | None = None) -> SlideColour | None:
    """A slide's colour transform from `colours.windows_per_slide` windows of 256² px touching tissue, drawn with
    `colours.seed`. The windows do not depend on the tile size, the tissue-mask switch or the engine, so neither do
    the transform and the nuclei; and `wsiproc adapt` measures a slide with this same function. `mask`: the run's
    tissue mask, else one is made here (all windows where the slide has none to give)."""
    if mask is None:
        try:
            mask = tissue_mask(sampler)
        except Exception:  # an undecodable overview: the run says so already; every window may be drawn
            mask = None
    h, w = sampler.shape_hw()
    windows = TileGrid(h, w, COLOUR_WINDOW_PX, 0, 1)
    candidates = mask.tiles_touching(windows, sampler.mpp) if mask is not None else every_tile(windows)
    chosen = [candidates[i] for i in sample_tiles(len(candidates), colours.windows_per_slide, colours.seed)]
    # Each window as it lies in the image (no halo, clipped at its edges); an undecodable one is measured
    # without, strict or not (its tiles are reported by the run).
    reads = iter_tile_batches(sampler, windows, chosen, max(1, len(chosen)), strict=False, prefetch=0, with_halo=False)
    return colours.for_tiles([img for batch in reads for img in batch.images])
