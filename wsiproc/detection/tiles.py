"""The one way through a slide's tiles: plan them (`plan_tiles`), read each with its halo, and hand them out in
batches (`iter_tile_batches` → `TileBatch`).

The detection loop, adaptation's mining and calibration, explain's region and the colour windows all read
through here, so every one of them sees the pixels a run sees and treats an undecodable tile as a run does:
skipped and reported in `TileBatch.failures`, or, with `strict`, an error that names the file and the tile.
Which tiles a caller reads (all of a plan, a random sample, `sample_tiles`) stays the caller's choice; the
iterator keeps the caller's order.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import problem
from ..io.slide import SlideError
from .model import size_multiple
from .params import DetectionParams
from .tiling import RegionSampler, SlideSampler, TileGrid, halo_tiles
from .tissue import TissueMask, tissue_mask

Tile = tuple[int, int]  # (row, col) of a `TileGrid`

#: Images whose longer side is at most this many tile sides are computed as one tile.
SMALL_IMAGE_FACTOR = 1.25


def tile_grid(sampler: SlideSampler | RegionSampler, cfg: DetectionParams, geometry: dict | None = None) -> TileGrid:
    """The tile grid a run lays over the sampler's image. `geometry` is the model's (`Predictor.geometry`): its
    size multiple and receptive radius set the grid's multiple and halo."""
    geometry = geometry or {}
    multiple = size_multiple(geometry)
    if cfg.tile_px % multiple:
        raise ValueError(f"tile_px must be a multiple of {multiple} for this model (got {cfg.tile_px})")
    h, w = sampler.shape_hw()
    # An image up to a quarter larger than one tile (annotated crops, small regions) gets one tile of its own
    # size: same output, and one model call instead of four mostly-padding ones.
    side_px = -(-max(h, w) // multiple) * multiple
    tile_px = side_px if side_px <= SMALL_IMAGE_FACTOR * cfg.tile_px else cfg.tile_px
    return TileGrid(h, w, tile_px, cfg.halo_for(geometry), multiple)


def every_tile(grid: TileGrid) -> list[Tile]:
    """Every tile of the grid, row by row."""
    return [(r, c) for r in range(grid.rows) for c in range(grid.cols)]


def plan_tiles(sampler: SlideSampler, cfg: DetectionParams, geometry: dict | None = None) -> tuple[TileGrid, list[Tile], dict, TissueMask | None]:
    """The tile grid, the tiles worth computing (those touching tissue, unless the mask is off), counts and
    warnings, and the tissue mask itself (None when off or unreadable)."""
    grid = tile_grid(sampler, cfg, geometry)
    info: dict = {"tiles_total": len(grid), "warnings": []}
    mask = None
    if cfg.tissue_mask:
        try:
            mask = tissue_mask(sampler)
        except Exception as exc:  # a corrupt tile in the level the mask is read from (single-level files)
            reason = problem(exc)
            if cfg.strict:
                raise SlideError(f"{sampler.path}: the overview for the tissue mask cannot be decoded: {reason}") from exc
            info["warnings"].append(f"no tissue mask (the overview cannot be decoded: {reason}): every tile was sent to the model")
    if mask is not None:
        tiles = mask.tiles_touching(grid, cfg.model_mpp)
        info.update(tissue_fraction=round(mask.fraction, 4), tissue_saturation_threshold=round(mask.saturation_threshold, 4),
                    median_brightness=round(mask.median_brightness, 1))
        if not mask.looks_brightfield:
            info["warnings"].append(f"does not look like brightfield H&E (median brightness {mask.median_brightness:.0f}/255, "
                                    "dark background: fluorescence?); detections are likely meaningless")
        if not tiles:
            info["warnings"].append("no tissue found: no tile was sent to the model (use --no-tissue-mask to force)")
    else:
        tiles = every_tile(grid)
    info["tiles_computed"] = len(tiles)
    return grid, tiles, info, mask


def quarter_grid(grid: TileGrid) -> TileGrid | None:
    """The grid of quarter tiles (half the side, the same halo) over the same image, aligned with `grid`: tile
    (r, c) of `grid` is quarters (2r, 2c) … (2r + 1, 2c + 1). None where half a tile is not a whole number of the
    model's size multiple, or the image is a single tile."""
    half = grid.tile_px // 2
    if grid.tile_px % 2 or half % grid.multiple_px or len(grid) == 1:
        return None
    return TileGrid(grid.height_px, grid.width_px, half, grid.halo_px, grid.multiple_px)


#: How many times a tile at the tissue's border may be split into quarters (1 024 → 512 → 256 px by default).
SPLIT_LEVELS = 2


def split_at_tissue_border(grid: TileGrid, tiles: Sequence[Tile], mask: TissueMask, grid_mpp: float,
                           levels: int = SPLIT_LEVELS) -> list[tuple[TileGrid, list[Tile]]]:
    """The plan that computes tissue rather than tiles: [(grid, its tiles)], level 0 the run's grid, then the
    quarter grid, its quarter grid, …; every planned tile is computed once, whole or as some of its quarters.

    A tile at the tissue's border that holds only a sliver of tissue costs a whole tile's network time, and the
    network's time goes with the pixels it sees (tile and halo). Where the quarters of a planned tile that touch
    tissue (grown by the halo, as `tiles_touching` grows every tile), each planned the same way in turn, cost
    fewer pixels than the tile with its halo, only those quarters are computed: each with the same halo, so it
    sees what the whole tile would have seen around its core, and the output stays the untiled one (the core
    rule and the seam merge treat quarters as tiles of their own). Interior tiles stay whole: four quarters cost
    more than one tile, because each carries its own halo.
    """
    grids = [grid]
    while len(grids) <= levels and (finer := quarter_grid(grids[-1])) is not None:
        grids.append(finer)
    touching = [set()] + [set(mask.tiles_touching(g, grid_mpp)) for g in grids[1:]]

    def best(level: int, rc: Tile) -> tuple[int, list[tuple[int, Tile]]]:
        whole = grids[level].block_px ** 2
        if level + 1 == len(grids):
            return whole, [(level, rc)]
        finer = grids[level + 1]
        r, c = rc
        parts = [best(level + 1, q) for q in ((qr, qc) for qr in (2 * r, 2 * r + 1) for qc in (2 * c, 2 * c + 1))
                 if q[0] < finer.rows and q[1] < finer.cols and q in touching[level + 1]]
        split = sum(cost for cost, _ in parts)
        return (split, [t for _, planned in parts for t in planned]) if split < whole else (whole, [(level, rc)])

    plan: list[list[Tile]] = [[] for _ in grids]
    for rc in tiles:
        for level, t in best(0, rc)[1]:
            plan[level].append(t)
    return [(g, sorted(p) if level else p) for level, (g, p) in enumerate(zip(grids, plan))]


def sample_tiles(n_tiles: int, k: int, seed: int) -> list[int]:
    """Indices of up to `k` tiles of a slide, drawn without replacement (all when it has no more)."""
    if n_tiles <= k:
        return list(range(n_tiles))
    return sorted(np.random.default_rng(seed).choice(n_tiles, k, replace=False).tolist())


def batched(items: Sequence, size: int) -> Iterable[list]:
    """Consecutive runs of `size` items (the last one shorter)."""
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


@dataclass(frozen=True, eq=False)
class TileBatch:
    """One batch of planned tiles as read: the tiles that could be decoded with their images, and the others'
    failures (`{"row", "col", "error"}`, as the run record lists them)."""

    tiles: tuple[Tile, ...]  # every tile of the batch, in the order asked for
    read: tuple[Tile, ...]  # those that could be decoded, in the same order
    images: tuple[np.ndarray, ...]  # their RGB uint8 images, one per `read`: (block_px, block_px, 3) with the halo
    failures: tuple[dict, ...]

    def __len__(self) -> int:
        return len(self.tiles)


def iter_tile_batches(sampler: SlideSampler | RegionSampler, grid: TileGrid, tiles: Sequence[Tile], batch_size: int, *,
                      strict: bool, io_workers: int = 1, prefetch: int = 2, executor: Executor | None = None,
                      with_halo: bool = True) -> Iterator[TileBatch]:
    """`tiles` in batches of `batch_size`, in their order, each tile read with its halo (white outside the slide).

    With `prefetch` > 0 the reads run in a pool of `io_workers` threads (or on `executor`, shared with the caller's
    own work) `prefetch` batches ahead of the consumer, so decoding overlaps with whatever it does with a batch;
    with 0 each batch is read in the calling thread when asked for. Either way the same tiles are read and the
    batches are the same. An undecodable tile is a failure of its batch; with `strict` it raises a `ValueError`
    naming the file and the tile instead. `with_halo=False` reads each tile's core alone, clipped to the image
    (windows for measurements, which must see only the image's own pixels).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    read = _halo_reader(sampler, grid) if with_halo else _core_reader(sampler, grid)
    batches = list(batched(tiles, batch_size))
    if prefetch <= 0:
        for batch in batches:
            yield _tile_batch(batch, [_read_tile(read, rc, strict, sampler.path) for rc in batch])
    elif executor is not None:
        yield from _read_ahead(executor, read, batches, strict, sampler.path, prefetch)
    else:
        with ThreadPoolExecutor(max_workers=max(1, io_workers), thread_name_prefix="wsiproc-read") as pool:
            yield from _read_ahead(pool, read, batches, strict, sampler.path, prefetch)


def _read_ahead(pool: Executor, read: Callable[[Tile], np.ndarray], batches: list[list[Tile]], strict: bool, path: str,
                prefetch: int) -> Iterator[TileBatch]:
    """The next `prefetch` batches' reads are queued before a batch is awaited and handed out."""

    def submit(batch: list[Tile]) -> tuple[list[Tile], list]:
        return batch, [pool.submit(_read_tile, read, rc, strict, path) for rc in batch]

    pending = deque(submit(b) for b in batches[:prefetch])
    upcoming = iter(batches[prefetch:])
    while pending:
        batch, futures = pending.popleft()
        nxt = next(upcoming, None)
        if nxt is not None:
            pending.append(submit(nxt))
        yield _tile_batch(batch, [f.result() for f in futures])


def _halo_reader(sampler: SlideSampler | RegionSampler, grid: TileGrid) -> Callable[[Tile], np.ndarray]:
    """Tile (r, c) with its halo, padded to `grid.block_px`: one block of the lazy `halo_tiles` array."""
    blocks = halo_tiles(sampler, grid)
    return lambda rc: blocks.blocks[rc[0], rc[1]].compute(scheduler="synchronous")


def _core_reader(sampler: SlideSampler | RegionSampler, grid: TileGrid) -> Callable[[Tile], np.ndarray]:
    """Tile (r, c)'s core alone, clipped to the image."""

    def read(rc: Tile) -> np.ndarray:
        y0, x0, y1, x1 = grid.core(*rc)
        return sampler.read(y0, x0, y1 - y0, x1 - x0)

    return read


def _read_tile(read: Callable[[Tile], np.ndarray], rc: Tile, strict: bool, path: str) -> tuple[np.ndarray | None, dict | None]:
    """One tile's image, or the reason it could not be decoded (a corrupt tile in a readable slide)."""
    try:
        return read(rc), None
    except Exception as exc:
        if strict:
            raise ValueError(f"{path}: tile (row {rc[0]}, col {rc[1]}) cannot be decoded: {problem(exc)}") from exc
        return None, {"row": rc[0], "col": rc[1], "error": problem(exc)}


def _tile_batch(batch: list[Tile], reads: list[tuple[np.ndarray | None, dict | None]]) -> TileBatch:
    ok = [(rc, img) for rc, (img, _) in zip(batch, reads) if img is not None]
    return TileBatch(tuple(batch), tuple(rc for rc, _ in ok), tuple(img for _, img in ok),
                     tuple(f for _, f in reads if f is not None))


__all__ = ["SMALL_IMAGE_FACTOR", "Tile", "TileBatch", "batched", "every_tile", "iter_tile_batches",
           "plan_tiles", "quarter_grid", "sample_tiles", "SPLIT_LEVELS", "split_at_tissue_border", "tile_grid"]
