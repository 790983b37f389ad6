"""Unsupervised domain adaptation over a whole cohort: calibrate the model to it, optionally fine-tune on pseudo-labels.

Three recipes share the lazy tiling, tissue mask and resume of `run`:

- ``calibrate`` (default): confidence re-calibration to the cohort (and, with `colour`, colour alignment),
  folded into the weights (`wsiproc.learn.calibrate`); no fine-tuning. A cohort whose confidences look like a
  training domain's leaves the model unchanged, so adapting "just in case" cannot hurt; a lab where they sink
  gets a lower threshold. Measured in benchmarks/results/adaptation/: the only recipe with no harm anywhere.
- ``consistency``: calibrate, then mine pseudo-labelled blocks and fine-tune on them. Every tile is predicted
  under four views (as is, flipped left–right, flipped up–down, turned half way) and the views' maps are
  averaged. A candidate nucleus (a peak of the averaged map, found with the run's post-processing) becomes a
  pseudo-nucleus only when its averaged confidence reaches `low` *and* every view finds it; blocks are centred
  on pseudo-nuclei reaching `high`, plus a share at random tissue positions, so the new domain's background
  (stroma, debris, pigment) is learnt too. Unsure candidates (averaged confidence between `ignore_below` and
  `low`, or missed by a view) are neither taught as nucleus nor as background: their disk weighs 0 in the loss.
- ``paper`` (the paper's §UDA, kept for reproduction): components above the high threshold (0.8) are hard
  positives; around each, a 64 × 64 block at 0.5 µm/px whose target is every low-threshold (0.5) component
  drawn as a disk. Everything else in the block is taught as background. No calibration.

Mined blocks are sampled fairly (a reservoir per slide and kind, so a cap takes blocks from all over the slide,
not its first tiles) and appended slide by slide to a zarr store; the store's attributes say which slides are
finished, so a rerun continues where it stopped and memory holds at most one slide's reservoir.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from ..config import RunConfig
from ..errors import one_line
from ..detection.inference import Predictor
from ..io.files import file_sha256
from ..detection.colour import MIN_TISSUE_PIXELS, DomainColours, SlideColour, slide_colour
from ..detection.loop import batched, plan_tiles, read_tile, worker_predictor
from ..detection.postprocess import Postprocess, find_nuclei
from .calibrate import (PEAK_FLOOR, Calibration, ColourStats, Reference, colour_transform, fold_colour,
                        fold_threshold, recalibrated_threshold, sample_tiles, share_reaching)
from ..io.slide import open_slide
from ..detection.stitch import keep_core, owned
from ..detection.tiling import SlideSampler, halo_tiles
from .training import TrainConfig, augment_block, draw_targets, flip_turn

#: Confident nuclei per mm² of tissue outside this range make a slide suspect (H&E holds ~1 000–10 000).
PLAUSIBLE_HARD_PER_MM2 = (50.0, 20000.0)


RECIPES = ("calibrate", "consistency", "paper")

#: Block target values in the store: background, nucleus, and "unsure" (weight 0 in the loss).
BACKGROUND, NUCLEUS, UNSURE = 0, 1, 2


@dataclass
class AdaptConfig:
    recipe: str = "calibrate"  # calibrate | consistency (calibrate, then pseudo-label fine-tuning) | paper (§UDA)
    align: bool = True  # consistency: calibrate first (wsiproc.learn.calibrate)
    colour: bool = False  # calibration also aligns the cohort's colours (measured: helps one lab, hurts others)
    slide_colours: bool = True  # calibration: a cohort judged foreign gets per-slide colour alignment (detection.colour)
    calibration_tiles: int = 8  # tiles per slide sampled for the cohort's colour and confidence statistics
    high: float = 0.8
    low: float = 0.5
    views: int = 4  # consistency: test-time views averaged and required to agree (1..4)
    ignore_below: float = 0.3  # consistency: candidates from here up to `low` are unsure, not background
    random_fraction: float = 0.33  # consistency: share of blocks at random tissue positions
    block_px: int = 64
    max_blocks: int = 20000
    per_slide_cap: int | None = None  # None: max_blocks spread evenly over the cohort
    epochs: int = 2
    steps_per_epoch: int | None = None  # None: one pass over the mined blocks per epoch
    batch_size: int = 16
    learning_rate: float = 1e-4
    seed: int = 0
    disk_radius_px: int = TrainConfig.disk_radius_px  # targets as in training: one disk per nucleus

    def validate(self) -> "AdaptConfig":
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)} (got {self.recipe!r})")
        if not 0 < self.low <= self.high < 1:
            raise ValueError(f"thresholds must satisfy 0 < low <= high < 1 (got low {self.low}, high {self.high})")
        if not 0 < self.ignore_below <= self.low:
            raise ValueError(f"ignore_below must satisfy 0 < ignore_below <= low (got {self.ignore_below})")
        if not 1 <= self.views <= len(VIEWS):
            raise ValueError(f"views must be 1..{len(VIEWS)} (got {self.views})")
        if not 0 <= self.random_fraction <= 1:
            raise ValueError(f"random_fraction must be in [0, 1] (got {self.random_fraction})")
        if self.block_px % 4 or self.block_px < 16 or self.block_px > 64:
            raise ValueError(f"block_px must be a multiple of 4 in 16..64 (the tile halo is 32 px), got {self.block_px}")
        if self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 (got {self.max_blocks})")
        if self.calibration_tiles < 1:
            raise ValueError(f"calibration_tiles must be >= 1 (got {self.calibration_tiles})")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0: calibration only, no fine-tuning; got {self.epochs})")
        return self

    @property
    def aligns(self) -> bool:
        """The paper's recipe stays the paper's: no calibration before it."""
        return self.recipe == "calibrate" or (self.align and self.recipe != "paper")

    @property
    def fine_tunes(self) -> bool:
        return self.recipe != "calibrate" and self.epochs > 0


def _as_is(a: np.ndarray) -> np.ndarray:
    return a


#: Test-time views of a batch (n, y, x[, c]); each is its own inverse, and none needs a square tile.
VIEWS: tuple[Callable[[np.ndarray], np.ndarray], ...] = (
    _as_is, lambda a: a[:, :, ::-1], lambda a: a[:, ::-1, :], lambda a: a[:, ::-1, ::-1])


def predict_views(predictor: Callable[[np.ndarray], np.ndarray], tiles: np.ndarray, views: int) -> np.ndarray:
    """Confidence maps (views, n, y, x) of a batch of tiles under the first `views` views, mapped back."""
    return np.stack([np.ascontiguousarray(view(predictor(np.ascontiguousarray(view(tiles))))) for view in VIEWS[:views]])


@dataclass
class PseudoLabels:
    """One tile's pseudo-labels, in its pixel-index coordinates (x = column, y = row)."""

    hard_xy: np.ndarray  # (n, 2) block centres: confident nuclei
    nuclei_xy: np.ndarray  # (m, 2) drawn as disks into every block's target
    unsure_xy: np.ndarray  # (k, 2) disks of weight 0: neither nucleus nor background


