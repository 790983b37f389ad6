"""The pipeline's promises on real H&E: tiling is invisible in the output, and glass never reaches the model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree

from wsiproc.config import RunConfig
from wsiproc.detection.loop import detect, plan_tiles
from wsiproc.io.slide import open_slide
from wsiproc.detection.tiling import SlideSampler


def _monuseg_image(shared_data: Path) -> Path:
    return shared_data / "monuseg-train" / "images" / "TCGA-21-5784-01Z-00-DX1.tif"


@pytest.fixture(scope="module")
def untiled(shared_data: Path, predictor):
    slide = open_slide(_monuseg_image(shared_data), mpp=0.25)
    # One tile bigger than the whole image (500 × 500 at 0.5 µm/px): the reference without seams.
    return detect(slide, RunConfig(tile_px=512, tissue_mask=False), predictor).detections


@pytest.mark.parametrize("tile_px", [256, 200])  # 200 does not divide the 500-px image
def test_tiled_output_equals_untiled_output(shared_data: Path, predictor, untiled, tile_px: int) -> None:
    slide = open_slide(_monuseg_image(shared_data), mpp=0.25)
    result = detect(slide, RunConfig(tile_px=tile_px, tissue_mask=False), predictor)
    tiled = result.detections
    assert result.stats["tiles_computed"] == result.stats["tiles_total"] == int(np.ceil(500 / tile_px)) ** 2
    assert len(untiled) > 100  # a real image with many nuclei, not a trivial case
    assert len(tiled) == len(untiled)
    dist, nearest = cKDTree(untiled.xy).query(tiled.xy)
    assert dist.max() <= 0.5, f"a centroid moved by {dist.max():.2f} px across tile seams"
    # Nucleus types too: each nucleus reads the class map at its centroid, which lies in its tile's core.
    assert tiled.class_probs is not None and untiled.class_probs is not None
    np.testing.assert_allclose(tiled.class_probs, untiled.class_probs[nearest], atol=1e-3)
    assert (tiled.classes == untiled.classes[nearest]).mean() > 0.995  # only near-ties may flip


def test_tiled_output_equals_untiled_output_for_a_lean_network_with_peaks(shared_data: Path) -> None:
    # The U-Net pools three times (sides multiple of 8, halo 56 with the peaks rule): seams must still vanish.
    from wsiproc.detection.inference import Predictor
    from wsiproc.detection.model import resolve_model_path

    unet = Predictor(resolve_model_path("unet"), engine="tensorflow", precision="float32")
    assert unet.geometry["size_multiple_px"] == 8
    slide = open_slide(_monuseg_image(shared_data), mpp=0.25)
    whole = detect(slide, RunConfig(tile_px=512, tissue_mask=False), unet)
    tiled = detect(slide, RunConfig(tile_px=200, tissue_mask=False), unet)
    assert whole.stats["halo_px"] == 56 and tiled.stats["tiles_total"] == 9
    assert len(whole.detections) > 100 and len(tiled.detections) == len(whole.detections)
    dist, _ = cKDTree(whole.detections.xy).query(tiled.detections.xy)
    assert dist.max() <= 0.5, f"a centroid moved by {dist.max():.2f} px across tile seams"


class CountingPredictor:
    """Wraps the real predictor and remembers every tile it was given."""

    def __init__(self, predictor):
        self.inner, self.tiles = predictor, []

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.tiles.extend(tiles)
        return self.inner(tiles)

    def maps(self, tiles: np.ndarray):
        self.tiles.extend(tiles)
        return self.inner.maps(tiles)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_background_tiles_are_not_sent_to_the_model(tmp_path: Path, shared_data: Path, predictor) -> None:
    # Real H&E (256 × 256 px at 0.5 µm/px) pasted into the top-left corner of a blank 1024 × 1024 slide.
    he = Image.open(_monuseg_image(shared_data)).convert("RGB").resize((256, 256))
    canvas = Image.new("RGB", (1024, 1024), (255, 255, 255))
    canvas.paste(he, (0, 0))
    path = tmp_path / "mostly_glass.png"
    canvas.save(path)
    slide = open_slide(path, mpp=0.5)
    cfg = RunConfig(tile_px=128, halo_px=32, border_quarters=False)  # the plan's tiles, each computed whole
    grid, tiles, info, _ = plan_tiles(SlideSampler.for_slide(slide, 0.5), cfg)
    assert info["tiles_total"] == 64
    assert set(tiles) >= {(r, c) for r in range(2) for c in range(2)}  # every tile holding tissue
    assert all(r <= 2 and c <= 2 for r, c in tiles), tiles  # and nothing far out in the glass
    counting = CountingPredictor(predictor)
    result = detect(slide, cfg, counting)
    assert len(counting.tiles) == result.stats["tiles_computed"] == len(tiles) < 16
    assert not any((t == 255).all() for t in counting.tiles)  # no all-glass tile reached the model
    assert len(result.detections) > 20
    assert result.detections.x_px.max() < 256 + 8 and result.detections.y_px.max() < 256 + 8


def test_a_local_dask_cluster_gives_exactly_the_local_result(shared_data: Path, predictor) -> None:
    from wsiproc.cohort.cluster import dask_client

    slide = open_slide(_monuseg_image(shared_data), mpp=0.25)
    cfg = RunConfig(tile_px=128, batch_size=2, tissue_mask=False)  # 16 tiles in 8 batches over two workers
    local = detect(slide, cfg, predictor).detections
    with dask_client("local", n_workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in client.scheduler_info()["workers"])
        remote = detect(slide, cfg, predictor, client=client).detections
    assert len(local) > 100
    np.testing.assert_array_equal(remote.x_px, local.x_px)
    np.testing.assert_array_equal(remote.y_px, local.y_px)
    np.testing.assert_array_equal(remote.confidence, local.confidence)


@pytest.mark.parametrize("side_px, tiles_total, tile_px", [(550, 1, 552), (640, 1, 640), (700, 4, 512)])
def test_a_crop_at_most_a_quarter_larger_than_a_tile_is_computed_as_one_tile(tmp_path: Path, side_px: int, tiles_total: int, tile_px: int) -> None:
    path = tmp_path / "crop.png"
    Image.new("RGB", (side_px, side_px), (200, 120, 160)).save(path)
    slide = open_slide(path, mpp=0.5)
    grid, tiles, info, _ = plan_tiles(SlideSampler.for_slide(slide, 0.5), RunConfig(tile_px=512, tissue_mask=False))
    assert (info["tiles_total"], grid.tile_px, len(tiles)) == (tiles_total, tile_px, tiles_total)
