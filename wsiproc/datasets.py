"""The annotated data sets the shipped model is trained and scored on, with their split fixed in code.

MoNuSeg 2018 training images are split as in Kumar et al. / HoVer-Net: 16 for training, and 14 held
out (two each of breast, kidney, liver and prostate, and all six of bladder, colon and stomach, organs
never seen in training). crc-dev is a second lab, tissue and scanner, used only for scoring and adaptation.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MONUSEG_MPP = 0.25
CRC_MPP = 0.55

MONUSEG_HELD_OUT = (
    "TCGA-21-5784-01Z-00-DX1", "TCGA-21-5786-01Z-00-DX1",  # liver
    "TCGA-A7-A13E-01Z-00-DX1", "TCGA-A7-A13F-01Z-00-DX1",  # breast
    "TCGA-B0-5698-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1",  # kidney
    "TCGA-CH-5767-01Z-00-DX1", "TCGA-G9-6362-01Z-00-DX1",  # prostate
    "TCGA-DK-A2I6-01A-01-TS1", "TCGA-G2-A2EK-01A-02-TSB",  # bladder
    "TCGA-AY-A8YK-01A-01-TS1", "TCGA-NH-A8F7-01A-01-TS1",  # colon
    "TCGA-KB-A93J-01A-01-TS1", "TCGA-RD-A8N9-01A-01-TS1",  # stomach
)


@dataclass
class AnnotatedImage:
    """An image file, its pixel size and its annotated nucleus centres in level-0 pixel coordinates."""

    name: str
    path: Path
    mpp: float
    points_xy: np.ndarray
    label_path: Path | None = None

    def read_rgb(self) -> np.ndarray:
        return np.asarray(Image.open(self.path).convert("RGB"))


def _read_xy(csv_path: Path) -> np.ndarray:
    with open(csv_path, newline="") as fh:
        rows = [(float(r["x"]), float(r["y"])) for r in csv.DictReader(fh)]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def monuseg(root: str | Path, split: str = "all") -> list[AnnotatedImage]:
    """MoNuSeg-train images; `split` is 'train' (16), 'held_out' (14) or 'all' (30)."""
    root = Path(root)
    out = []
    for path in sorted((root / "images").glob("*.tif")):
        name = path.stem
        held = name in MONUSEG_HELD_OUT
        if (split == "train" and held) or (split == "held_out" and not held):
            continue
        pts = _read_xy(root / "centroids" / f"train_{name}_from_masks.csv")
        label = root / "labels" / f"{name}.png"
        out.append(AnnotatedImage(name, path, MONUSEG_MPP, pts, label if label.is_file() else None))
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"unknown split {split!r}")
    return out


def crc_dev(root: str | Path) -> list[AnnotatedImage]:
    """crc-dev: 50 colorectal images at 0.55 µm/px with hand-marked nucleus centres."""
    root = Path(root)
    by_image: dict[str, list[tuple[float, float]]] = {}
    with open(root / "points.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            by_image.setdefault(r["image"], []).append((float(r["x"]), float(r["y"])))
    images = sorted((root / "images").glob("*.png"), key=lambda p: int("".join(c for c in p.stem if c.isdigit()) or 0))
    return [
        AnnotatedImage(p.stem, p, CRC_MPP, np.asarray(by_image.get(p.stem, []), dtype=np.float64).reshape(-1, 2))
        for p in images
    ]
