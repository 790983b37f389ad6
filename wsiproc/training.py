"""Training the detector from point annotations (the paper's recipe), with checkpoints and resume.

Targets: every annotated point drawn as a disk of radius 4 px at 0.5 µm/px, binary cross-entropy,
Adam. Blocks are cut around annotated nuclei (and, beyond the paper, a share at random positions so
background is learnt too); of every three blocks one stays as is, one gets a hue shift in HSV space and
one Gaussian noise.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from scipy import ndimage

from .model import MODEL_MPP, build_model, load_model, save_model
from .resample import map_coords, rescale_rgb


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


@dataclass
class TrainingImage:
    """One annotated image at the model's resolution: RGB uint8 and its points in model pixels."""

    name: str
    rgb: np.ndarray
    points_xy: np.ndarray  # (N, 2) x = column, y = row, pixel-index coordinates at 0.5 µm/px

    @classmethod
    def from_level0(cls, name: str, rgb: np.ndarray, points_xy: np.ndarray, mpp: float) -> "TrainingImage":
        """Resample an image at `mpp` and its level-0 points to the model's 0.5 µm/px grid."""
        pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
        return cls(name, rescale_rgb(np.asarray(rgb)[..., :3], mpp, MODEL_MPP), map_coords(pts, mpp, MODEL_MPP))


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


def _make_dataset(sampler: BlockSource, epoch_offset: int, steps: int):
    import keras

    class _Blocks(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = epoch_offset

        def __len__(self) -> int:
            return steps

        def __getitem__(self, index: int):
            return sampler.batch(self.epoch, index)

        def on_epoch_end(self) -> None:
            self.epoch += 1

    return _Blocks()


def train(
    images: "Sequence[TrainingImage] | BlockSource",
    out_path: str | Path,
    cfg: TrainConfig = TrainConfig(),
    checkpoint_dir: str | Path | None = None,
    vgg16_weights: str | Path | None = None,
    init_model: str | Path | None = None,
    verbose: int = 1,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train (or resume) and save the model to `out_path`; returns the loss history and timings.

    A checkpoint (`last.keras` with the optimiser state, plus `state.json`) is written after every epoch
    into `checkpoint_dir`; calling again with the same folder continues from the last finished epoch.
    `init_model` starts from an existing model's weights (fine-tuning, or continuing a shipped model).
    """
    import keras

    keras.utils.set_random_seed(cfg.seed)
    out_path = Path(out_path)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out_path.with_name(out_path.stem + "_checkpoints")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state_file, last_ckpt = ckpt_dir / "state.json", ckpt_dir / "last.keras"

    sampler = images if hasattr(images, "batch") else BlockSampler(images, cfg)
    steps = cfg.steps_per_epoch or sampler.default_steps_per_epoch()
    state = {"epoch": 0, "history": [], "seconds": 0.0, "config": asdict(cfg)}
    if state_file.is_file() and last_ckpt.is_file():
        state = json.loads(state_file.read_text())
        model = keras.models.load_model(last_ckpt, compile=True, safe_mode=True)
        # A resumed run may continue at a lower learning rate (the usual step decay once the loss plateaus);
        # the optimiser's moments are kept, only the step size changes.
        model.optimizer.learning_rate.assign(cfg.learning_rate)
    else:
        if init_model is not None:
            model = load_model(init_model)
        else:
            model = build_model(dropout=cfg.dropout, vgg16_weights=vgg16_weights, freeze_vgg=cfg.freeze_vgg)
        model.compile(
            optimizer=keras.optimizers.Adam(cfg.learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-8),
            loss="binary_crossentropy",
        )

    class _Checkpoint(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            state["epoch"] = epoch + 1
            state["seconds"] += time.perf_counter() - self.t0
            self.t0 = time.perf_counter()
            state["history"].append({
                "epoch": epoch + 1,
                "loss": float((logs or {}).get("loss", float("nan"))),
                "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            })
            save_model(self.model, last_ckpt)
            tmp = state_file.with_suffix(".json.partial")
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, state_file)
            if on_epoch:
                on_epoch(epoch + 1, state)

    if state["epoch"] < cfg.epochs:
        model.fit(
            _make_dataset(sampler, state["epoch"], steps),
            epochs=cfg.epochs,
            initial_epoch=state["epoch"],
            callbacks=[_Checkpoint()],
            verbose=verbose,
        )
    final = load_model(last_ckpt) if last_ckpt.is_file() else model
    save_model(final, out_path)
    return state
