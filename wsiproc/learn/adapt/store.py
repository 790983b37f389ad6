"""A cohort's mined blocks: one slide's (`MinedSlide`), the resumable zarr store of all (`BlockStore`), and
seeded training batches from it (`StoreSampler`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..augment import AugmentConfig, augment_block, flip_turn, photometric
from ..training import TrainConfig
from .pseudo_labels import NUCLEUS, UNSURE


@dataclass
class MinedSlide:
    images: np.ndarray  # (n, b, b, 3) uint8
    targets: np.ndarray  # (n, b, b) uint8: BACKGROUND, NUCLEUS or UNSURE
    positions: np.ndarray  # (n, 2) block centre x, y at 0.5 µm/px
    centred: np.ndarray  # (n,) bool: centred on a confident nucleus (else at a random tissue position)
    hard_positives: int
    tissue_mm2: float
    warnings: list[str] = field(default_factory=list)


class BlockStore:
    """The mined blocks of a cohort in a zarr group: images, targets, slide of origin, position, and progress."""

    def __init__(self, root: Path, block_px: int, recipe: str = "consistency"):
        import zarr  # lazy: slow to import; only the fine-tuning recipes store blocks

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
    """Seeded training batches from the block store: a random flip and turn, then the paper's augmentation in
    thirds or, with `augment`, the shipped recipe's photometric one (stain, brightness, contrast, blur, noise).

    The pseudo-labels were mined from the tiles as scanned (the teacher's weak views); a student that must find
    them again under strong colour and blur changes learns what stays a nucleus across labs, not the cohort's
    colours. Yields (images, targets, weights): UNSURE pixels get weight 0, so they teach neither way.
    """

    def __init__(self, store: BlockStore, cfg: TrainConfig, augment: AugmentConfig | None = None):
        self.store, self.cfg, self.augment = store, cfg, augment
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
            x[k] = augment_block(block, k % 3, rng, self.cfg) if self.augment is None else photometric(block, rng, self.augment)
            y[k, ..., 0] = target == NUCLEUS
            w[k] = target != UNSURE
        return x, y, w

    def default_steps_per_epoch(self) -> int:
        return max(1, -(-self.n // self.cfg.batch_size))
