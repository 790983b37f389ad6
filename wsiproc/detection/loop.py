"""The detection loop of one slide: slide → tissue tiles → confidence → nuclei → stitched level-0 centroids.

Tiles are planned and read by `wsiproc.detection.tiles` (as everything else that reads tiles through the
model: adaptation, explain), in a small thread pool ahead of the model (prefetch), so decoding and resampling
overlap with inference; post-processing happens as each batch returns, and only the per-tile centroids are
kept: no whole-slide image or confidence map ever exists in memory. `detect_region` runs this same loop on one
box of a slide.
"""
from __future__ import annotations

import functools
import itertools
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .colour import DomainColours, SlideColour, slide_colour
from .classes import CLASS_READ_RADIUS_PX, CLASSES, read_class_probs
from .detections import Detections
from .inference import Predictor
from .params import DetectionParams
from .postprocess import Postprocess
from ..io.resample import map_coords
from ..io.slide import Slide, SlideError
from .stitch import keep_core, merge_across_tiles
from .tiles import Tile, batched, every_tile, iter_tile_batches, plan_tiles, split_at_tissue_border, tile_grid
from .tiling import RegionSampler, SlideSampler, TileGrid
from .tissue import TissueMask

ProgressFn = Callable[[int, int, int], None]  # (tiles done, tiles to do, nuclei so far)


@dataclass(frozen=True)
class TileResult:
    """The nuclei one tile owns (centroid in its core), in model-grid pixel-index coordinates of the whole slide."""

    row: int
    col: int
    y_model_px: np.ndarray
    x_model_px: np.ndarray
    confidence: np.ndarray
    area_model_px: np.ndarray
    class_probs: np.ndarray | None = None  # (n, K), read from the class map at each centroid
    level: int = 0  # 0: a tile of the run's grid; k: of its k-th quarter grid (`tiles.split_at_tissue_border`)

    def __len__(self) -> int:
        return len(self.x_model_px)


@dataclass
class BatchResult:
    """One batch of tiles through the model: what it found, which tiles could not be read, and the seconds spent."""

    n_tiles: int
    found: list[TileResult]
    failed_tiles: list[dict]
    predict_s: float = 0.0
    postprocess_s: float = 0.0


@dataclass
class SlideDetections:
    """A slide's nuclei and what the run record says about finding them, grouped as the record groups it."""

    detections: Detections
    tiles: dict = field(default_factory=dict)  # the grid and the tissue: tiles_total, tiles_computed, grid_*, tissue_*
    timings_s: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # the record's "stats": tile and halo sides, seams, failed tiles…
    warnings: list[str] = field(default_factory=list)
    tissue: TissueMask | None = None
    sampler: SlideSampler | None = None

    @property
    def stats(self) -> dict:
        """Every figure in one flat mapping."""
        return {**self.tiles, **self.figures, **self.timings_s, "warnings": self.warnings}


#: The keys of `plan_tiles`' counts that describe the grid and the tissue (the rest are figures).
_TILE_KEYS = ("tiles_total", "tiles_computed", "tissue_fraction", "tissue_saturation_threshold")


def _nuclei_of_tiles(grid: TileGrid, tiles: list[tuple[int, int]], conf: np.ndarray, post: Postprocess,
                     probs: np.ndarray | None = None, level: int = 0) -> tuple[list[TileResult], float]:
    """Post-processing of one batch's confidence maps: the nuclei in each tile's core, each with its class
    probabilities where `probs` (the batch's class maps) is given."""
    t0 = time.perf_counter()
    found = []
    for i, ((r, c), tile_conf) in enumerate(zip(tiles, conf)):
        components = post(tile_conf)
        if probs is not None:
            components = components.with_class_probs(read_class_probs(probs[i], components.y, components.x, CLASS_READ_RADIUS_PX))
        found.append(TileResult(r, c, *keep_core(components, grid, r, c), level=level))
    return found, time.perf_counter() - t0


