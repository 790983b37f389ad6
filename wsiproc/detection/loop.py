"""The detection loop of one slide: slide → tissue tiles → confidence → nuclei → stitched level-0 centroids.

Tile reads run in a small thread pool ahead of the model (prefetch), so decoding and resampling overlap
with inference; post-processing happens as each batch returns, and only the per-tile centroids are kept:
no whole-slide image or confidence map ever exists in memory.
"""
from __future__ import annotations

import functools
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..config import RunConfig
from .colour import DomainColours, SlideColour, slide_colour
from .classes import CLASS_READ_RADIUS_PX, CLASSES, read_class_probs
from .detections import Detections
from ..errors import problem
from .inference import Predictor
from .model import size_multiple
from .postprocess import Postprocess
from ..io.resample import map_coords
from ..io.slide import Slide, SlideError
from .stitch import keep_core, merge_across_tiles
from .tiling import SlideSampler, TileGrid, halo_tiles
from .tissue import TissueMask, tissue_mask

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


#: Images whose longer side is at most this many tile sides are computed as one tile.
SMALL_IMAGE_FACTOR = 1.25


def plan_tiles(sampler: SlideSampler, cfg: RunConfig, geometry: dict | None = None) -> tuple[TileGrid, list[tuple[int, int]], dict, TissueMask | None]:
    """The tile grid, the tiles worth computing (those touching tissue, unless the mask is off), counts and
    warnings, and the tissue mask itself (None when off or unreadable). `geometry` is the model's
    (`Predictor.geometry`): its size multiple and receptive radius set the grid's multiple and halo."""
    geometry = geometry or {}
    multiple = size_multiple(geometry)
    if cfg.tile_px % multiple:
        raise ValueError(f"tile_px must be a multiple of {multiple} for this model (got {cfg.tile_px})")
    h, w = sampler.shape_hw()
    # An image up to a quarter larger than one tile (annotated crops, small regions) gets one tile of its own
    # size: same output, and one model call instead of four mostly-padding ones.
    side_px = -(-max(h, w) // multiple) * multiple
    tile_px = side_px if side_px <= SMALL_IMAGE_FACTOR * cfg.tile_px else cfg.tile_px
    grid = TileGrid(h, w, tile_px, cfg.halo_for(geometry), multiple)
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
        tiles = [(r, c) for r in range(grid.rows) for c in range(grid.cols)]
    info["tiles_computed"] = len(tiles)
    return grid, tiles, info, mask


def batched(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def read_tile(blocks, rc: tuple[int, int], strict: bool, path: Path) -> tuple[np.ndarray | None, dict | None]:
    """One tile with its halo, or the reason it could not be decoded (a corrupt tile in a readable slide)."""
    try:
        return blocks.blocks[rc[0], rc[1]].compute(scheduler="synchronous"), None
    except Exception as exc:
        if strict:
            raise ValueError(f"{path}: tile (row {rc[0]}, col {rc[1]}) cannot be decoded: {problem(exc)}") from exc
        return None, {"row": rc[0], "col": rc[1], "error": problem(exc)}


def _nuclei_of_tiles(grid: TileGrid, tiles: list[tuple[int, int]], conf: np.ndarray, post: Postprocess,
                     probs: np.ndarray | None = None) -> tuple[list[TileResult], float]:
    """Post-processing of one batch's confidence maps: the nuclei in each tile's core, each with its class
    probabilities where `probs` (the batch's class maps) is given."""
    t0 = time.perf_counter()
    found = []
    for i, ((r, c), tile_conf) in enumerate(zip(tiles, conf)):
        components = post(tile_conf)
        if probs is not None:
            components = components.with_class_probs(read_class_probs(probs[i], components.y, components.x, CLASS_READ_RADIUS_PX))
        found.append(TileResult(r, c, *keep_core(components, grid, r, c)))
    return found, time.perf_counter() - t0


def _split_reads(batch: list[tuple[int, int]], reads: list) -> tuple[list, list[dict]]:
    """(tile, image) of the tiles that could be read, and the failures of those that could not."""
    results = [(rc, *read) for rc, read in zip(batch, reads)]
    return [(rc, img) for rc, img, _ in results if img is not None], [f for _, _, f in results if f is not None]


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


@functools.lru_cache(maxsize=2)
def worker_predictor(model_path: str, precision: str = "auto", engine: str = "auto") -> Predictor:
    return Predictor(model_path, precision=precision, engine=engine)


def _remote_batch(sampler: SlideSampler, grid: TileGrid, tiles: list[tuple[int, int]], cfg: RunConfig, model_path: str,
                  colour: SlideColour | None = None):
    """What a dask worker does with one batch: read, predict, post-process; the model is loaded once per worker."""
    blocks = halo_tiles(sampler, grid)
    ok, failures = _split_reads(tiles, [read_tile(blocks, rc, cfg.strict, Path(sampler.path)) for rc in tiles])
    if not ok:
        return BatchResult(len(tiles), [], failures)
    conf, probs, t_pred = _predict(worker_predictor(model_path, cfg.precision, cfg.engine), [img for _, img in ok], colour,
                                   cfg.classes)
    found, t_post = _nuclei_of_tiles(grid, [rc for rc, _ in ok], conf, cfg.postprocessor(), probs)
    return BatchResult(len(tiles), found, failures, t_pred, t_post)


def _local_batches(slide: Slide, sampler: SlideSampler, grid: TileGrid, batches: list, cfg: RunConfig, predictor: Predictor,
                   colour: SlideColour | None = None):
    """The model never waits for the rest: reads run in a thread pool two batches ahead of it, and each batch's
    post-processing runs in that pool while the model computes the next batch (on a GPU both would otherwise
    leave it idle)."""
    blocks = halo_tiles(sampler, grid)
    with ThreadPoolExecutor(max_workers=max(1, cfg.io_workers), thread_name_prefix="wsiproc-read") as pool:
        submit = lambda batch: (batch, [pool.submit(read_tile, blocks, rc, cfg.strict, slide.path) for rc in batch])  # noqa: E731
        pending = deque(submit(b) for b in batches[:2])
        upcoming = iter(batches[2:])
        post: deque = deque()  # (tiles in batch, post-processing future, failures, predict seconds)

        def finished() -> BatchResult:
            n_tiles, future, failures, t_pred = post.popleft()
            found, t_post = future.result()
            return BatchResult(n_tiles, found, failures, t_pred, t_post)

        while pending:
            batch, futures = pending.popleft()
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append(submit(nxt))
            ok, failures = _split_reads(batch, [f.result() for f in futures])
            if not ok:
                post.append((len(batch), pool.submit(lambda: ([], 0.0)), failures, 0.0))
            else:
                conf, probs, t_pred = _predict(predictor, [img for _, img in ok], colour, cfg.classes)
                post.append((len(batch), pool.submit(_nuclei_of_tiles, grid, [rc for rc, _ in ok], conf, cfg.postprocessor(), probs),
                             failures, t_pred))
            while len(post) > 1:
                yield finished()
        while post:
            yield finished()


def _distributed_batches(client, sampler: SlideSampler, grid: TileGrid, batches: list, cfg: RunConfig, predictor: Predictor,
                         colour: SlideColour | None = None):
    """One dask task per batch on the cluster; results come back as they finish (order does not matter)."""
    from distributed import as_completed

    futures = [client.submit(_remote_batch, sampler, grid, batch, cfg, str(predictor.model_path), colour, pure=False)
               for batch in batches]
    for future in as_completed(futures):
        yield future.result()


def detect(slide: Slide, cfg: RunConfig, predictor: Predictor, progress: ProgressFn | None = None, client=None) -> SlideDetections:
    """All nuclei of a slide in level-0 pixel coordinates, with counts and timings.

    With a dask.distributed `client`, batches run on the cluster's workers (each loads the model once);
    batches are the same either way, so the results are identical.
    """
    t_start = time.perf_counter()
    sampler = SlideSampler.for_slide(slide, cfg.model_mpp)
    grid, tiles, counts, mask = plan_tiles(sampler, cfg, getattr(predictor, "geometry", None))
    tile_mask_s = round(time.perf_counter() - t_start, 3)
    colours: DomainColours | None = getattr(predictor, "colours", None)
    colour = slide_colour(sampler, colours, mask) if colours is not None and tiles else None
    batches = list(batched(tiles, cfg.batch_size))
    source = (_distributed_batches(client, sampler, grid, batches, cfg, predictor, colour) if client is not None
              else _local_batches(slide, sampler, grid, batches, cfg, predictor, colour))

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
            progress(done, len(tiles), n_found)

    with_classes = bool(cfg.classes and getattr(predictor, "classes", None))
    det, merged = _stitch(parts, grid, cfg, slide.require_mpp(), with_classes)
    failed_tiles.sort(key=lambda f: (f["row"], f["col"]))
    if tiles and len(failed_tiles) == len(tiles):  # an empty result would look like a slide without nuclei
        raise SlideError(f"{slide.path}: no tile could be decoded ({len(tiles)} tried; first error: {failed_tiles[0]['error']})")
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
                 "merged_at_seams": merged, "megapixels_computed": round(len(tiles) * grid.tile_px**2 / 1e6, 3),
                 "failed_tiles": failed_tiles, **aligned},
        warnings=warnings, tissue=mask, sampler=sampler,
    )


