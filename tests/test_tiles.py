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


def _mask(shape_hw: tuple[int, int], boxes: list[tuple[int, int, int, int]], mpp: float = 8.0):
    from wsiproc.detection.tissue import TissueMask

    mask = np.zeros(shape_hw, bool)
    for y0, x0, y1, x1 in boxes:
        mask[y0:y1, x0:x1] = True
    return TissueMask(mask, mpp, 0.1, 230.0)


def test_tiles_at_the_tissue_border_are_computed_as_the_quarters_that_touch_tissue() -> None:
    """8 × 8 tiles of 512 px at 0.5 µm/px (32 mask pixels of 8 µm each): tile (1, 1) is tissue throughout, a speck
    lies in the top-left corner of tile (3, 3). The full tile stays whole; its neighbours, which touch tissue only
    through their halo (32 px = 2 mask pixels), and the speck's tile are computed as the quarters (of 256 px, and
    their quarters of 128 px) that touch it."""
    from wsiproc.detection.tiles import split_at_tissue_border

    mask = _mask((128, 128), [(32, 32, 64, 64), (98, 98, 100, 100)])
    grid = TileGrid(4096, 4096, 512, 32, 4)  # 8 × 8 tiles, the mask covers the whole image
    tiles = mask.tiles_touching(grid, 0.5)
    plan = split_at_tissue_border(grid, tiles, mask, 0.5)
    assert [(g.tile_px, g.halo_px) for g, _ in plan] == [(512, 32), (256, 32), (128, 32)]
    (_, whole), (_, halves), (_, quarters) = plan
    assert (1, 1) in whole and (3, 3) not in whole
    # the speck (mask pixels 98–100: model pixels 1568–1600) lies in 128-px tile (12, 12) and the halos around it
    assert (12, 12) in quarters and not [t for t in halves if t[0] // 2 == 3 and t[1] // 2 == 3]
    # tile (1, 0) touches the tissue only through its right halo: only its right-hand part is computed
    assert (1, 0) not in whole and not {(2, 0), (3, 0)} & set(halves)
    # every planned tile is computed once, whole or as quarters of its own
    covered = [{t for t in whole}, {(r // 2, c // 2) for r, c in halves}, {(r // 4, c // 4) for r, c in quarters}]
    assert set().union(*covered) == set(tiles)
    assert covered[0].isdisjoint(covered[1]) and covered[0].isdisjoint(covered[2])
    pixels = sum(len(t) * g.block_px**2 for g, t in plan)
    assert pixels < 0.5 * len(tiles) * grid.block_px**2


def test_quarter_tiles_at_the_tissue_border_find_the_nuclei_whole_tiles_find(predictor) -> None:
    """The bundled sample slide (glass around the tissue) with and without quarter tiles: the same nuclei, for
    fewer pixels through the network."""
    from dataclasses import replace

    from wsiproc.cli import SAMPLE_SLIDE

    cfg = RunConfig()
    with open_slide(SAMPLE_SLIDE) as slide:
        split = detect(slide, cfg, predictor)
        whole = detect(slide, replace(cfg, border_quarters=False), predictor)
    assert sum(split.figures["tiles_by_side_px"].values()) > whole.figures["tiles_by_side_px"][str(cfg.tile_px)]
    assert split.figures["megapixels_computed"] < 0.9 * whole.figures["megapixels_computed"]
    a, b = split.detections, whole.detections
    assert len(a) > 100 and abs(len(a) - len(b)) <= 0.005 * len(b)
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(b.xy).query(a.xy)
    # the same nuclei at the same place, but for int8 rounding, which differs a little between tile shapes
    assert (distance <= 0.5).mean() >= 0.99
