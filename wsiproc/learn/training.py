"""What training learns from: annotated images at 0.5 µm/px, their targets, augmentation and the batch samplers.

The loop that trains on them is `trainer.fit`. Two samplers feed it:

- `DomainSampler` (the shipped and fine-tuning recipes): 128² crops from several domains sampled equally, with
  resolution, stain, brightness, contrast, blur and noise jitter; sub-pixel disk targets; per-pixel weights that
  are 0 outside the annotated regions of partly annotated images.
- `BlockSampler` (the paper's recipe): every annotated point drawn as a disk of radius 4 px, blocks cut around
  annotated nuclei (and, beyond the paper, a share at random positions so background is learnt too); of every
  three blocks one stays as is, one gets a hue shift in HSV space and one Gaussian noise.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np
from scipy import ndimage

from ..detection.model import MODEL_MPP
from ..io.resample import map_coords, rescale_rgb

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry


@dataclass
class TrainConfig:
    """Every knob of a training run; recorded in the checkpoint folder and the model card."""

    block_px: int = 64
    batch_size: int = 16
    epochs: int = 2
    steps_per_epoch: int | None = None  # None: one block per annotated nucleus per epoch (the paper's epoch)
    learning_rate: float = 1e-4
    disk_radius_px: int = 4
    background_fraction: float = 0.25  # share of blocks at random positions (beyond the paper)
    hue_shift_mean: float = 0.1
    hue_shift_sd: float = 0.1  # the paper's N(0.1, 0.01) read as mean 0.1, variance 0.01
    noise_sd: float = 0.01
    dropout: float = 0.5
    freeze_vgg: bool = False
    seed: int = 0
    arch: str = "paper"  # a name from wsiproc.detection.architectures (when not starting from a model)


@dataclass
class TrainingImage:
    """One annotated image at the model's resolution: RGB uint8, its points in model pixels and, where only parts
    of it were annotated (QuPath points inside drawn regions), a mask of those parts."""

    name: str
    rgb: np.ndarray
    points_xy: np.ndarray  # (N, 2) x = column, y = row, pixel-index coordinates at 0.5 µm/px
    region_mask: np.ndarray | None = None  # (H, W) bool at 0.5 µm/px: True where annotated; None: everywhere

    @classmethod
    def from_level0(cls, name: str, rgb: np.ndarray, points_xy: np.ndarray, mpp: float,
                    regions: "Sequence[BaseGeometry] | None" = None) -> "TrainingImage":
        """Resample an image at `mpp`, its level-0 points and its annotated regions (shapely polygons in level-0
        pixels; None or empty: the whole image) to the model's 0.5 µm/px grid."""
        pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        small = rescale_rgb(np.asarray(rgb)[..., :3], mpp, MODEL_MPP)
        mask = rasterise_regions(regions, small.shape[:2], mpp / MODEL_MPP) if regions else None
        return cls(name, small, map_coords(pts, mpp, MODEL_MPP), mask)

    @property
    def annotated_px(self) -> int:
        """Pixels that teach (the regions, or the whole image)."""
        return int(self.region_mask.sum()) if self.region_mask is not None else self.rgb.shape[0] * self.rgb.shape[1]


def rasterise_regions(regions: "Sequence[BaseGeometry]", shape_hw: tuple[int, int], scale: float) -> np.ndarray:
    """Polygons in level-0 pixel-index coordinates as a mask on a grid `scale`× as coarse (holes left out).

    A coarse pixel is inside when its centre is: level-0 coordinate v sits at (v + 0.5) / scale - 0.5 on the coarse
    grid (edges aligned), and scikit-image's `polygon` fills the pixels whose centres lie inside."""
    from shapely.geometry import Polygon
    from skimage.draw import polygon as fill

    mask = np.zeros(shape_hw, dtype=bool)

    def pixels(coords) -> tuple[np.ndarray, np.ndarray]:
        xy = (np.asarray(coords)[:, :2] + 0.5) / scale - 0.5
        return fill(xy[:, 1], xy[:, 0], shape_hw)

    def polygons(geometry):
        """Every polygon of a (multi)polygon or of the collections `make_valid` returns; lines and points enclose nothing."""
        if isinstance(geometry, Polygon):
            yield geometry
        elif hasattr(geometry, "geoms"):
            for part in geometry.geoms:
                yield from polygons(part)

    for region in regions:
        for part in polygons(region):
            if part.is_empty:
                continue
            mask[pixels(part.exterior.coords)] = True
            for hole in part.interiors:
                mask[pixels(hole.coords)] = False
    return mask


def draw_targets(shape_hw: tuple[int, int], points_xy: np.ndarray, radius_px: int = 4) -> np.ndarray:
    """Binary target mask: one disk of `radius_px` around each point (the paper's R = 4 px)."""
    h, w = shape_hw
    mask = np.zeros((h, w), dtype=bool)
    pts = np.round(np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)).astype(int)
    keep = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    mask[pts[keep, 1], pts[keep, 0]] = True
    yy, xx = np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]
    disk = xx**2 + yy**2 <= radius_px**2
    return ndimage.binary_dilation(mask, structure=disk)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    from matplotlib.colors import rgb_to_hsv

    return rgb_to_hsv(rgb)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    from matplotlib.colors import hsv_to_rgb

    return hsv_to_rgb(hsv)


