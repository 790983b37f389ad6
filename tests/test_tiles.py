"""The one tile iterator (`wsiproc.detection.tiles`): planned tiles come back in batches, in their order, each with
its halo; an undecodable tile is a failure of its batch, or under `strict` an error naming the file and the tile;
and explain's region detection (`loop.detect_region`) is the run's detection of that box."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsiproc.config import RunConfig
from wsiproc.detection.loop import detect, detect_region
from wsiproc.detection.tiles import TileBatch, every_tile, iter_tile_batches, plan_tiles
from wsiproc.detection.tiling import SlideSampler, TileGrid
from wsiproc.io.slide import open_slide

SIDE_PX = 1024
TIFF_TILE_PX = 64
#: TIFF tile (6, 6) holds garbage: level-0 pixels 384–448, inside only the halo box [224, 544) of grid tile (1, 1).
CORRUPT_TIFF_TILE = (6, 6)


def _tiled_tiff(path: Path, corrupt: tuple[int, int] | None = None) -> Path:
    """A 1024² tiled JPEG TIFF at 0.5 µm/px (the model's grid: no resampling), random blobs on white."""
    rng = np.random.default_rng(3)
    image = np.full((SIDE_PX, SIDE_PX, 3), 235, np.uint8)
    for y, x in rng.integers(0, SIDE_PX - 8, (400, 2)):
        image[y : y + 8, x : x + 8] = (90, 40, 120)
    per_cm = 1e4 / 0.5
    tifffile.imwrite(path, image, tile=(TIFF_TILE_PX, TIFF_TILE_PX), compression="jpeg", photometric="rgb",
                     resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    if corrupt is not None:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            index = corrupt[0] * -(-page.imagewidth // page.tilewidth) + corrupt[1]
            offset, size = page.dataoffsets[index], page.databytecounts[index]
        data = bytearray(path.read_bytes())
        data[offset : offset + size] = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
    return path


def _sampler(path: Path) -> SlideSampler:
    with open_slide(path) as slide:
        return SlideSampler.for_slide(slide, 0.5)


GRID = TileGrid(SIDE_PX, SIDE_PX, 256, 32, 16)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batches_hold_the_planned_tiles_in_order_each_read_with_its_halo(tmp_path: Path, prefetch: int) -> None:
    sampler = _sampler(_tiled_tiff(tmp_path / "clean.tif"))
    tiles = every_tile(GRID)[::-1]  # any order the caller asks for is kept
    batches = list(iter_tile_batches(sampler, GRID, tiles, 3, strict=True, io_workers=2, prefetch=prefetch))
    assert all(isinstance(b, TileBatch) for b in batches)
    assert [len(b) for b in batches] == [3, 3, 3, 3, 3, 1]
    assert [rc for b in batches for rc in b.tiles] == tiles
    assert all(b.read == b.tiles and not b.failures for b in batches)
    for rc, img in zip(batches[1].read, batches[1].images):
        y0, x0, _, _ = GRID.core(*rc)
        assert img.shape == (GRID.block_px, GRID.block_px, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, sampler.read(y0 - 32, x0 - 32, GRID.block_px, GRID.block_px))
    # Without halo: each core alone, clipped to the image (a grid that does not divide the image).
    windows = TileGrid(SIDE_PX, SIDE_PX, 300, 0, 1)
    [batch] = iter_tile_batches(sampler, windows, [(3, 3), (0, 1)], 8, strict=True, prefetch=prefetch, with_halo=False)
    assert [img.shape for img in batch.images] == [(124, 124, 3), (300, 300, 3)]
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_tile_batches(sampler, GRID, tiles, 0, strict=True))


def test_plan_tiles_plans_every_tile_without_the_tissue_mask(tmp_path: Path) -> None:
    sampler = _sampler(_tiled_tiff(tmp_path / "clean.tif"))
    grid, tiles, info, mask = plan_tiles(sampler, RunConfig(tile_px=256, tissue_mask=False))
    assert mask is None and tiles == every_tile(grid) and info["tiles_computed"] == len(grid) == 16


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_corrupt_tile_is_a_failure_of_its_batch_and_strict_names_the_file_and_the_tile(tmp_path: Path, prefetch: int) -> None:
    path = _tiled_tiff(tmp_path / "corrupt.tif", CORRUPT_TIFF_TILE)
    sampler = _sampler(path)
    tiles = every_tile(GRID)
    batches = list(iter_tile_batches(sampler, GRID, tiles, 4, strict=False, prefetch=prefetch))
    assert [rc for b in batches for rc in b.tiles] == tiles  # the batches stay the same
    [failure] = [f for b in batches for f in b.failures]
    assert (failure["row"], failure["col"]) == (1, 1) and failure["error"]
    assert batches[1].read == ((1, 0), (1, 2), (1, 3)) and len(batches[1].images) == 3
    assert sum(len(b.images) for b in batches) == 15
    with pytest.raises(ValueError, match=rf"^{path}: tile \(row 1, col 1\) cannot be decoded: "):
        list(iter_tile_batches(sampler, GRID, tiles, 4, strict=True, prefetch=prefetch))


def test_a_region_is_detected_as_a_run_detects(shared_data: Path, tiny_predictor) -> None:
    """`detect_region` over the whole image is `detect`; over a box, it reports the run's nuclei there (level-0
    coordinates of the slide), only those in the box."""
    slide = open_slide(shared_data / "crc-dev" / "images" / "img1.png", mpp=0.55)
    cfg = RunConfig(tile_px=256, tissue_mask=False)
    whole = detect(slide, cfg, tiny_predictor).detections
    h, w = SlideSampler.for_slide(slide, 0.5).shape_hw()
    same = detect_region(slide, cfg, tiny_predictor, (0, 0, h, w))
    assert len(whole) > 50
    np.testing.assert_array_equal(same.xy, whole.xy)
    np.testing.assert_array_equal(same.confidence, whole.confidence)
    y0, x0, side = 160, 96, 256
    box = detect_region(slide, cfg, tiny_predictor, (y0, x0, side, side))
    lo, hi = (np.array([x0, y0]) - 0.5) * 0.5 / 0.55, (np.array([x0, y0]) + side - 0.5) * 0.5 / 0.55
    assert len(box) >= 5 and ((box.xy >= lo - 1e-9) & (box.xy < hi)).all()
    inner = ((whole.xy > lo + 5) & (whole.xy < hi - 5)).all(axis=1)
    near = np.abs(box.xy[None, :, :] - whole.xy[inner][:, None, :]).max(axis=2).min(axis=1)
    assert near.max() <= 0.5  # every nucleus the run finds well inside the box, explain finds too


@pytest.fixture(scope="module")
def tiny_predictor(tiny_model: Path):
    from wsiproc.detection.inference import Predictor

    return Predictor(tiny_model)
