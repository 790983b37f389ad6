"""The annotated domains the shipped model is trained and scored on, each with its held-out split fixed in code.

| domain | images | µm/px | held out |
|---|---|---|---|
| ``monuseg`` | 30 MoNuSeg 2018 training images, 7 organs | 0.25 | the Kumar / HoVer-Net 14 (organs partly unseen) |
| ``crc`` | crc-dev, 50 colorectal images, another lab and scanner | 0.55 | every fifth image (img5, img10, … img50) |
| ``brca`` | BRCA-M2C, 120 breast images | 0.5 | the authors' 30 test images (train + val are trained on) |
| ``consep`` | CoNSeP train, 27 dense colorectal images | 0.5 | every fourth image (train_4, train_8, … train_24) |

`domain(name, root, split)` returns `AnnotatedImage`s with `split` in 'train', 'held_out' or 'all'; training
samples every domain's 'train' part equally so that no domain dominates (see `sampling.DomainSampler`).

brca and consep label every point with a nucleus type (`AnnotatedImage.labels`, the data sets' own names:
`lymphocyte`, `tumor_epithelial`, `stromal`; `inflammatory`, `epithelial`, `spindle_other`), which
`wsiproc.detection.classes.ClassMap` maps onto the model's classes; monuseg and crc have none.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..io.annotations import Points, read_labelled_points

MONUSEG_MPP = 0.25
CRC_MPP = 0.55
BRCA_MPP = 0.5
CONSEP_MPP = 0.5
SPLITS = ("train", "held_out", "all")

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
    """An image file, its pixel size, its annotated nucleus centres in level-0 pixel coordinates, the instance
    label map where there is one, and each point's class label (raw name; None: the data set has no classes)."""

    name: str
    path: Path
    mpp: float
    points_xy: np.ndarray
    label_path: Path | None = None
    labels: np.ndarray | None = None

    def read_rgb(self) -> np.ndarray:
        return np.asarray(Image.open(self.path).convert("RGB"))


def _read_xy(csv_path: Path) -> np.ndarray:
    with open(csv_path, newline="") as fh:
        rows = [(float(r["x"]), float(r["y"])) for r in csv.DictReader(fh)]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def monuseg(root: str | Path, split: str = "all") -> list[AnnotatedImage]:
    """MoNuSeg-train images; `split` is 'train' (16), 'held_out' (14) or 'all' (30)."""
    _check_split(split)
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
    return out


def _points_by_image(csv_path: Path) -> dict[str, Points]:
    """{image: points and their `class` column} of a data set's `image,x,y[,class]` table."""
    return read_labelled_points(csv_path)


_NO_POINTS = Points(np.zeros((0, 2)))


def _number(stem: str) -> int:
    return int("".join(c for c in stem if c.isdigit()) or 0)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")


def _numbered(root: Path, pattern: str, mpp: float, split: str, every: int) -> list[AnnotatedImage]:
    """Images numbered 1…N, of which every `every`-th is held out: a fixed, spread-out share."""
    _check_split(split)
    points = _points_by_image(root / "points.csv")
    out = []
    for p in sorted((root / "images").glob(pattern), key=lambda p: _number(p.stem)):
        held = _number(p.stem) % every == 0
        if (split == "train" and held) or (split == "held_out" and not held):
            continue
        pts = points.get(p.stem, _NO_POINTS)
        out.append(AnnotatedImage(p.stem, p, mpp, pts.xy, labels=pts.labels))
    return out


def crc_dev(root: str | Path, split: str = "all") -> list[AnnotatedImage]:
    """crc-dev: 50 colorectal images at 0.55 µm/px with hand-marked nucleus centres; every fifth held out."""
    return _numbered(Path(root), "*.png", CRC_MPP, split, every=5)


def consep(root: str | Path, split: str = "all") -> list[AnnotatedImage]:
    """CoNSeP train: 27 dense colorectal images at 0.5 µm/px; every fourth (6 images) held out."""
    return _numbered(Path(root), "*.png", CONSEP_MPP, split, every=4)


def brca_m2c(root: str | Path, split: str = "all") -> list[AnnotatedImage]:
    """BRCA-M2C: 120 breast images at 0.5 µm/px; held out = the authors' test split, train = their train + val."""
    _check_split(split)
    root = Path(root)
    points = _points_by_image(root / "points.csv")
    with open(root / "split.csv", newline="") as fh:
        official = {r["image"]: r["split"] for r in csv.DictReader(fh)}
    out = []
    for name in sorted(official):
        held = official[name] == "test"
        if (split == "train" and held) or (split == "held_out" and not held):
            continue
        pts = points.get(name, _NO_POINTS)
        out.append(AnnotatedImage(name, root / "images" / f"{name}.jpg", BRCA_MPP, pts.xy, labels=pts.labels))
    return out


#: domain name → (folder under the shared data root, reader). Order is the order of every table.
DOMAINS = {
    "monuseg": ("monuseg-train", monuseg),
    "crc": ("crc-dev", crc_dev),
    "brca": ("brca-m2c", brca_m2c),
    "consep": ("consep-train", consep),
}


def domain(name: str, data_root: str | Path, split: str = "all") -> list[AnnotatedImage]:
    """The images of one domain's split, read from the shared data root."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}")
    folder, reader = DOMAINS[name]
    return reader(Path(data_root) / folder, split)