def _predict(predictor, images: list[np.ndarray], colour: SlideColour | None = None,
             classes: bool = False) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Confidence maps of a batch, its class maps (with `classes`, where the model has them), and the model's
    seconds; `colour` aligns the tiles first (not timed)."""
    x = np.stack(images)
    if colour is not None:
        x = colour.apply(x)
    t0 = time.perf_counter()
    if classes and getattr(predictor, "classes", None):
        conf, probs = predictor.maps(x)
    else:
        conf, probs = predictor(x), None
    return conf, probs, time.perf_counter() - t0


def _failures(batch, level: int) -> list[dict]:
    """The batch's undecodable tiles as the run record lists them; a quarter tile's give its level (its row and
    column are of that quarter grid)."""
    return [{**f, "level": level} for f in batch.failures] if level else list(batch.failures)


@functools.lru_cache(maxsize=2)
def worker_predictor(model_path: str, precision: str = "auto", engine: str = "auto") -> Predictor:
    return Predictor(model_path, precision=precision, engine=engine)


def _remote_batch(sampler: SlideSampler, grid: TileGrid, tiles: list[tuple[int, int]], cfg: DetectionParams, model_path: str,
                  colour: SlideColour | None = None, precision: str = "auto", engine: str = "auto", level: int = 0):
    """What a dask worker does with one batch: read, predict, post-process; the model is loaded once per worker,
    with the engine and precision the client's `Predictor` was asked for. The batch is read here, in this thread."""
    [batch] = iter_tile_batches(sampler, grid, tiles, len(tiles), strict=cfg.strict, prefetch=0)
    if not batch.images:
        return BatchResult(len(batch), [], _failures(batch, level))
    conf, probs, t_pred = _predict(worker_predictor(model_path, precision, engine), batch.images, colour, cfg.classes)
    found, t_post = _nuclei_of_tiles(grid, batch.read, conf, cfg.postprocessor(), probs, level)
    return BatchResult(len(batch), found, _failures(batch, level), t_pred, t_post)


def _local_batches(sampler: SlideSampler | RegionSampler, grid: TileGrid, tiles: list[Tile], cfg: DetectionParams,
                   predictor: Predictor, colour: SlideColour | None = None, level: int = 0, batch_size: int | None = None):
    """The model never waits for the rest: reads run in a thread pool two batches ahead of it
    (`iter_tile_batches`), and each batch's post-processing runs in that same pool while the model computes the
    next batch (on a GPU both would otherwise leave it idle)."""
    with ThreadPoolExecutor(max_workers=max(1, cfg.io_workers), thread_name_prefix="wsiproc-read") as pool:
        post: deque = deque()  # (tiles in batch, post-processing future, failures, predict seconds)

        def finished() -> BatchResult:
            n_tiles, future, failures, t_pred = post.popleft()
            found, t_post = future.result()
            return BatchResult(n_tiles, found, failures, t_pred, t_post)

        for batch in iter_tile_batches(sampler, grid, tiles, batch_size or cfg.batch_size, strict=cfg.strict, prefetch=2,
                                       executor=pool):
            failures = _failures(batch, level)
            if not batch.images:
                post.append((len(batch), pool.submit(lambda: ([], 0.0)), failures, 0.0))
            else:
                conf, probs, t_pred = _predict(predictor, batch.images, colour, cfg.classes)
                post.append((len(batch), pool.submit(_nuclei_of_tiles, grid, batch.read, conf, cfg.postprocessor(), probs,
                                                     level), failures, t_pred))
            while len(post) > 1:
                yield finished()
        while post:
            yield finished()


def _distributed_batches(client, sampler: SlideSampler, grid: TileGrid, tiles: list[Tile], cfg: DetectionParams, predictor: Predictor,
                         colour: SlideColour | None = None, level: int = 0, batch_size: int | None = None):
    """One dask task per batch on the cluster; results come back as they finish (order does not matter)."""
    from distributed import as_completed  # lazy: dask's cluster, only when a run asks for workers

    asked = predictor.requested
    futures = [client.submit(_remote_batch, sampler, grid, batch, cfg, str(predictor.model_path), colour, asked["precision"],
                             asked["engine"], level, pure=False)
               for batch in batched(tiles, batch_size or cfg.batch_size)]
    for future in as_completed(futures):
        yield future.result()