def _stitch(parts: list[TileResult], grid: TileGrid, cfg: RunConfig, level0_mpp: float,
            with_classes: bool = False) -> tuple[Detections, int]:
    """The tiles' nuclei as one set on the level-0 grid (µm/px `level0_mpp`), seams merged; and how many were merged."""
    parts = sorted(parts, key=lambda f: (f.row, f.col))  # tile order: the same output whichever finished first
    y = np.concatenate([f.y_model_px for f in parts]) if parts else np.zeros(0)
    x = np.concatenate([f.x_model_px for f in parts]) if parts else np.zeros(0)
    conf_all = np.concatenate([f.confidence for f in parts]).astype(np.float32) if parts else np.zeros(0, np.float32)
    area = np.concatenate([f.area_model_px for f in parts]) if parts else np.zeros(0)
    tile_ids = np.concatenate([np.full(len(f), f.row * grid.cols + f.col, np.int64) for f in parts]) if parts else np.zeros(0, np.int64)
    keep = merge_across_tiles(y, x, conf_all, tile_ids, cfg.merge_radius_um / cfg.model_mpp)
    probs = None
    if with_classes:
        probs = (np.concatenate([f.class_probs for f in parts]).astype(np.float32) if parts
                 else np.zeros((0, len(CLASSES)), np.float32))[keep]
    det = Detections(
        map_coords(x[keep], cfg.model_mpp, level0_mpp),
        map_coords(y[keep], cfg.model_mpp, level0_mpp),
        conf_all[keep],
        (area[keep] * cfg.model_mpp**2).astype(np.float32),
        probs,
    )
    return det, int(len(x) - len(keep))