def paper_labels(conf: np.ndarray, cfg: AdaptConfig) -> PseudoLabels:
    """The paper's rule on one map: hard positives above `high`, targets above `low` (components)."""
    hard, low = find_nuclei(conf, cfg.high), find_nuclei(conf, cfg.low)
    return PseudoLabels(np.stack([hard.x, hard.y], 1), np.stack([low.x, low.y], 1), np.zeros((0, 2)))


def consistent_labels(maps: np.ndarray, cfg: AdaptConfig, post: Postprocess) -> PseudoLabels:
    """Consistency over confidence: pseudo-nuclei are peaks of the views' mean map that every view also finds.

    A view "finds" a candidate when its own map exceeds `low` within one pixel of the candidate's peak.
    """
    mean = maps.mean(axis=0)
    found = dataclasses.replace(post, threshold=cfg.ignore_below)(mean)
    xy = np.stack([found.x, found.y], 1)
    if len(found) == 0:
        return PseudoLabels(xy, xy, xy)
    near = ndimage.maximum_filter(maps, size=(1, 3, 3), mode="nearest")  # within one pixel of the peak
    rows = np.clip(np.round(found.y).astype(int), 0, mean.shape[0] - 1)
    cols = np.clip(np.round(found.x).astype(int), 0, mean.shape[1] - 1)
    agree = (near[:, rows, cols] > cfg.low).all(axis=0)
    nucleus = agree & (found.confidence >= cfg.low)
    hard = nucleus & (found.confidence >= cfg.high)
    return PseudoLabels(xy[hard], xy[nucleus], xy[~nucleus])


