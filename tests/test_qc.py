"""The per-slide QC picture: written atomically as a real, non-blank PNG, zoomed on the densest cell.

Detections come from MoNuSAC's hand annotations (no model needed), on the real SVS they belong to.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiproc.detection.detections import Detections
from wsiproc.outputs.formats import density_map
from wsiproc.outputs.qc import qc_crop, write_qc_png
from wsiproc.io.slide import open_slide
from wsiproc.detection.tiling import SlideSampler
from wsiproc.detection.tissue import tissue_mask


def _annotated(slides: Path, image: str) -> tuple[Path, Detections]:
    xs, ys = [], []
    with open(slides / "monusac" / "centroids_from_xml.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["image"] == image:
                xs.append(float(row["x"]))
                ys.append(float(row["y"]))
    n = len(xs)
    det = Detections(np.array(xs), np.array(ys), np.full(n, 0.9, np.float32), np.full(n, 20.0, np.float32))
    return slides / "monusac" / f"{image}.svs", det


def _qc_inputs(path: Path, det: Detections, cell_um: float):
    slide = open_slide(path)
    mpp0 = slide.require_mpp()
    sampler = SlideSampler.for_slide(slide, 0.5)
    w0, h0 = slide.dimensions
    return sampler, tissue_mask(sampler), density_map(det, (h0, w0), mpp0, cell_um), mpp0, (h0 * mpp0, w0 * mpp0)


def _assert_picture(path: Path, width_px: int) -> np.ndarray:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG"
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    h, w = rgb.shape[:2]
    assert w == width_px and 0.25 * width_px <= h <= 1.15 * width_px
    assert rgb.std() > 20, "QC picture looks blank"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]
    return rgb


def test_qc_png_on_annotated_monusac_slide(slides: Path, tmp_path: Path) -> None:
    path, det = _annotated(slides, "A9K0_1")
    sampler, mask, density, mpp0, size_um = _qc_inputs(path, det, 50.0)
    out = write_qc_png(tmp_path / "A9K0_1_qc.png", sampler, mask, det, density, mpp0, 50.0)
    assert out == tmp_path / "A9K0_1_qc.png"
    _assert_picture(out, 1200)

    # The crop the picture zooms on holds the densest cell, and with it most of that cell's nuclei.
    crop = qc_crop(density, 50.0, size_um, mask)
    r, c = np.unravel_index(np.argmax(density), density.shape)
    assert crop.cell_rc == (r, c)
    assert crop.x0_um <= c * 50.0 and crop.x1_um >= min((c + 1) * 50.0, size_um[1]) - 1e-6
    assert crop.y0_um <= r * 50.0 and crop.y1_um >= min((r + 1) * 50.0, size_um[0]) - 1e-6
    inside = crop.contains((det.x_px + 0.5) * mpp0, (det.y_px + 0.5) * mpp0)
    assert inside.sum() >= density.max()


def test_qc_png_smaller_width_and_no_nuclei(slides: Path, tmp_path: Path) -> None:
    """A slide without detections still gets a picture (centred on the tissue), at the width asked for."""
    path = slides / "monusac" / "A9K0_3.svs"
    det = Detections.empty()
    sampler, mask, density, mpp0, size_um = _qc_inputs(path, det, 50.0)
    out = write_qc_png(tmp_path / "A9K0_3_qc.png", sampler, mask, det, density, mpp0, 50.0, max_side_px=800)
    _assert_picture(out, 800)
    crop = qc_crop(density, 50.0, size_um, mask)
    assert crop.cell_rc is None
    assert crop.x0_um >= 0 and crop.y0_um >= 0 and crop.x1_um <= size_um[1] + 1e-6 and crop.y1_um <= size_um[0] + 1e-6


@pytest.mark.parametrize("peak_rc", [(0, 0), (15, 11), (29, 22)])
def test_crop_covers_densest_cell_and_stays_inside_slide(peak_rc: tuple[int, int]) -> None:
    size_um = (1480.0, 1108.0)  # CMU-1-Small-Region: 30 × 23 cells of 50 µm, the last ones sticking out
    density = np.ones((30, 23), np.float32)
    density[peak_rc] = 40
    crop = qc_crop(density, 50.0, size_um)
    r, c = peak_rc
    assert crop.cell_rc == peak_rc
    assert crop.width_um == pytest.approx(200) and crop.height_um == pytest.approx(200)
    assert 0 <= crop.x0_um <= c * 50 and min((c + 1) * 50, size_um[1]) <= crop.x1_um <= size_um[1]
    assert 0 <= crop.y0_um <= r * 50 and min((r + 1) * 50, size_um[0]) <= crop.y1_um <= size_um[0]


def test_crop_grows_with_large_cells() -> None:
    density = np.zeros((4, 4), np.float32)
    density[2, 1] = 5
    crop = qc_crop(density, 500.0, (2000.0, 2000.0))
    assert crop.width_um >= 500 and crop.x0_um <= 500 and crop.x1_um >= 1000 and crop.y0_um <= 1000 and crop.y1_um >= 1500


def test_qc_png_with_classes_on_annotated_monusac_slide(slides: Path, tmp_path: Path) -> None:
    """With nucleus types the zoom's circles take their class' colour, with a legend; the picture stays a real PNG
    the size of the one without classes."""
    from wsiproc.detection.classes import CLASS_COLOURS_HEX, CLASSES

    path, plain = _annotated(slides, "A9K0_1")
    probs = np.random.default_rng(1).dirichlet([1, 1, 1], len(plain)).astype(np.float32)
    det = Detections(plain.x_px, plain.y_px, plain.confidence, plain.area_um2, probs)
    sampler, mask, density, mpp0, _ = _qc_inputs(path, det, 50.0)
    rgb = _assert_picture(write_qc_png(tmp_path / "classes_qc.png", sampler, mask, det, density, mpp0, 50.0), 1200)
    plain_rgb = _assert_picture(write_qc_png(tmp_path / "plain_qc.png", sampler, mask, plain, density, mpp0, 50.0), 1200)
    assert rgb.shape == plain_rgb.shape and not np.array_equal(rgb, plain_rgb)

    def has_colour(image: np.ndarray, hex_colour: str) -> bool:
        target = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], np.float32)
        return bool((np.abs(image - target).max(axis=2) < 30).sum() > 20)

    zoom = rgb[:, int(0.7 * rgb.shape[1]) :]  # the zoom panel and its legend (the density's colours are left of it)
    assert all(has_colour(zoom, CLASS_COLOURS_HEX[c]) for c in CLASSES)  # every class drawn (circles and legend)
    assert not has_colour(plain_rgb[:, int(0.7 * rgb.shape[1]) :], CLASS_COLOURS_HEX["epithelial"])