def augment_block(block: np.ndarray, kind: int, rng: np.random.Generator, cfg: TrainConfig) -> np.ndarray:
    """The paper's augmentation on a float [0, 1] RGB block: 0 = as is, 1 = hue shift, 2 = Gaussian noise."""
    if kind == 1:
        hsv = _rgb_to_hsv(block)
        hsv[..., 0] = (hsv[..., 0] + rng.normal(cfg.hue_shift_mean, cfg.hue_shift_sd)) % 1.0
        return _hsv_to_rgb(hsv).astype(np.float32)
    if kind == 2:
        return np.clip(block + rng.normal(0.0, cfg.noise_sd, block.shape), 0.0, 1.0).astype(np.float32)
    return block


class BlockSampler:
    """Cuts (image, target) blocks deterministically from a seed, so a resumed run sees the same data."""

    def __init__(self, images: Sequence[TrainingImage], cfg: TrainConfig):
        if not images:
            raise ValueError("no training images")
        self.images = list(images)
        self.cfg = cfg
        self.masks = [draw_targets(im.rgb.shape[:2], im.points_xy, cfg.disk_radius_px) for im in self.images]
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


class BlockSource(Protocol):
    """Anything that yields seeded training batches: annotated images here, mined blocks in `adapt`."""

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]: ...

    def default_steps_per_epoch(self) -> int: ...


def flip_turn(block: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random flip and right-angle turn: free, label-preserving variety."""
    if rng.random() < 0.5:
        block, target = block[:, ::-1], target[:, ::-1]
    turns = int(rng.integers(4))
    return np.ascontiguousarray(np.rot90(block, turns)), np.ascontiguousarray(np.rot90(target, turns))


# --- Multi-domain training (four annotated domains, equal sampling, augmentation beyond the paper) ---------

@functools.lru_cache(maxsize=1)
def _hed_matrices() -> tuple[np.ndarray, np.ndarray]:
    """skimage's Ruifrok–Johnston stain matrices (optical-density RGB ↔ haematoxylin, eosin, DAB), as float32."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    return np.asarray(hed_from_rgb, np.float32), np.asarray(rgb_from_hed, np.float32)


@dataclass
class AugmentConfig:
    """Augmentation beyond the paper's hue shift and noise; each part can be switched off to measure it."""

    hed_sigma: float = 0.05  # per-stain scale ~ 1 + N(0, σ) and shift ~ N(0, σ) in HED optical density (Tellez et al.)
    brightness: float = 0.06  # additive, uniform ± this
    contrast: float = 0.15  # multiplicative around the crop mean, uniform 1 ± this
    blur_probability: float = 0.2  # Gaussian blur of σ 0.4–1.2 px: out-of-focus regions, 20× scans
    mpp_range: tuple[float, float] = (0.45, 0.55)  # resolution jitter: the crop is read as if scanned at this µm/px
    noise_sd: float = 0.01

    @classmethod
    def flips_only(cls) -> "AugmentConfig":
        return cls(hed_sigma=0.0, brightness=0.0, contrast=0.0, blur_probability=0.0, mpp_range=(0.5, 0.5), noise_sd=0.0)


def stain_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Perturb the amounts of haematoxylin, eosin and DAB: the colour variation between labs, as physics has it."""
    if sigma <= 0:
        return rgb
    hed_from_rgb, rgb_from_hed = _hed_matrices()
    od = -np.log(np.clip(rgb, 1e-3, 1.0))
    hed = od.reshape(-1, 3) @ hed_from_rgb
    hed = hed * (1.0 + rng.normal(0.0, sigma, 3)).astype(np.float32) + rng.normal(0.0, sigma, 3).astype(np.float32) * 0.2
    return np.clip(np.exp(-(hed @ rgb_from_hed)), 0.0, 1.0).reshape(rgb.shape).astype(np.float32)


def photometric(rgb: np.ndarray, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray:
    rgb = stain_jitter(rgb, rng, aug.hed_sigma)
    if aug.contrast or aug.brightness:
        mean = rgb.mean(axis=(0, 1), keepdims=True)
        rgb = (rgb - mean) * rng.uniform(1 - aug.contrast, 1 + aug.contrast) + mean + rng.uniform(-aug.brightness, aug.brightness)
    if aug.blur_probability and rng.random() < aug.blur_probability:
        rgb = ndimage.gaussian_filter(rgb, sigma=(rng.uniform(0.4, 1.2),) * 2 + (0,))
    if aug.noise_sd:
        rgb = rgb + rng.normal(0.0, aug.noise_sd, rgb.shape)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def disk_targets_at(shape_hw: tuple[int, int], points_xy: np.ndarray, radius_px: float) -> np.ndarray:
    """Disks of `radius_px` around sub-pixel points: pixels whose centre lies within the radius of a point."""
    h, w = shape_hw
    target = np.zeros((h, w), dtype=np.float32)
    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return target
    r = int(np.ceil(radius_px)) + 1
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    cx, cy = np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)
    xx, yy = cx[:, None] + dx.ravel(), cy[:, None] + dy.ravel()  # candidate pixels around each point
    inside = (xx - pts[:, :1]) ** 2 + (yy - pts[:, 1:]) ** 2 <= radius_px**2
    inside &= (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
    target[yy[inside], xx[inside]] = 1.0
    return target


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
        from PIL import Image

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
        target = disk_targets_at((s, s), pts, self.radius)
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