def block_targets(shape_hw: tuple[int, int], labels: PseudoLabels, radius_px: int) -> np.ndarray:
    """uint8 target of a block: NUCLEUS disks, UNSURE disks (one pixel wider) where no nucleus is, else BACKGROUND."""
    target = np.full(shape_hw, BACKGROUND, np.uint8)
    if len(labels.unsure_xy):
        target[draw_targets(shape_hw, labels.unsure_xy, radius_px=radius_px + 1)] = UNSURE
    target[draw_targets(shape_hw, labels.nuclei_xy, radius_px=radius_px)] = NUCLEUS
    return target


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


@dataclass
class MinedSlide:
    images: np.ndarray  # (n, b, b, 3) uint8
    targets: np.ndarray  # (n, b, b) uint8: BACKGROUND, NUCLEUS or UNSURE
    positions: np.ndarray  # (n, 2) block centre x, y at 0.5 µm/px
    centred: np.ndarray  # (n,) bool: centred on a confident nucleus (else at a random tissue position)
    hard_positives: int
    tissue_mm2: float
    warnings: list[str] = field(default_factory=list)


def mine_slide(path: Path, run_cfg: RunConfig, predictor: Predictor, cfg: AdaptConfig, cap: int, seed: int) -> MinedSlide:
    """Pseudo-labelled blocks of one slide: a uniform reservoir sample of at most `cap` over the whole slide.

    With the consistency recipe, `random_fraction` of the cap is reserved for blocks at random positions in
    the cores of tissue tiles, labelled by the same rule.
    """
    slide = open_slide(path, run_cfg.mpp)
    try:
        sampler = SlideSampler.for_slide(slide, run_cfg.model_mpp)
        grid, tiles, info, mask = plan_tiles(sampler, run_cfg, getattr(predictor, "geometry", None))
        blocks = halo_tiles(sampler, grid)
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

        for batch in batched(tiles, run_cfg.batch_size):
            reads = [(rc, read_tile(blocks, rc, run_cfg.strict, slide.path)[0]) for rc in batch]
            reads = [(rc, img if colour is None else colour.apply(img)) for rc, img in reads if img is not None]
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
        density = hard_total / tissue_mm2 if tissue_mm2 > 0 else 0.0
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
    """(grid, (row, col), tile image) for up to `k` random tissue tiles of a slide; the slide is closed after."""
    slide = open_slide(path, run_cfg.mpp)
    try:
        sampler = SlideSampler.for_slide(slide, run_cfg.model_mpp)
        grid, tiles, _, _ = plan_tiles(sampler, run_cfg, geometry)
        blocks = halo_tiles(sampler, grid)
        for index in sample_tiles(len(tiles), k, seed):
            img = read_tile(blocks, tiles[index], run_cfg.strict, slide.path)[0]
            if img is not None:
                yield grid, tiles[index], img
    finally:
        slide.close()


def _peaks_of_tiles(path: Path, run_cfg: RunConfig, predictor: Predictor, k: int, seed: int,
                    colour: ColourStats | None = None, aligned: SlideColour | None = None) -> tuple[np.ndarray, int]:
    """Confidences of the candidate peaks (>= PEAK_FLOOR) owned by up to `k` random tissue tiles of a slide, and
    how many tiles that was; `colour`, when given, takes the same tiles' colour moments on the same read;
    `aligned` is the slide's colour transform, applied to the tiles as a run would."""
    rule = dataclasses.replace(run_cfg.postprocessor(), threshold=PEAK_FLOOR)
    peaks = [np.zeros(0, np.float32)]
    for grid, (r, col), img in _sampled_tiles(path, run_cfg, getattr(predictor, "geometry", None), k, seed):
        if colour is not None:
            colour.add(img)
        x = aligned.apply(img[None]) if aligned is not None else img[None]
        peaks.append(keep_core(rule(predictor(x)[0]), grid, r, col)[2])  # the confidences of its own peaks
    return np.concatenate(peaks), len(peaks) - 1


