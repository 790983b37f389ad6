"""The batch samplers that feed `trainer.fit`, one per kind of recipe; their targets are `targets.disk_targets`.

- `DomainSampler` (the shipped and fine-tuning recipes): 128² crops from several domains sampled equally, with
  resolution, stain, brightness, contrast, blur and noise jitter; sub-pixel disk targets; per-pixel weights that
  are 0 outside the annotated regions of partly annotated images.
- `BlockSampler` (the paper's recipe): every annotated point drawn as a disk of radius 4 px, blocks cut around
  annotated nuclei (and, beyond the paper, a share at random positions so background is learnt too); of every
  three blocks one stays as is, one gets a hue shift in HSV space and one Gaussian noise.

adapt's mined blocks have their own sampler (`adapt.store.StoreSampler`); all of them are a `BlockSource`.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from ..detection.model import MODEL_MPP
from .augment import AugmentConfig, augment_block, flip_turn, photometric
from .targets import disk_targets
from .training import TrainConfig, TrainingImage


class BlockSource(Protocol):
    """Anything that yields seeded training batches: annotated images here, mined blocks in `adapt`."""

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]: ...

    def default_steps_per_epoch(self) -> int: ...


class BlockSampler:
    """Cuts (image, target) blocks deterministically from a seed, so a resumed run sees the same data."""

    def __init__(self, images: Sequence[TrainingImage], cfg: TrainConfig):
        if not images:
            raise ValueError("no training images")
        self.images = list(images)
        self.cfg = cfg
        self.masks = [disk_targets(im.rgb.shape[:2], im.points_xy, cfg.disk_radius_px, round_centres=True, drop_outside=True)
                      for im in self.images]
        self.point_index = [(i, p) for i, im in enumerate(self.images) for p in range(len(im.points_xy))]
        if not self.point_index:
            raise ValueError("no annotated points in the training images")
        pad = cfg.block_px
        # White padding, as outside a slide: lets blocks centred near the image edge keep their size.
        self.padded = [np.pad(im.rgb, ((pad, pad), (pad, pad), (0, 0)), constant_values=255) for im in self.images]
        self.padded_masks = [np.pad(m, pad) for m in self.masks]

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, epoch, index])
        b, s = cfg.batch_size, cfg.block_px
        x = np.empty((b, s, s, 3), np.float32)
        y = np.empty((b, s, s, 1), np.float32)
        for k in range(b):
            if rng.random() < cfg.background_fraction:
                i = int(rng.integers(len(self.images)))
                h, w = self.images[i].rgb.shape[:2]
                cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            else:
                i, p = self.point_index[int(rng.integers(len(self.point_index)))]
                cx, cy = self.images[i].points_xy[p] + rng.uniform(-s / 4, s / 4, 2)
            y0 = int(np.clip(round(cy - s / 2), -s // 2, self.images[i].rgb.shape[0] - s // 2)) + s
            x0 = int(np.clip(round(cx - s / 2), -s // 2, self.images[i].rgb.shape[1] - s // 2)) + s
            block = self.padded[i][y0 : y0 + s, x0 : x0 + s].astype(np.float32) / 255.0
            target = self.padded_masks[i][y0 : y0 + s, x0 : x0 + s]
            block, target = flip_turn(block, target, rng)
            x[k] = augment_block(block, k % 3, rng, cfg)
            y[k, ..., 0] = target
        return x, y

    def default_steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.point_index) / self.cfg.batch_size))


class DomainSampler:
    """Seeded batches of crops from several annotated domains, each domain equally often (or by `shares`).

    Item k of a batch comes from domain k mod D, so a domain with 90 images weighs as much as one with 16;
    inside a domain an image is drawn in proportion to its annotated area. Each crop is read with a random scale
    (resolution jitter), flip and right-angle turn, then recoloured (`photometric`); its target is drawn
    after the geometric transform from the transformed points, so disks stay round and centred.

    Batches are (images, targets, weights): the weight is 1 inside the annotated regions of an image and 0
    outside (unlabelled nuclei there must not be taught as background), 1 everywhere for fully annotated images.
    Crops of partly annotated images are centred on a random annotated pixel.

    `shares` ({domain: share of items}, summing to 1) replaces equal sampling: fine-tuning on a lab's images
    with a share of the shipped domains' data mixed in.
    """

    def __init__(self, domains: dict[str, Sequence[TrainingImage]], crop_px: int = 128, batch_size: int = 32,
                 disk_radius_px: float = 4.0, augment: AugmentConfig | None = None, seed: int = 0,
                 shares: dict[str, float] | None = None):
        self.names = [n for n, ims in domains.items() if ims]
        if not self.names:
            raise ValueError("no training images in any domain")
        self.images = {n: list(domains[n]) for n in self.names}
        self.weights = {n: np.array([im.annotated_px for im in ims], float) for n, ims in self.images.items()}
        for n in self.names:
            if self.weights[n].sum() <= 0:
                raise ValueError(f"domain {n!r}: its annotated regions cover no pixel at 0.5 µm/px")
            self.weights[n] /= self.weights[n].sum()
        self.shares = None
        if shares is not None:
            p = np.array([shares.get(n, 0.0) for n in self.names], float)
            if p.sum() <= 0:
                raise ValueError("domain shares sum to 0")
            self.shares = p / p.sum()
        # Annotated pixels of partly annotated images, to centre crops on (flat indices at 0.5 µm/px).
        self._inside = {id(im): np.flatnonzero(im.region_mask) for ims in self.images.values() for im in ims
                        if im.region_mask is not None}
        self.crop_px, self.batch_size, self.radius = crop_px, batch_size, disk_radius_px
        self.augment = augment if augment is not None else AugmentConfig()
        self.seed = seed

    def crop(self, im: TrainingImage, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.crop_px
        lo, hi = self.augment.mpp_range
        zoom = MODEL_MPP / rng.uniform(lo, hi)  # >1: the crop is shown as if scanned coarser (objects smaller)
        src = min(s * zoom, *im.rgb.shape[:2])  # source pixels spanned by the crop
        zoom = src / s
        h, w = im.rgb.shape[:2]
        if im.region_mask is None:
            x0, y0 = rng.uniform(0, w - src), rng.uniform(0, h - src)  # the crop's top-left edge, continuous
        else:  # centred on an annotated pixel, kept inside the image
            cy, cx = divmod(int(self._inside[id(im)][int(rng.integers(len(self._inside[id(im)])))]), w)
            x0 = float(np.clip(cx + 0.5 - src / 2 + rng.uniform(-0.5, 0.5), 0, w - src))
            y0 = float(np.clip(cy + 0.5 - src / 2 + rng.uniform(-0.5, 0.5), 0, h - src))
        box = (x0, y0, x0 + src, y0 + src)
        rgb = np.asarray(Image.fromarray(im.rgb).resize((s, s), Image.Resampling.BILINEAR, box=box))
        rgb = rgb.astype(np.float32) / 255.0
        # Pixel-index u on the source sits at (u + 0.5 - x0) / zoom - 0.5 on the crop (edges aligned).
        pts = (im.points_xy + 0.5 - (x0, y0)) / zoom - 0.5
        pts = pts[(pts[:, 0] > -self.radius) & (pts[:, 0] < s + self.radius) & (pts[:, 1] > -self.radius) & (pts[:, 1] < s + self.radius)]
        target = disk_targets((s, s), pts, self.radius, round_centres=False, drop_outside=False).astype(np.float32)
        if im.region_mask is None:
            weight = np.ones((s, s), np.float32)
        else:
            mask = Image.fromarray(im.region_mask.astype(np.uint8))
            weight = np.asarray(mask.resize((s, s), Image.Resampling.NEAREST, box=box), np.float32)
        rgb, both = flip_turn(rgb, np.stack([target, weight], axis=-1), rng)
        return photometric(rgb, rng, self.augment), both[..., 0], both[..., 1]

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, index])
        s, b = self.crop_px, self.batch_size
        x = np.empty((b, s, s, 3), np.float32)
        y = np.empty((b, s, s, 1), np.float32)
        wt = np.empty((b, s, s), np.float32)
        first = int(rng.integers(len(self.names)))
        for k in range(b):
            if self.shares is None:
                name = self.names[(first + k) % len(self.names)]
            else:
                name = self.names[int(rng.choice(len(self.names), p=self.shares))]
            im = self.images[name][int(rng.choice(len(self.images[name]), p=self.weights[name]))]
            x[k], y[k, ..., 0], wt[k] = self.crop(im, rng)
        return x, y, wt

    def default_steps_per_epoch(self) -> int:
        return 500
