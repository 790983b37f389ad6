"""One slide, end to end: slide → tissue tiles → confidence → nuclei → stitched level-0 centroids → files.

Tile reads run in a small thread pool ahead of the model (prefetch), so decoding and resampling overlap
with inference; post-processing happens as each batch returns, and only the per-tile centroids are kept:
no whole-slide image or confidence map ever exists in memory.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import __version__
from .config import RunConfig
from .detections import Detections
from .inference import Predictor
from .postprocess import find_nuclei
from .resample import map_coords
from .slide import Slide, open_slide
from .stitch import keep_core, merge_across_tiles
from .tiling import SlideSampler, TileGrid, halo_tiles
from .tissue import tissue_mask

ProgressFn = Callable[[int, int, int], None]  # (tiles done, tiles to do, nuclei so far)


@dataclass
class SlideDetections:
    detections: Detections
    stats: dict = field(default_factory=dict)


def plan_tiles(sampler: SlideSampler, cfg: RunConfig) -> tuple[TileGrid, list[tuple[int, int]], dict]:
    """The tile grid and the tiles worth computing (those touching tissue, unless the mask is off)."""
    h, w = sampler.shape_hw()
    grid = TileGrid(h, w, cfg.tile_px, cfg.halo_px)
    info: dict = {"tiles_total": len(grid)}
    if cfg.tissue_mask:
        mask = tissue_mask(sampler)
        tiles = mask.tiles_touching(grid, cfg.model_mpp)
        info.update(tissue_fraction=round(mask.fraction, 4), tissue_saturation_threshold=round(mask.saturation_threshold, 4))
    else:
        tiles = [(r, c) for r in range(grid.rows) for c in range(grid.cols)]
    info["tiles_computed"] = len(tiles)
    return grid, tiles, info


def _batched(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def detect(slide: Slide, cfg: RunConfig, predictor: Predictor, progress: ProgressFn | None = None) -> SlideDetections:
    """All nuclei of a slide in level-0 pixel coordinates, with counts and timings."""
    t_start = time.perf_counter()
    sampler = SlideSampler.for_slide(slide, cfg.model_mpp)
    grid, tiles, stats = plan_tiles(sampler, cfg)
    stats["tile_mask_s"] = round(time.perf_counter() - t_start, 3)
    blocks = halo_tiles(sampler, grid)

    def read(rc: tuple[int, int]) -> np.ndarray:
        return blocks.blocks[rc[0], rc[1]].compute(scheduler="synchronous")

    ys, xs, confs, areas, tile_ids = [], [], [], [], []
    t_predict = t_post = 0.0
    done = n_found = 0
    with ThreadPoolExecutor(max_workers=max(1, cfg.io_workers), thread_name_prefix="wsiproc-read") as pool:
        pending: deque = deque()
        batches = iter(list(_batched(tiles, cfg.batch_size)))
        for _ in range(2):  # keep two batches of reads in flight ahead of the model
            nxt = next(batches, None)
            if nxt is not None:
                pending.append((nxt, [pool.submit(read, rc) for rc in nxt]))
        while pending:
            batch_tiles, futures = pending.popleft()
            nxt = next(batches, None)
            if nxt is not None:
                pending.append((nxt, [pool.submit(read, rc) for rc in nxt]))
            images = np.stack([f.result() for f in futures])
            t0 = time.perf_counter()
            conf = predictor(images)
            t1 = time.perf_counter()
            for (r, c), tile_conf in zip(batch_tiles, conf):
                y, x, p, a = keep_core(find_nuclei(tile_conf, cfg.threshold), grid, r, c)
                ys.append(y), xs.append(x), confs.append(p), areas.append(a)
                tile_ids.append(np.full(len(x), r * grid.cols + c, np.int64))
                n_found += len(x)
            t2 = time.perf_counter()
            t_predict += t1 - t0
            t_post += t2 - t1
            done += len(batch_tiles)
            if progress:
                progress(done, len(tiles), n_found)

    y = np.concatenate(ys) if ys else np.zeros(0)
    x = np.concatenate(xs) if xs else np.zeros(0)
    conf_all = np.concatenate(confs).astype(np.float32) if confs else np.zeros(0, np.float32)
    area = np.concatenate(areas) if areas else np.zeros(0)
    keep = merge_across_tiles(y, x, conf_all, np.concatenate(tile_ids) if tile_ids else np.zeros(0, np.int64), cfg.merge_radius_um / cfg.model_mpp)
    mpp0 = slide.require_mpp()
    det = Detections(
        map_coords(x[keep], cfg.model_mpp, mpp0),
        map_coords(y[keep], cfg.model_mpp, mpp0),
        conf_all[keep],
        (area[keep] * cfg.model_mpp**2).astype(np.float32),
    )
    stats.update(
        tile_px=cfg.tile_px, halo_px=cfg.halo_px, model_input_px=grid.block_px, grid_rows=grid.rows, grid_cols=grid.cols,
        merged_at_seams=int(len(x) - len(keep)), predict_s=round(t_predict, 3), postprocess_s=round(t_post, 3),
        detect_s=round(time.perf_counter() - t_start, 3),
        megapixels_computed=round(len(tiles) * grid.tile_px**2 / 1e6, 3),
    )
    return SlideDetections(det, stats)


def slide_summary(slide: Slide) -> dict:
    return {
        "path": str(slide.path),
        "reader": slide.reader,
        "vendor": slide.vendor,
        "level0_width_px": slide.dimensions[0],
        "level0_height_px": slide.dimensions[1],
        "levels": slide.level_count,
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
    }


def run_slide(path: str | Path, out_dir: str | Path, cfg: RunConfig, predictor: Predictor, stem: str | None = None,
              progress: ProgressFn | None = None) -> dict:
    """Process one input and write its outputs; returns the run record (also written as `<stem>.json`)."""
    from .export import write_outputs

    t0 = time.perf_counter()
    path = Path(path)
    slide = open_slide(path, cfg.mpp)
    try:
        mpp0 = slide.require_mpp()
        result = detect(slide, cfg, predictor, progress)
        record = {
            "wsiproc_version": __version__,
            "input": slide_summary(slide),
            "model": {"path": str(predictor.model_path), "sha256": predictor.sha256, "device": predictor.device},
            "parameters": cfg.to_dict(),
            "mpp_used": mpp0,
            "tiles": {k: v for k, v in result.stats.items() if k.startswith(("tiles_", "grid_", "tissue_"))},
            "timings_s": {k: v for k, v in result.stats.items() if k.endswith("_s")},
            "stats": result.stats,
        }
        w0, h0 = slide.dimensions
        # Everything but writing the files themselves: the record is written last and cannot time itself.
        record["timings_s"]["total_before_write_s"] = round(time.perf_counter() - t0, 3)
        record["nuclei"] = len(result.detections)
        outputs = write_outputs(Path(out_dir), stem or path.stem, result.detections, mpp0, (h0, w0), record,
                                cell_um=cfg.density_cell_um, geojson_gz=cfg.geojson_gz)
        record["outputs"] = {key: p.name for key, p in outputs.items()}
        return record
    finally:
        slide.close()