def _slide_colour_of(path: Path, run_cfg: RunConfig, colours: DomainColours) -> SlideColour | None:
    """A slide's colour transform exactly as `detect` computes it in a run."""
    slide = open_slide(path, run_cfg.mpp)
    try:
        return slide_colour(SlideSampler.for_slide(slide, run_cfg.model_mpp), colours)
    finally:
        slide.close()


def measure_reference(domains: dict[str, tuple[list[Path], float]], predictor: Predictor, run_cfg: RunConfig,
                      tiles_per_image: int = 64, seed: int = 0) -> Reference:
    """A model's `Reference` from its training domains ({name: (image paths, µm/px)}): what calibration aims at."""
    colour, shares, per_domain = ColourStats(), {}, {}
    for name, (paths, mpp) in domains.items():
        cfg = dataclasses.replace(run_cfg, mpp=mpp)
        peaks, own = [], ColourStats()
        for i, path in enumerate(paths):
            peaks.append(_peaks_of_tiles(path, cfg, predictor, tiles_per_image, seed + i, own)[0])
        shares[name] = round(share_reaching(np.concatenate(peaks)), 4)
        per_domain[name] = {"mean_rgb": own.mean.round(6).tolist(), "cov_rgb": own.cov.round(8).tolist()}
        colour = colour.merged(own)
    return Reference(colour.mean.round(6).tolist(), colour.cov.round(8).tolist(), shares, str(predictor.model_path),
                     per_domain)


