"""A quality-control picture per slide: is the tissue found, where are the nuclei, do the points sit on nuclei?

Numbers in a CSV cannot show that a run went wrong in a way the counts hide (the tissue mask missed a
fragment, the detector fires on pen marks, the points are shifted by a wrong µm/px). One glance at
`<stem>_qc.png` can: (a) the thumbnail with the tissue outline, (b) the density heat map, (c) a zoomed crop
of the densest cell's neighbourhood at near-model resolution with every detected centroid circled; with nucleus
types (`Detections.class_probs`) each circle has its class' colour (`CLASS_COLOURS_HEX`) and a legend names the
classes with their counts.

All three panels are drawn in slide micrometres (top-left edge of the slide at 0), so thumbnail, mask,
density grid and crop line up whatever their own pixel sizes are.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..detection.classes import CLASS_COLOURS_HEX, CLASSES
from ..detection.detections import Detections
from ..io.files import atomic_path
from ..detection.tiling import SlideSampler
from ..detection.tissue import TissueMask

__all__ = ["QCCrop", "qc_crop", "write_qc_png"]

#: Longer side of the thumbnail: enough to see the tissue, cheap to read from any pyramid.
THUMB_MAX_SIDE_PX = 600
#: Side of the zoomed crop: a few hundred nuclei, each still several pixels wide at `CROP_MPP`.
CROP_UM = 200.0
#: The model's resolution, so the crop shows what the network saw.
CROP_MPP = 0.5
#: The crop is never read larger than this (a huge density cell is shown at a coarser pixel size).
CROP_MAX_SIDE_PX = 600
#: Radius of the circles drawn around centroids: about a nucleus, so the nucleus shows inside the ring.
MARKER_RADIUS_UM = 3.5
MARKER_COLOR = "#00e5ff"  # cyan: complementary to H&E's pink and purple


@dataclass(frozen=True)
class QCCrop:
    """The zoomed region of the QC panel, in slide micrometres (edges, top-left of the slide at 0).

    `cell_rc` is the density cell it is centred on (the densest one; None when no nucleus was found and
    the crop falls back to the centre of the tissue).
    """

    x0_um: float
    y0_um: float
    x1_um: float
    y1_um: float
    cell_rc: tuple[int, int] | None

    @property
    def width_um(self) -> float:
        return self.x1_um - self.x0_um

    @property
    def height_um(self) -> float:
        return self.y1_um - self.y0_um

    def contains(self, x_um: np.ndarray | float, y_um: np.ndarray | float) -> np.ndarray:
        """Which points (slide µm) lie inside the crop."""
        x, y = np.asarray(x_um), np.asarray(y_um)
        return (x >= self.x0_um) & (x < self.x1_um) & (y >= self.y0_um) & (y < self.y1_um)


def qc_crop(density: np.ndarray, cell_um: float, slide_size_um: tuple[float, float], mask: TissueMask | None = None,
            crop_um: float = CROP_UM) -> QCCrop:
    """Where to zoom: a square around the densest density cell, kept inside the slide.

    The square is at least 1.5 cells wide so the whole densest cell shows with some context; it shrinks to
    the slide on slides smaller than it. `slide_size_um` is (height, width). Without any nucleus the crop
    centres on the tissue (the mask's centre of mass), else on the slide.
    """
    h_um, w_um = slide_size_um
    d = np.asarray(density)
    side = max(crop_um, 1.5 * cell_um)
    if d.size and float(d.max()) > 0:
        r, c = (int(i) for i in np.unravel_index(int(np.argmax(d)), d.shape))
        cell = (r, c)
        # Centre of the part of the cell inside the slide (the last row/column of cells may stick out).
        cy = (r * cell_um + min((r + 1) * cell_um, h_um)) / 2
        cx = (c * cell_um + min((c + 1) * cell_um, w_um)) / 2
    else:
        cell = None
        if mask is not None and mask.mask.any():
            ys, xs = np.nonzero(mask.mask)
            cy, cx = (float(ys.mean()) + 0.5) * mask.mpp, (float(xs.mean()) + 0.5) * mask.mpp
        else:
            cy, cx = h_um / 2, w_um / 2
    ch, cw = min(side, h_um), min(side, w_um)
    y0 = float(np.clip(cy - ch / 2, 0.0, h_um - ch))
    x0 = float(np.clip(cx - cw / 2, 0.0, w_um - cw))
    return QCCrop(x0, y0, x0 + cw, y0 + ch, cell)


def _read_or_gray(sampler: SlideSampler, y0: int, x0: int, height: int, width: int, block_px: int = 128) -> np.ndarray:
    """`sampler.read`, except that parts which cannot be decoded come out mid-gray.

    A corrupt tile is skipped and reported by the detection; the picture must not fail the slide over it.
    """
    try:
        return sampler.read(y0, x0, height, width)
    except Exception:
        rgb = np.full((height, width, 3), 128, np.uint8)
        for y in range(0, height, block_px):
            for x in range(0, width, block_px):
                h, w = min(block_px, height - y), min(block_px, width - x)
                try:
                    rgb[y : y + h, x : x + w] = sampler.read(y0 + y, x0 + x, h, w)
                except Exception:
                    pass  # stays gray
        return rgb


@dataclass(frozen=True)
class QcSlide:
    """What the QC picture needs of the slide itself, beyond the detections and density every output shares."""

    sampler: SlideSampler
    mask: TissueMask | None


def write_qc_png(
    path: str | os.PathLike[str],
    sampler: SlideSampler,
    mask: TissueMask | None,
    det: Detections,
    density: np.ndarray,
    level0_mpp: float,
    cell_um: float,
    max_side_px: int = 1200,
) -> Path:
    """Write the QC panel of one slide to `path` (by convention `<out>/<stem>_qc.png`), atomically.

    `sampler` is any SlideSampler of the slide (only its file and µm/px override are used: the thumbnail
    and the crop are read at their own pixel sizes); `mask` the run's tissue mask; `det` its detections
    (level-0 pixel indices); `density` its `density_map(det, ..., level0_mpp, cell_um)`. The picture is
    `max_side_px` wide. Returns `path`.
    """
    from matplotlib.figure import Figure  # lazy: slow import; Figure (not pyplot) keeps no global state

    path = Path(path)
    w0, h0 = sampler.slide.dimensions
    slide_h_um, slide_w_um = h0 * level0_mpp, w0 * level0_mpp
    thumb, thumb_mpp = _thumbnail(sampler, level0_mpp, w0, h0)
    th, tw = thumb.shape[:2]
    slide_extent = (0.0, tw * thumb_mpp, th * thumb_mpp, 0.0)  # (left, right, bottom, top) in µm

    d = np.asarray(density, dtype=np.float32)
    crop = qc_crop(d, cell_um, (slide_h_um, slide_w_um), mask)
    crop_rgb, crop_mpp, crop_extent = _zoom(sampler, crop, level0_mpp)

    # Size: three panels side by side, `max_side_px` wide, the zoom a little wider than the others (it is
    # the one to inspect closely); tall enough for the slide's and the crop's aspect ratios, no taller.
    dpi = 100
    width_px = int(max_side_px)
    panel_w = width_px / 3.7
    aspect = max(slide_h_um / max(slide_w_um, 1e-9), crop.height_um / max(crop.width_um, 1e-9) * 1.15)
    height_px = int(np.clip(panel_w * aspect + 120, 0.3 * width_px, 1.1 * width_px))
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    ax_thumb, ax_dens, ax_crop = fig.subplots(1, 3, width_ratios=[1.0, 1.0, 1.15])
    n_nuclei = len(det)
    small = float(np.clip(9.0 * width_px / 1200, 6.0, 11.0))  # titles of three panels must fit side by side
    fig.suptitle(f"{Path(sampler.path).name} — {n_nuclei:,} nuclei  (level 0: {w0:,}×{h0:,} px at {level0_mpp:g} µm/px, "
                 + (f"tissue {100 * mask.fraction:.0f}%)" if mask is not None else "no tissue mask)"), fontsize=small + 2)

    _draw_thumbnail(ax_thumb, thumb, slide_extent, mask, crop, small)
    _draw_density(fig, ax_dens, thumb, slide_extent, d, cell_um, crop, n_nuclei, small)
    _draw_zoom(ax_crop, crop_rgb, crop_extent, crop, crop_mpp, det, level0_mpp, small)

    for ax in (ax_thumb, ax_dens, ax_crop):
        ax.set_xlabel("µm", fontsize=small - 1)
        ax.tick_params(labelsize=small - 2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _thumbnail(sampler: SlideSampler, level0_mpp: float, w0: int, h0: int) -> tuple[np.ndarray, float]:
    """The whole slide at most THUMB_MAX_SIDE_PX on its longer side, and its µm/px."""
    thumb_mpp = max(level0_mpp, level0_mpp * max(w0, h0) / THUMB_MAX_SIDE_PX)
    thumb_sampler = SlideSampler(sampler.path, sampler.mpp_override, thumb_mpp)
    th, tw = thumb_sampler.shape_hw()
    return _read_or_gray(thumb_sampler, 0, 0, th, tw), thumb_mpp


def _zoom(sampler: SlideSampler, crop: QCCrop, level0_mpp: float) -> tuple[np.ndarray, float, tuple[float, float, float, float]]:
    """The crop's pixels at near-model resolution, their µm/px and their extent (left, right, bottom, top) in µm."""
    crop_mpp = max(CROP_MPP, level0_mpp, max(crop.width_um, crop.height_um) / CROP_MAX_SIDE_PX)
    crop_sampler = SlideSampler(sampler.path, sampler.mpp_override, crop_mpp)
    cy0, cx0 = int(math.floor(crop.y0_um / crop_mpp)), int(math.floor(crop.x0_um / crop_mpp))
    ch, cw = max(1, int(round(crop.height_um / crop_mpp))), max(1, int(round(crop.width_um / crop_mpp)))
    crop_rgb = _read_or_gray(crop_sampler, cy0, cx0, ch, cw)
    return crop_rgb, crop_mpp, (cx0 * crop_mpp, (cx0 + cw) * crop_mpp, (cy0 + ch) * crop_mpp, cy0 * crop_mpp)


def _draw_thumbnail(ax, thumb: np.ndarray, slide_extent, mask: TissueMask | None, crop: QCCrop, small: float) -> None:
    """(a) thumbnail + tissue outline. The mask is padded with background so tissue touching the slide's edge
    still gets a closed outline."""
    from matplotlib.patches import Rectangle  # lazy: half a second to import; only pictures need it

    th, tw = thumb.shape[:2]
    ax.imshow(thumb, extent=slide_extent, interpolation="lanczos" if max(th, tw) < 300 else "antialiased")
    if mask is not None and mask.mask.any():
        mh, mw = mask.mask.shape
        padded = np.pad(mask.mask.astype(np.float32), 1)
        ax.contour(padded, levels=[0.5], colors=["#1f9e1f"], linewidths=1.2, origin="upper",
                   extent=(-mask.mpp, (mw + 1) * mask.mpp, (mh + 1) * mask.mpp, -mask.mpp))
    ax.add_patch(Rectangle((crop.x0_um, crop.y0_um), crop.width_um, crop.height_um, fill=False, edgecolor=MARKER_COLOR,
                           linewidth=1.5))
    ax.set_title("tissue mask (green), zoom (cyan)", fontsize=small)


def _draw_density(fig, ax, thumb: np.ndarray, slide_extent, d: np.ndarray, cell_um: float, crop: QCCrop, n_nuclei: int,
                  small: float) -> None:
    """(b) density over a pale grey thumbnail; empty cells stay transparent so the tissue shows through."""
    from matplotlib.patches import Rectangle  # lazy: half a second to import; only pictures need it

    grey = thumb.astype(np.float32).mean(axis=2)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, extent=slide_extent, alpha=0.5)
    rows, cols = d.shape
    # Saturate at the 99th percentile on large grids so a few crowded cells do not wash out the rest.
    positive = d[d > 0]
    vmax = float(np.percentile(positive, 99)) if positive.size >= 100 else float(positive.max()) if positive.size else 1.0
    image = ax.imshow(np.ma.masked_equal(d, 0), cmap="magma_r", vmin=0, vmax=max(vmax, 1.0), alpha=0.85,
                      extent=(0.0, cols * cell_um, rows * cell_um, 0.0), interpolation="nearest")
    if crop.cell_rc is not None:
        r, c = crop.cell_rc
        ax.add_patch(Rectangle((c * cell_um, r * cell_um), cell_um, cell_um, fill=False, edgecolor=MARKER_COLOR, linewidth=1.5))
    cax = ax.inset_axes((1.03, 0.0, 0.05, 1.0))  # exactly as tall as the map, whatever its aspect
    bar = fig.colorbar(image, cax=cax, extend="max" if float(d.max()) > vmax else "neither")
    bar.set_label(f"nuclei per {cell_um:g} µm cell", fontsize=small)
    bar.ax.tick_params(labelsize=small - 1)
    ax.set_title(f"density (max {d.max():.0f}; densest cell cyan)" if n_nuclei else "density: no nuclei", fontsize=small)
    ax.set_xlim(slide_extent[0], slide_extent[1])
    ax.set_ylim(slide_extent[2], slide_extent[3])


