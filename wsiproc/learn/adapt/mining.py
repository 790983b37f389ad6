"""Reading a cohort's slides through the model: pseudo-labelled blocks of a slide (`mine_slide`, a fair
reservoir per kind), every slide of a cohort into the block store (`_mine_cohort`, serial or on a dask client),
and the candidate peaks of random tissue tiles that calibration judges (`_sampled_tiles`, `_peaks_of_tiles`)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ...config import RunConfig
from ...detection.colour import ColourStats, SlideColour, slide_colour
from ...detection.inference import Predictor
from ...detection.loop import worker_predictor
from ...detection.stitch import keep_core, owned
from ...detection.tiles import iter_tile_batches, plan_tiles, sample_tiles
from ...detection.tiling import SlideSampler
from ...errors import one_line
from ...io.files import file_sha256
from ...io.slide import open_slide
from ..calibrate import PEAK_FLOOR
from .config import AdaptConfig
from .pseudo_labels import PseudoLabels, block_targets, consistent_labels, paper_labels
from .store import BlockStore, MinedSlide
from .views import predict_views

#: Confident nuclei per mm² of tissue outside this range make a slide suspect (H&E holds ~1 000–10 000).
PLAUSIBLE_HARD_PER_MM2 = (50.0, 20000.0)


class _Reservoir:
    """Algorithm R over a slide's candidate blocks: every candidate equally likely kept, whatever the order."""

    def __init__(self, cap: int, block_px: int, rng: np.random.Generator):
        self.cap, self.rng, self.seen = cap, rng, 0
        self.images = np.zeros((cap, block_px, block_px, 3), np.uint8)
        self.targets = np.zeros((cap, block_px, block_px), np.uint8)
        self.positions = np.zeros((cap, 2))

    def slot(self) -> int | None:
        slot = self.seen if self.seen < self.cap else int(self.rng.integers(self.seen + 1))
        self.seen += 1
        return slot if slot < self.cap else None

    def kept(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = min(self.seen, self.cap)
        return self.images[:n], self.targets[:n], self.positions[:n]


#: Random block centres drawn per tile (consistency recipe); the reservoir keeps a fair share of them.
RANDOM_CENTRES_PER_TILE = 8


def tile_seed(cfg: AdaptConfig, index: int) -> int:
    """The seed of the cohort's `index`-th slide's sampled tiles: mining, calibration and the density check share it."""
    return cfg.seed * 100003 + index


def mine_slide(path: Path, run_cfg: RunConfig, predictor: Predictor, cfg: AdaptConfig, cap: int, seed: int) -> MinedSlide:
    """Pseudo-labelled blocks of one slide: a uniform reservoir sample of at most `cap` over the whole slide (or,
    with `cfg.mine_tiles`, over that many of its tissue tiles drawn at random).

    With the consistency recipe, `random_fraction` of the cap is reserved for blocks at random positions in
    the cores of tissue tiles, labelled by the same rule.
    """
    slide = open_slide(path, run_cfg.mpp)
    try:
        sampler = SlideSampler.for_slide(slide, run_cfg.model_mpp)
        grid, planned, info, mask = plan_tiles(sampler, run_cfg, predictor.geometry)
        # A reservoir of `cap` blocks is full long before a large slide is read: a fair random share of its tissue
        # tiles fills it at a fraction of the cost (the density guard below is judged on the tissue read).
        tiles = (planned if cfg.mine_tiles is None else
                 [planned[i] for i in sample_tiles(len(planned), cfg.mine_tiles, seed)])
        read_share = len(tiles) / max(1, len(planned))
        colours = getattr(predictor, "colours", None)  # a calibrated model aligning each slide: mine what it will see
        colour = slide_colour(sampler, colours, mask) if colours is not None and tiles else None
        rng = np.random.default_rng(seed)
        b, half = cfg.block_px, cfg.block_px // 2
        consistency = cfg.recipe == "consistency"
        n_random = int(round(cap * cfg.random_fraction)) if consistency else 0
        hard_pool, random_pool = _Reservoir(cap - n_random, b, rng), _Reservoir(n_random, b, rng)
        post = run_cfg.postprocessor()
        hard_total = 0

        def take(pool: _Reservoir, img: np.ndarray, labels: PseudoLabels, cx: int, cy: int, origin: tuple[int, int]) -> None:
            top, left = cy - half, cx - half
            if top < 0 or left < 0 or top + b > img.shape[0] or left + b > img.shape[1]:
                return
            slot = pool.slot()
            if slot is None:
                return
            pool.images[slot] = img[top : top + b, left : left + b]
            shifted = PseudoLabels(labels.hard_xy, labels.nuclei_xy - [left, top], labels.unsure_xy - [left, top])
            pool.targets[slot] = block_targets((b, b), shifted, cfg.disk_radius_px)
            pool.positions[slot] = (cx + origin[1], cy + origin[0])

        # Tiles read as a run reads them, ahead of the model; an undecodable one is left out (or, strict, fails the slide).
        for batch in iter_tile_batches(sampler, grid, tiles, run_cfg.batch_size, strict=run_cfg.strict,
                                       io_workers=run_cfg.io_workers):
            reads = [(rc, img if colour is None else colour.apply(img)) for rc, img in zip(batch.read, batch.images)]
            if not reads:
                continue
            stack = np.stack([img for _, img in reads])
            maps = predict_views(predictor, stack, cfg.views if consistency else 1)
            for k, ((r, c), img) in enumerate(reads):
                labels = consistent_labels(maps[:, k], cfg, post) if consistency else paper_labels(maps[0, k], cfg)
                core = grid.core(r, c)
                origin = (core[0] - grid.halo_px, core[1] - grid.halo_px)  # tile image origin on the slide grid
                hard = labels.hard_xy[owned(labels.hard_xy[:, 1] + origin[0], labels.hard_xy[:, 0] + origin[1], core)]
                hard_total += len(hard)  # the others belong to a neighbouring tile
                for hx, hy in hard:
                    take(hard_pool, img, labels, int(round(hx)), int(round(hy)), origin)
                if n_random:
                    ys = rng.integers(core[0], core[2], RANDOM_CENTRES_PER_TILE) - origin[0]
                    xs = rng.integers(core[1], core[3], RANDOM_CENTRES_PER_TILE) - origin[1]
                    for cy, cx in zip(ys, xs):
                        take(random_pool, img, labels, int(cx), int(cy), origin)
        images, targets, positions = (np.concatenate(parts) for parts in zip(hard_pool.kept(), random_pool.kept()))
        centred = np.arange(len(images)) < min(hard_pool.seen, hard_pool.cap)
        mpp = run_cfg.model_mpp
        tissue_mm2 = info.get("tissue_fraction", 1.0) * grid.height_px * grid.width_px * (mpp / 1000) ** 2
        warnings = list(info["warnings"])
        density = hard_total / (tissue_mm2 * read_share) if tissue_mm2 > 0 else 0.0
        if hard_total == 0:
            warnings.append("no confident nuclei (none above the high threshold): nothing to learn from this slide")
            images, targets, positions, centred = images[:0], targets[:0], positions[:0], centred[:0]  # background alone teaches nothing safe
        elif not PLAUSIBLE_HARD_PER_MM2[0] <= density <= PLAUSIBLE_HARD_PER_MM2[1]:
            warnings.append(f"implausible number of confident nuclei ({density:.0f} per mm² of tissue): "
                            "is this H&E? its pseudo-labels may teach the model wrong things")
        return MinedSlide(images, targets, positions, centred, hard_total, round(tissue_mm2, 4), warnings)
    finally:
        slide.close()


def _sampled_tiles(path: Path, run_cfg: RunConfig, geometry, k: int, seed: int):
    """(grid, (row, col), tile image) for up to `k` random tissue tiles of a slide (`sample_tiles` of the run's plan,
    read as a run reads them, one at a time as asked for; an undecodable one is left out); the slide is closed after."""
    slide = open_slide(path, run_cfg.mpp)
    try:
        sampler = SlideSampler.for_slide(slide, run_cfg.model_mpp)
        grid, tiles, _, _ = plan_tiles(sampler, run_cfg, geometry)
        chosen = [tiles[index] for index in sample_tiles(len(tiles), k, seed)]
        for batch in iter_tile_batches(sampler, grid, chosen, 1, strict=run_cfg.strict, prefetch=0):
            for rc, img in zip(batch.read, batch.images):
                yield grid, rc, img
    finally:
        slide.close()


def _peaks_of_tiles(path: Path, run_cfg: RunConfig, predictor: Predictor, k: int, seed: int,
                    colour: ColourStats | None = None, aligned: SlideColour | None = None) -> tuple[np.ndarray, int]:
    """Confidences of the candidate peaks (>= PEAK_FLOOR) owned by up to `k` random tissue tiles of a slide, and
    how many tiles that was; `colour`, when given, takes the same tiles' colour moments on the same read;
    `aligned` is the slide's colour transform, applied to the tiles as a run would."""
    rule = dataclasses.replace(run_cfg.postprocessor(), threshold=PEAK_FLOOR)
    peaks = [np.zeros(0, np.float32)]
    for grid, (r, col), img in _sampled_tiles(path, run_cfg, predictor.geometry, k, seed):
        if colour is not None:
            colour.add(img)
        x = aligned.apply(img[None]) if aligned is not None else img[None]
        peaks.append(keep_core(rule(predictor(x)[0]), grid, r, col)[2])  # the confidences of its own peaks
    return np.concatenate(peaks), len(peaks) - 1


def _mine_cohort(inputs: list[Path], run_cfg: RunConfig, cfg: AdaptConfig, predictor: Predictor, work_dir: Path,
                 echo: Callable[[str], None], client) -> tuple["BlockStore", float]:
    """Every slide not yet in the block store, mined and appended (one bad slide is named and skipped)."""
    store = BlockStore(work_dir / "blocks.zarr", cfg.block_px, cfg.recipe)
    cap = cfg.per_slide_cap or max(1, cfg.max_blocks // max(1, len(inputs)))
    t0 = time.perf_counter()
    todo = []
    for i, path in enumerate(inputs):
        sha = file_sha256(path)
        done = store.finished(sha)
        if done is not None:
            echo(f"{path}: already mined ({done['blocks']} blocks); skipped")
            continue
        todo.append((i, path, sha))

    def record(path: Path, sha: str, mined: MinedSlide) -> None:
        room = max(0, cfg.max_blocks - len(store))
        if len(mined.images) > room:
            keep = np.sort(np.random.default_rng([cfg.seed, len(store.slides)]).choice(len(mined.images), room, replace=False))
            mined = MinedSlide(mined.images[keep], mined.targets[keep], mined.positions[keep], mined.centred[keep], mined.hard_positives,
                               mined.tissue_mm2, mined.warnings)
        store.add({"path": str(path), "sha256": sha, "hard_positives": mined.hard_positives,
                   "tissue_mm2": mined.tissue_mm2, "warnings": mined.warnings}, mined)
        echo(f"{path}: {mined.hard_positives} confident nuclei, {len(mined.images)} blocks kept "
             f"({int(mined.centred.sum())} centred on one, {int((~mined.centred).sum())} at random tissue positions)")
        for warning in mined.warnings:
            echo(f"{path}: warning: {warning}")

    if client is None:
        for i, path, sha in todo:
            try:
                mined = mine_slide(path, run_cfg, predictor, cfg, cap, seed=tile_seed(cfg, i))
            except Exception as exc:  # one bad slide must not stop the cohort
                echo(one_line(exc, path))
                continue
            record(path, sha, mined)
    else:
        from distributed import as_completed  # lazy: importing distributed takes seconds; only a dask client needs it

        def remote(path, i):
            return mine_slide(path, run_cfg, worker_predictor(str(predictor.model_path), run_cfg.precision, run_cfg.engine), cfg, cap, seed=tile_seed(cfg, i))

        futures = {client.submit(remote, path, i, pure=False): (path, sha) for i, path, sha in todo}
        for future in as_completed(futures):
            path, sha = futures[future]
            try:
                mined = future.result()
            except Exception as exc:
                echo(one_line(exc, path))
                continue
            record(path, sha, mined)
    return store, time.perf_counter() - t0