def calibrate_cohort(inputs: list[Path], run_cfg: RunConfig, predictor: Predictor, reference: Reference, cfg: AdaptConfig,
                     work_dir: Path, echo: Callable[[str], None] = print) -> tuple[Calibration, Path] | None:
    """Confidence re-calibration (and, with `colour`, colour alignment) of the base model for this cohort.

    `calibration_tiles` random tissue tiles per slide: their colour moments guard against a cohort without tissue
    and (with `cfg.colour`) give the colour transform; the (aligned) model's candidate peaks on them give the
    threshold (`wsiproc.learn.calibrate`). One read of the tiles, two with colour alignment. A cohort whose share
    leaves the training range gets per-slide colours (`cfg.slide_colours`, a reference with domain colours): each
    slide's transform measured as a run will (`detection.colour.slide_colour`), the tiles read again and aligned,
    the threshold judged on them, and `aligned.colours.json` beside the model. The result is
    `work_dir/aligned.keras` and `calibration.json` (reused on a rerun); None, with a line saying why, when the
    sampled tiles hold too little tissue to judge colours by.
    """
    from ..detection.model import load_model, save_model

    record, aligned = work_dir / "calibration.json", work_dir / "aligned.keras"
    if record.is_file() and aligned.is_file():
        echo(f"{aligned}: cohort calibration already done; reused")
        return Calibration(**json.loads(record.read_text())), aligned
    geometry = getattr(predictor, "geometry", None)
    seeds = [cfg.seed * 100003 + i for i in range(len(inputs))]
    # Without colour alignment one read of the sampled tiles gives both the colour guard and the peaks; with it,
    # the peaks must come from the aligned model, so the colours are read first.
    colour, readable, per_slide = ColourStats(), [], []
    for path, seed in zip(inputs, seeds):
        try:
            if cfg.colour:
                for _, _, img in _sampled_tiles(path, run_cfg, geometry, cfg.calibration_tiles, seed):
                    colour.add(img)
            else:
                per_slide.append(_peaks_of_tiles(path, run_cfg, predictor, cfg.calibration_tiles, seed, colour))
            readable.append((path, seed))
        except Exception as exc:  # one bad slide must not stop the cohort; mining will name it again
            echo(one_line(exc, path))
    if colour.n < MIN_TISSUE_PIXELS:
        echo(f"cohort calibration skipped: {colour.n} tissue pixels in the sampled tiles (fewer than {MIN_TISSUE_PIXELS})")
        return None
    a, c = colour_transform(colour, reference) if cfg.colour else (np.eye(3), np.zeros(3))
    model = load_model(predictor.model_path)
    if cfg.colour:
        fold_colour(model, a, c)
        save_model(model, work_dir / "aligned_colour.keras")
        aligned_colour = Predictor(work_dir / "aligned_colour.keras", precision=run_cfg.precision, engine=run_cfg.engine)
        per_slide = [_peaks_of_tiles(path, run_cfg, aligned_colour, cfg.calibration_tiles, seed) for path, seed in readable]
    peaks = np.concatenate([p for p, _ in per_slide] or [np.zeros(0)])
    n_tiles = sum(n for _, n in per_slide)
    threshold, share = recalibrated_threshold(peaks, reference)
    colours_file, slide_colours = DomainColours.beside(aligned), {}
    colours_file.unlink(missing_ok=True)
    if threshold != 0.5 and cfg.slide_colours and not cfg.colour and reference.domain_colours:
        # A foreign cohort: align each slide to its nearest training domain, then judge the confidences again.
        echo(f"cohort judged foreign ({share:.0%} of candidate peaks reach 0.5): each slide's colours are aligned "
             f"to the nearest of the model's training domains ({', '.join(reference.domain_colours)})")
        colours = DomainColours(reference.domain_colours, cfg.calibration_tiles, cfg.seed, reference.source)
        per_slide = []
        for path, seed in readable:
            slide_colours[str(path)] = sc = _slide_colour_of(path, run_cfg, colours)
            per_slide.append(_peaks_of_tiles(path, run_cfg, predictor, cfg.calibration_tiles, seed, aligned=sc))
        peaks = np.concatenate([p for p, _ in per_slide] or [np.zeros(0)])
        threshold, share = recalibrated_threshold(peaks, reference)
        slide_colours = {k: v.to_dict() if v is not None else None for k, v in slide_colours.items()}
    fold_threshold(model, threshold)
    save_model(model, aligned)
    if slide_colours:
        colours.save(colours_file)
    calibration = Calibration(a.tolist(), c.tolist(), colour.mean.tolist(), colour.n, round(threshold, 4),
                              round(share, 4), reference.share_range, n_tiles, int((peaks >= PEAK_FLOOR).sum()),
                              slide_colours)
    from ..io.files import atomic_write_text

    atomic_write_text(record, json.dumps(asdict(calibration), indent=1))
    colour_note = ("colours aligned to the model's training images" if cfg.colour else
                   "each slide's colours aligned to its nearest training domain" if slide_colours else "colours as they are")
    echo(f"cohort calibration ({colour_note}; {colour.n} tissue pixels from {n_tiles} tiles): "
         f"{share:.0%} of candidate peaks reach 0.5 (training domains: {reference.share_range[0]:.0%}–{reference.share_range[1]:.0%}) "
         f"-> threshold {threshold:.2f} folded into the model")
    return calibration, aligned


class BlockStore:
    """The mined blocks of a cohort in a zarr group: images, targets, slide of origin, position, and progress."""

    def __init__(self, root: Path, block_px: int, recipe: str = "consistency"):
        import zarr

        self.root = Path(root)
        self.group = zarr.open_group(str(self.root), mode="a")
        b = block_px
        specs = {"images": ((0, b, b, 3), (256, b, b, 3), "uint8"), "targets": ((0, b, b), (256, b, b), "uint8"),
                 "slide": ((0,), (4096,), "int32"), "position": ((0, 2), (4096, 2), "float64"),
                 "centred": ((0,), (4096,), "bool")}
        for name, (shape, chunks, dtype) in specs.items():
            if name not in self.group:
                self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype)
        if "slides" not in self.group.attrs:
            self.group.attrs.update({"slides": [], "block_px": b, "recipe": recipe})
        if self.group.attrs["block_px"] != b:
            raise ValueError(f"{self.root}: holds {self.group.attrs['block_px']} px blocks, not {b} px; use another --work folder")
        if self.group.attrs.get("recipe") != recipe:
            raise ValueError(f"{self.root}: holds blocks of the {self.group.attrs.get('recipe')!r} recipe, not {recipe!r}; "
                             "use another --work folder")
        # Blocks appended after the last committed slide belong to a slide interrupted mid-append: drop them.
        committed = self.committed_blocks
        for name in specs:
            arr = self.group[name]
            if arr.shape[0] != committed:
                arr.resize((committed, *arr.shape[1:]))

    @property
    def slides(self) -> list[dict]:
        return list(self.group.attrs["slides"])

    @property
    def committed_blocks(self) -> int:
        return int(sum(s["blocks"] for s in self.slides))

    def finished(self, sha256: str) -> dict | None:
        return next((s for s in self.slides if s["sha256"] == sha256), None)

    def add(self, entry: dict, mined: MinedSlide) -> None:
        index = len(self.slides)
        n = len(mined.images)
        for name, data in (("images", mined.images), ("targets", mined.targets),
                           ("slide", np.full(n, index, np.int32)), ("position", mined.positions), ("centred", mined.centred)):
            if n:
                self.group[name].append(data, axis=0)
        self.group.attrs["slides"] = [*self.slides, {**entry, "blocks": n}]  # the commit point

    def __len__(self) -> int:
        return self.committed_blocks