def _found_in_tiles(sampler: SlideSampler | RegionSampler, grid: TileGrid, tiles: list[Tile], cfg: DetectionParams,
                    predictor: Predictor, colour: SlideColour | None = None, progress: ProgressFn | None = None,
                    client=None, finer: list[tuple[TileGrid, list[Tile]]] = ()
                    ) -> tuple[list[TileResult], list[dict], float, float]:
    """`tiles` (and `finer`: the quarter grids and their tiles, `tiles.split_at_tissue_border`) through the model,
    on `client`'s workers or here: the nuclei each tile owns, the tiles that could not be decoded (in tile
    order), and the model's and the post-processing's seconds. When none of the tiles can be decoded the slide
    fails: an empty result would look like a slide without nuclei. Quarter tiles go in batches of as many pixels
    as the whole tiles' batches."""
    batches = _distributed_batches if client is not None else _local_batches
    extra = (client,) if client is not None else ()
    source = batches(*extra, sampler, grid, tiles, cfg, predictor, colour)
    n_tiles = len(tiles)
    for level, (q_grid, q_tiles) in enumerate(finer, 1):
        if q_tiles:
            q_batch = max(cfg.batch_size, cfg.batch_size * grid.block_px**2 // q_grid.block_px**2)
            source = itertools.chain(source, batches(*extra, sampler, q_grid, q_tiles, cfg, predictor, colour, level, q_batch))
            n_tiles += len(q_tiles)
    parts: list[TileResult] = []
    failed_tiles: list[dict] = []
    t_predict = t_post = 0.0
    done = n_found = 0
    for result in source:
        parts.extend(result.found)
        failed_tiles.extend(result.failed_tiles)
        done += result.n_tiles
        n_found += sum(len(f) for f in result.found)
        t_predict += result.predict_s
        t_post += result.postprocess_s
        if progress:
            progress(done, n_tiles, n_found)
    failed_tiles.sort(key=lambda f: (f.get("level", 0), f["row"], f["col"]))
    if n_tiles and len(failed_tiles) == n_tiles:
        raise SlideError(f"{sampler.path}: no tile could be decoded ({n_tiles} tried; first error: {failed_tiles[0]['error']})")
    return parts, failed_tiles, t_predict, t_post


def detect_region(slide: Slide, cfg: DetectionParams, predictor: Predictor, region_model_px: tuple[int, int, int, int],
                  colour: SlideColour | None = None) -> Detections:
    """The nuclei of one box (y0, x0, height, width) of the slide's model grid, in level-0 pixel coordinates of
    the slide, found by the code of a run: the box tiled as `detect` tiles an image of its size (every tile; the
    caller chose the box, so no tissue mask), the slide's own pixels in the halos, the same batches, model,
    post-processing, core rule and stitching. `colour`: the slide's colour transform as a run measures it on the
    whole slide (`colour.slide_colour`), or None. `wsiproc explain` detects in a random region with this."""
    y0, x0, height, width = region_model_px
    sampler = SlideSampler.for_slide(slide, cfg.model_mpp).region(y0, x0, height, width)
    grid = tile_grid(sampler, cfg, predictor.geometry)
    parts, _, _, _ = _found_in_tiles(sampler, grid, every_tile(grid), cfg, predictor, colour)
    with_classes = bool(cfg.classes and getattr(predictor, "classes", None))
    return _stitch(parts, grid, cfg, slide.require_mpp(), with_classes, origin_model_px=(y0, x0))[0]


def detect(slide: Slide, cfg: DetectionParams, predictor: Predictor, progress: ProgressFn | None = None, client=None) -> SlideDetections:
    """All nuclei of a slide in level-0 pixel coordinates, with counts and timings.

    With a dask.distributed `client`, batches run on the cluster's workers (each loads the model once);
    batches are the same either way, so the results are identical.
    """
    t_start = time.perf_counter()
    sampler = SlideSampler.for_slide(slide, cfg.model_mpp)
    grid, tiles, counts, mask = plan_tiles(sampler, cfg, predictor.geometry)
    plan = [(grid, tiles)]
    if cfg.border_quarters and mask is not None:
        plan = split_at_tissue_border(grid, tiles, mask, cfg.model_mpp)
    tile_mask_s = round(time.perf_counter() - t_start, 3)
    colours: DomainColours | None = getattr(predictor, "colours", None)
    colour = slide_colour(sampler, colours, mask) if colours is not None and tiles else None
    parts, failed_tiles, t_predict, t_post = _found_in_tiles(sampler, grid, plan[0][1], cfg, predictor, colour, progress, client,
                                                             plan[1:])
    with_classes = bool(cfg.classes and getattr(predictor, "classes", None))
    det, merged = _stitch(parts, grid, cfg, slide.require_mpp(), with_classes)
    warnings = counts.pop("warnings")
    if failed_tiles:
        warnings.append(f"{len(failed_tiles)} tile(s) could not be decoded and were skipped (see failed_tiles)")
    aligned = {}
    if colours is not None:  # the model asks for per-slide colour alignment: say what this slide got
        aligned = {"colour_alignment": colour.to_dict() if colour is not None else None}
        if colour is None and tiles:
            warnings.append("colours not aligned: too little tissue in the sampled tiles to measure them")
    return SlideDetections(
        det,
        tiles={**{k: counts.pop(k) for k in _TILE_KEYS if k in counts}, "grid_rows": grid.rows, "grid_cols": grid.cols},
        timings_s={"tile_mask_s": tile_mask_s, "predict_s": round(t_predict, 3), "postprocess_s": round(t_post, 3),
                   "detect_s": round(time.perf_counter() - t_start, 3)},
        figures={**counts, "tile_px": grid.tile_px, "halo_px": grid.halo_px, "model_input_px": grid.block_px,
                 "merged_at_seams": merged, "tiles_by_side_px": {str(g.tile_px): len(t) for g, t in plan},
                 "megapixels_computed": round(sum(len(t) * g.tile_px**2 for g, t in plan) / 1e6, 3),
                 "failed_tiles": failed_tiles, **aligned},
        warnings=warnings, tissue=mask, sampler=sampler,
    )


def _stitch(parts: list[TileResult], grid: TileGrid, cfg: DetectionParams, level0_mpp: float,
            with_classes: bool = False, origin_model_px: tuple[int, int] = (0, 0)) -> tuple[Detections, int]:
    """The tiles' nuclei as one set on the level-0 grid (µm/px `level0_mpp`), seams merged; and how many were merged.
    `origin_model_px`: where the grid's top-left pixel lies on the slide's model grid (a region's box)."""
    parts = sorted(parts, key=lambda f: (f.level, f.row, f.col))  # tile order: the same output whichever finished first
    y = np.concatenate([f.y_model_px for f in parts]) if parts else np.zeros(0)
    x = np.concatenate([f.x_model_px for f in parts]) if parts else np.zeros(0)
    conf_all = np.concatenate([f.confidence for f in parts]).astype(np.float32) if parts else np.zeros(0, np.float32)
    area = np.concatenate([f.area_model_px for f in parts]) if parts else np.zeros(0)
    # one id per tile: level k's grid has at most 2^k times the columns, and each level its own range
    ids = [(f.level << 40) + f.row * (grid.cols << f.level) + f.col for f in parts]
    tile_ids = np.concatenate([np.full(len(f), i, np.int64) for f, i in zip(parts, ids)]) if parts else np.zeros(0, np.int64)
    keep = merge_across_tiles(y, x, conf_all, tile_ids, cfg.merge_radius_um / cfg.model_mpp)
    probs = None
    if with_classes:
        probs = (np.concatenate([f.class_probs for f in parts]).astype(np.float32) if parts
                 else np.zeros((0, len(CLASSES)), np.float32))[keep]
    y0, x0 = origin_model_px
    det = Detections(
        map_coords(x[keep] + x0, cfg.model_mpp, level0_mpp),
        map_coords(y[keep] + y0, cfg.model_mpp, level0_mpp),
        conf_all[keep],
        (area[keep] * cfg.model_mpp**2).astype(np.float32),
        probs,
    )
    return det, int(len(x) - len(keep))
