"""Unsupervised domain adaptation over a whole cohort: mine confident nuclei, fine-tune on them (the paper's §UDA).

For every slide, with the same lazy tiling and tissue mask as `run`: components above the high threshold
(0.8) are hard positives; around each, a 64 × 64 block at 0.5 µm/px whose target is every low-threshold
(0.5) detection in the block drawn as a disk of 4 px. Blocks are sampled fairly (a reservoir per slide, so
a cap takes blocks from all over the slide, not its first tiles) and appended slide by slide to a zarr
store; the store's attributes say which slides are finished, so a rerun continues where it stopped and
memory holds at most one slide's reservoir whatever the cohort size.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import RunConfig
from ..errors import one_line
from ..detection.inference import Predictor
from ..io.files import file_sha256
from ..detection.loop import batched, plan_tiles, read_tile, worker_predictor
from ..detection.postprocess import find_nuclei
from ..io.slide import open_slide
from ..detection.stitch import owned
from ..detection.tiling import SlideSampler, halo_tiles
from .training import TrainConfig, augment_block, draw_targets, flip_turn

#: Confident nuclei per mm² of tissue outside this range make a slide suspect (H&E holds ~1 000–10 000).
PLAUSIBLE_HARD_PER_MM2 = (50.0, 20000.0)


@dataclass
class AdaptConfig:
    high: float = 0.8
    low: float = 0.5
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
        if not 0 < self.low <= self.high < 1:
            raise ValueError(f"thresholds must satisfy 0 < low <= high < 1 (got low {self.low}, high {self.high})")
        if self.block_px % 4 or self.block_px < 16 or self.block_px > 64:
            raise ValueError(f"block_px must be a multiple of 4 in 16..64 (the tile halo is 32 px), got {self.block_px}")
        if self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 (got {self.max_blocks})")
        return self


@dataclass
class MinedSlide:
    images: np.ndarray  # (n, b, b, 3) uint8
    masks: np.ndarray  # (n, b, b) bool
    positions: np.ndarray  # (n, 2) block centre x, y at 0.5 µm/px
    hard_positives: int
    tissue_mm2: float
    warnings: list[str] = field(default_factory=list)


def mine_slide(path: Path, run_cfg: RunConfig, predictor: Predictor, cfg: AdaptConfig, cap: int, seed: int) -> MinedSlide:
    """Hard-positive blocks of one slide: a uniform reservoir sample of at most `cap` over the whole slide."""
    slide = open_slide(path, run_cfg.mpp)
    try:
        sampler = SlideSampler.for_slide(slide, run_cfg.model_mpp)
        grid, tiles, info, _ = plan_tiles(sampler, run_cfg, getattr(predictor, "geometry", None))
        blocks = halo_tiles(sampler, grid)
        rng = np.random.default_rng(seed)
        half = cfg.block_px // 2
        b = cfg.block_px
        images = np.zeros((cap, b, b, 3), np.uint8)
        masks = np.zeros((cap, b, b), bool)
        positions = np.zeros((cap, 2))
        seen = 0
        for batch in batched(tiles, run_cfg.batch_size):
            reads = [(rc, read_tile(blocks, rc, run_cfg.strict, slide.path)[0]) for rc in batch]
            reads = [(rc, img) for rc, img in reads if img is not None]
            if not reads:
                continue
            conf = predictor(np.stack([img for _, img in reads]))
            for ((r, c), img), tile_conf in zip(reads, conf):
                hard = find_nuclei(tile_conf, cfg.high)
                low = find_nuclei(tile_conf, cfg.low)
                core = grid.core(r, c)
                oy, ox = core[0] - grid.halo_px, core[1] - grid.halo_px  # tile image origin on the slide grid
                low_xy = np.stack([low.x, low.y], axis=1)
                mine = owned(hard.y + oy, hard.x + ox, core)  # the others belong to a neighbouring tile
                for hy, hx in zip(hard.y[mine], hard.x[mine]):
                    cy, cx = int(round(hy)), int(round(hx))
                    top, left = cy - half, cx - half
                    if top < 0 or left < 0 or top + b > img.shape[0] or left + b > img.shape[1]:
                        continue
                    # Reservoir sampling (Algorithm R): every hard positive of the slide equally likely kept.
                    slot = seen if seen < cap else int(rng.integers(seen + 1))
                    seen += 1
                    if slot >= cap:
                        continue
                    images[slot] = img[top : top + b, left : left + b]
                    masks[slot] = draw_targets((b, b), low_xy - [left, top], radius_px=cfg.disk_radius_px)
                    positions[slot] = (cx + ox, cy + oy)
        n = min(seen, cap)
        mpp = run_cfg.model_mpp
        tissue_mm2 = info.get("tissue_fraction", 1.0) * grid.height_px * grid.width_px * (mpp / 1000) ** 2
        warnings = list(info["warnings"])
        density = seen / tissue_mm2 if tissue_mm2 > 0 else 0.0
        if seen == 0:
            warnings.append("no confident nuclei (none above the high threshold): nothing to learn from this slide")
        elif not PLAUSIBLE_HARD_PER_MM2[0] <= density <= PLAUSIBLE_HARD_PER_MM2[1]:
            warnings.append(f"implausible number of confident nuclei ({density:.0f} per mm² of tissue): "
                            "is this H&E? its pseudo-labels may teach the model wrong things")
        return MinedSlide(images[:n], masks[:n], positions[:n], seen, round(tissue_mm2, 4), warnings)
    finally:
        slide.close()


class BlockStore:
    """The mined blocks of a cohort in a zarr group: images, masks, slide of origin, position, and progress."""

    def __init__(self, root: Path, block_px: int):
        import zarr

        self.root = Path(root)
        self.group = zarr.open_group(str(self.root), mode="a")
        b = block_px
        specs = {"images": ((0, b, b, 3), (256, b, b, 3), "uint8"), "masks": ((0, b, b), (256, b, b), "bool"),
                 "slide": ((0,), (4096,), "int32"), "position": ((0, 2), (4096, 2), "float64")}
        for name, (shape, chunks, dtype) in specs.items():
            if name not in self.group:
                self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype)
        if "slides" not in self.group.attrs:
            self.group.attrs.update({"slides": [], "block_px": b})
        if self.group.attrs["block_px"] != b:
            raise ValueError(f"{self.root}: holds {self.group.attrs['block_px']} px blocks, not {b} px; use another --work folder")
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
        for name, data in (("images", mined.images), ("masks", mined.masks),
                           ("slide", np.full(n, index, np.int32)), ("position", mined.positions)):
            if n:
                self.group[name].append(data, axis=0)
        self.group.attrs["slides"] = [*self.slides, {**entry, "blocks": n}]  # the commit point

    def __len__(self) -> int:
        return self.committed_blocks


class StoreSampler:
    """Seeded training batches from the block store, with the paper's augmentation in thirds."""

    def __init__(self, store: BlockStore, cfg: TrainConfig):
        self.store, self.cfg = store, cfg
        self.n = len(store)
        if self.n == 0:
            raise ValueError("no mined blocks")

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, epoch, index])
        picks = np.sort(rng.integers(0, self.n, self.cfg.batch_size))
        images = self.store.group["images"].get_orthogonal_selection((picks,))
        masks = self.store.group["masks"].get_orthogonal_selection((picks,))
        x = np.empty((len(picks), *images.shape[1:]), np.float32)
        y = np.empty((len(picks), *masks.shape[1:], 1), np.float32)
        for k in range(len(picks)):
            block, target = flip_turn(images[k].astype(np.float32) / 255.0, masks[k], rng)
            x[k] = augment_block(block, k % 3, rng, self.cfg)
            y[k, ..., 0] = target
        return x, y

    def default_steps_per_epoch(self) -> int:
        return max(1, -(-self.n // self.cfg.batch_size))


def adapt(inputs: list[Path], out_path: Path, work_dir: Path, run_cfg: RunConfig, cfg: AdaptConfig,
          predictor: Predictor, echo: Callable[[str], None] = print, client=None) -> dict:
    """Mine the cohort (resuming), fine-tune the base model on the blocks, save it with its provenance."""
    from .training import train

    cfg.validate()
    work_dir.mkdir(parents=True, exist_ok=True)
    store = BlockStore(work_dir / "blocks.zarr", cfg.block_px)
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
            mined = MinedSlide(mined.images[keep], mined.masks[keep], mined.positions[keep], mined.hard_positives,
                               mined.tissue_mm2, mined.warnings)
        store.add({"path": str(path), "sha256": sha, "hard_positives": mined.hard_positives,
                   "tissue_mm2": mined.tissue_mm2, "warnings": mined.warnings}, mined)
        echo(f"{path}: {mined.hard_positives} confident nuclei, {len(mined.images)} blocks kept")
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
    mining_s = time.perf_counter() - t0

    if len(store) == 0:
        raise ValueError("no confident nuclei were found in any slide of the cohort: nothing to adapt on "
                         "(is the cohort H&E? is the base model right for it?)")
    train_cfg = TrainConfig(block_px=cfg.block_px, batch_size=cfg.batch_size, epochs=cfg.epochs,
                            steps_per_epoch=cfg.steps_per_epoch, learning_rate=cfg.learning_rate, seed=cfg.seed,
                            disk_radius_px=cfg.disk_radius_px)
    t1 = time.perf_counter()
    state = train(StoreSampler(store, train_cfg), out_path, train_cfg, checkpoint_dir=work_dir / "checkpoints",
                  init_model=predictor.model_path, verbose=2)
    provenance = {
        "base_model": {"path": str(predictor.model_path), "sha256": predictor.sha256},
        "adapted_model_sha256": file_sha256(out_path),
        "cohort": [{k: s[k] for k in ("path", "sha256", "hard_positives", "blocks", "tissue_mm2", "warnings")} for s in store.slides],
        "thresholds": {"high": cfg.high, "low": cfg.low},
        "blocks": len(store),
        "adapt_config": asdict(cfg),
        "run_config": run_cfg.to_dict(),
        "training": {"epochs": state["epoch"], "history": state["history"], "seconds": round(state["seconds"], 1)},
        "mining_s": round(mining_s, 1),
        "fine_tune_s": round(time.perf_counter() - t1, 1),
    }
    from ..io.files import atomic_write_text

    atomic_write_text(out_path.with_suffix(".json"), json.dumps(provenance, indent=2, sort_keys=True))
    return provenance