class StoreSampler:
    """Seeded training batches from the block store, with the paper's augmentation in thirds.

    Yields (images, targets, weights): UNSURE pixels get weight 0, so they teach neither way.
    """

    def __init__(self, store: BlockStore, cfg: TrainConfig):
        self.store, self.cfg = store, cfg
        self.n = len(store)
        if self.n == 0:
            raise ValueError("no mined blocks")

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, epoch, index])
        picks = np.sort(rng.integers(0, self.n, self.cfg.batch_size))
        images = self.store.group["images"].get_orthogonal_selection((picks,))
        targets = self.store.group["targets"].get_orthogonal_selection((picks,))
        x = np.empty((len(picks), *images.shape[1:]), np.float32)
        y = np.empty((len(picks), *targets.shape[1:], 1), np.float32)
        w = np.empty((len(picks), *targets.shape[1:]), np.float32)
        for k in range(len(picks)):
            block, target = flip_turn(images[k].astype(np.float32) / 255.0, targets[k], rng)
            x[k] = augment_block(block, k % 3, rng, self.cfg)
            y[k, ..., 0] = target == NUCLEUS
            w[k] = target != UNSURE
        return x, y, w

    def default_steps_per_epoch(self) -> int:
        return max(1, -(-self.n // self.cfg.batch_size))


def adapt(inputs: list[Path], out_path: Path, work_dir: Path, run_cfg: RunConfig, cfg: AdaptConfig,
          predictor: Predictor, echo: Callable[[str], None] = print, client=None, reference: Reference | None = None) -> dict:
    """Calibrate to the cohort; then (consistency, paper) mine it, resuming, and fine-tune; save with provenance.

    `reference`: the base model's training statistics; by default `<model>.reference.json` beside it. Without
    one the calibration is skipped, with a line saying so (and `calibrate` has nothing to do: an error).
    `epochs=0` stops after the calibration whatever the recipe.
    """
    cfg.validate()
    if getattr(predictor, "colours", None) is not None:
        raise ValueError(f"{predictor.model_path}: this model aligns each slide's colours ({predictor.colours_path.name}); "
                         "adapt the model it was adapted from instead")
    work_dir.mkdir(parents=True, exist_ok=True)
    base, calibration, t_cal = predictor, None, time.perf_counter()
    if cfg.aligns:
        if reference is None and Reference.beside(base.model_path).is_file():
            reference = Reference.load(Reference.beside(base.model_path))
        if reference is None:
            echo(f"{base.model_path}: no {Reference.beside(base.model_path).name} beside the model: colours and "
                 "confidences are not calibrated to the cohort")
        else:
            calibrated = calibrate_cohort(inputs, run_cfg, base, reference, cfg, work_dir, echo)
            if calibrated is not None:
                calibration, aligned = calibrated
                predictor = Predictor(aligned, precision=run_cfg.precision, engine=run_cfg.engine)
    calibration_s = time.perf_counter() - t_cal
    if not cfg.fine_tunes:
        if calibration is None:
            raise ValueError("nothing to adapt: calibration needs the base model's reference statistics "
                             f"({Reference.beside(base.model_path).name}, or --reference) and a cohort with tissue")
        from ..detection.model import load_model, save_model

        save_model(load_model(predictor.model_path), out_path)
        _place_colours(predictor, out_path)
        cohort = [{"path": str(p), "sha256": file_sha256(p)} for p in inputs]
        return _write_provenance(out_path, base, cfg, run_cfg, calibration, calibration_s, cohort)
    store, mining_s = _mine_cohort(inputs, run_cfg, cfg, predictor, work_dir, echo, client)
    if len(store) == 0:
        raise ValueError("no confident nuclei were found in any slide of the cohort: nothing to adapt on "
                         "(is the cohort H&E? is the base model right for it?)")
    from .trainer import train

    train_cfg = TrainConfig(block_px=cfg.block_px, batch_size=cfg.batch_size, epochs=cfg.epochs,
                            steps_per_epoch=cfg.steps_per_epoch, learning_rate=cfg.learning_rate, seed=cfg.seed,
                            disk_radius_px=cfg.disk_radius_px)
    t1 = time.perf_counter()
    state = train(StoreSampler(store, train_cfg), out_path, train_cfg, checkpoint_dir=work_dir / "checkpoints",
                  init_model=predictor.model_path, verbose=2)
    _place_colours(predictor, out_path)  # the blocks were mined aligned: the fine-tuned model aligns the same way
    cohort = [{k: s[k] for k in ("path", "sha256", "hard_positives", "blocks", "tissue_mm2", "warnings")} for s in store.slides]
    return _write_provenance(out_path, base, cfg, run_cfg, calibration, calibration_s, cohort, {
        "blocks": len(store),
        "training": {"epochs": state["epoch"], "history": state["history"], "seconds": round(state["seconds"], 1)},
        "mining_s": round(mining_s, 1),
        "fine_tune_s": round(time.perf_counter() - t1, 1),
    })


def _place_colours(predictor: Predictor, out_path: Path) -> None:
    """The adapted model's `<out>.colours.json` when calibration asked for per-slide alignment; a stale one from an
    earlier adapt to the same path is removed, so that a run never aligns for a model that did not ask for it."""
    target = DomainColours.beside(out_path)
    if predictor.colours is not None:
        predictor.colours.save(target)
    else:
        target.unlink(missing_ok=True)


def _write_provenance(out_path: Path, base: Predictor, cfg: AdaptConfig, run_cfg: RunConfig, calibration: Calibration | None,
                      calibration_s: float, cohort: list[dict], fine_tuning: dict | None = None) -> dict:
    """`<out>.json` beside the adapted model: base, cohort, recipe and every parameter, what calibration did."""
    from ..io.files import atomic_write_text

    provenance = {
        "base_model": {"path": str(base.model_path), "sha256": base.sha256},
        "adapted_model_sha256": file_sha256(out_path),
        "colour_alignment": (str(DomainColours.beside(out_path)) if DomainColours.beside(out_path).is_file() else None),
        "cohort": cohort,
        "recipe": cfg.recipe,
        "thresholds": {"high": cfg.high, "low": cfg.low},
        "calibration": asdict(calibration) if calibration else None,
        "calibration_s": round(calibration_s, 1),
        "adapt_config": asdict(cfg),
        "run_config": run_cfg.to_dict(),
        "blocks": 0, "training": None, "mining_s": 0.0, "fine_tune_s": 0.0,
        **(fine_tuning or {}),
    }
    atomic_write_text(out_path.with_suffix(".json"), json.dumps(provenance, indent=2, sort_keys=True))
    return provenance


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
                mined = mine_slide(path, run_cfg, predictor, cfg, cap, seed=cfg.seed * 100003 + i)
            except Exception as exc:  # one bad slide must not stop the cohort
                echo(one_line(exc, path))
                continue
            record(path, sha, mined)
    else:
        from distributed import as_completed

        def remote(path, i):
            return mine_slide(path, run_cfg, worker_predictor(str(predictor.model_path), run_cfg.precision, run_cfg.engine), cfg, cap, seed=cfg.seed * 100003 + i)

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
