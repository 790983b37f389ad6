"""Augmentation of training crops: the paper's (flips and turns, hue shift, noise, in thirds) and the domain
recipes' (stain, brightness, contrast, blur, noise: `photometric`, switched by `AugmentConfig`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .training import TrainConfig


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    from matplotlib.colors import rgb_to_hsv  # lazy: matplotlib is slow to import; only the hue-shift third needs it

    return rgb_to_hsv(rgb)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    from matplotlib.colors import hsv_to_rgb  # lazy: as rgb_to_hsv

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


def flip_turn(block: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random flip and right-angle turn: free, label-preserving variety."""
    if rng.random() < 0.5:
        block, target = block[:, ::-1], target[:, ::-1]
    turns = int(rng.integers(4))
    return np.ascontiguousarray(np.rot90(block, turns)), np.ascontiguousarray(np.rot90(target, turns))


@functools.lru_cache(maxsize=1)
def _hed_matrices() -> tuple[np.ndarray, np.ndarray]:
    """skimage's Ruifrok–Johnston stain matrices (optical-density RGB ↔ haematoxylin, eosin, DAB), as float32."""
    from skimage.color import hed_from_rgb, rgb_from_hed  # lazy: skimage.color is slow to import; only stain jitter needs it

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