def _draw_zoom(ax, crop_rgb: np.ndarray, crop_extent, crop: QCCrop, crop_mpp: float, det: Detections, level0_mpp: float,
               small: float) -> None:
    """(c) the crop with every detected centroid circled (in µm, so circles have a physical size); with classes
    in its class' colour, and a legend below the crop."""
    from matplotlib.collections import EllipseCollection  # lazy: half a second to import; only pictures need it

    ax.imshow(crop_rgb, extent=crop_extent, interpolation="antialiased")
    x_um = (np.asarray(det.x_px, dtype=np.float64) + 0.5) * level0_mpp
    y_um = (np.asarray(det.y_px, dtype=np.float64) + 0.5) * level0_mpp
    inside = crop.contains(x_um, y_um)
    winners = None
    if det.class_probs is not None:
        winners = np.argmax(det.class_probs, axis=1) if len(det) else np.zeros(0, np.int64)
    if inside.any():
        diameter = 2 * MARKER_RADIUS_UM
        colours = MARKER_COLOR if winners is None else np.asarray([CLASS_COLOURS_HEX[c] for c in CLASSES])[winners[inside]]
        circles = EllipseCollection(diameter, diameter, 0.0, units="xy", offsets=np.stack([x_um[inside], y_um[inside]], axis=1),
                                    offset_transform=ax.transData, facecolors="none", edgecolors=colours,
                                    linewidths=0.8 if winners is None else 1.0)
        ax.add_collection(circles)
    if winners is not None:
        _class_legend(ax, winners, inside, small)
    ax.set_xlim(crop_extent[0], crop_extent[1])
    ax.set_ylim(crop_extent[2], crop_extent[3])
    ax.set_title(f"zoom {crop.width_um:.0f}×{crop.height_um:.0f} µm at {crop_mpp:g} µm/px: {int(inside.sum())} nuclei",
                 fontsize=small)


def class_legend_labels(winners: np.ndarray, inside: np.ndarray) -> list[str]:
    """One legend line per class: its name, its nuclei in the zoom and in the whole slide (with its share)."""
    total = len(winners)
    in_slide = np.bincount(winners, minlength=len(CLASSES))
    in_zoom = np.bincount(winners[inside], minlength=len(CLASSES))
    return [f"{name}: {int(z)} here, {int(n):,} in slide ({100 * n / total:.0f}%)" if total else f"{name}: 0"
            for name, z, n in zip(CLASSES, in_zoom, in_slide)]


def _class_legend(ax, winners: np.ndarray, inside: np.ndarray, small: float) -> None:
    """The classes' colours and counts under the zoom (outside the crop, so no nucleus is hidden)."""
    from matplotlib.lines import Line2D  # lazy: half a second to import; only pictures need it

    handles = [Line2D([], [], linestyle="none", marker="o", markersize=7, markerfacecolor="none", markeredgewidth=1.5,
                      markeredgecolor=CLASS_COLOURS_HEX[name], label=label)
               for name, label in zip(CLASSES, class_legend_labels(winners, inside))]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=1, fontsize=small - 1, frameon=False,
              handletextpad=0.3, borderaxespad=0.0)
