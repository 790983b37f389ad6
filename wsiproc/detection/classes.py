"""Nucleus types: the three classes every output names, and how each data set's labels map onto them.

Labs ask what the nuclei are, not only where: lymphocyte density in and around a tumour, the tumour-cell
fraction of a sample, the stroma. Three classes are what the labelled data we learn from share and what the
field's tools report: `epithelial` (tumour and normal epithelium), `inflammatory` (lymphocytes, plasma cells,
neutrophils, macrophages) and `stromal` (fibroblasts, spindle, endothelial and other cells). Every data set
and every user's annotation names them its own way; `CLASS_ALIASES` is the one table that maps those names,
and a user's own names come in through `ClassMap.parse`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

#: The model's classes, in the order of its class-probability channels.
CLASSES: tuple[str, ...] = ("epithelial", "inflammatory", "stromal")

#: QuPath classification (name, RGB) for each class. `Immune cells` and `Stroma` are QuPath's built-in classes
#: with their built-in colours; QuPath has no epithelial class (its `Tumor` would mislabel normal epithelium),
#: so `Epithelial` is created on import with this colour. docs/qupath.md says the mapping.
QUPATH_CLASSES: Mapping[str, tuple[str, tuple[int, int, int]]] = {
    "epithelial": ("Epithelial", (255, 127, 14)),
    "inflammatory": ("Immune cells", (160, 90, 160)),
    "stromal": ("Stroma", (150, 200, 150)),
}

#: Colours for pictures (QC, density maps): distinguishable on H&E and for the common colour-vision deficiencies.
CLASS_COLOURS_HEX: Mapping[str, str] = {"epithelial": "#ff7f0e", "inflammatory": "#1f9bff", "stromal": "#2ca02c"}

#: Label names of the data sets we read (lower case, spaces and dashes as underscores) → model class.
#: brca-m2c: lymphocyte / tumor_epithelial / stromal; CoNSeP (MCSpatNet grouping): inflammatory / epithelial /
#: spindle_other; MoNuSAC: Epithelial / Lymphocyte / Macrophage / Neutrophil; PanNuke and Lizard names too;
#: QuPath's built-in classes (Tumor, Immune cells, Stroma) so its own exports round-trip.
CLASS_ALIASES: Mapping[str, str] = {
    # epithelial
    "epithelial": "epithelial", "epithelium": "epithelial", "tumor_epithelial": "epithelial",
    "tumour_epithelial": "epithelial", "tumor": "epithelial", "tumour": "epithelial", "neoplastic": "epithelial",
    "malignant_epithelial": "epithelial", "healthy_epithelial": "epithelial", "dysplastic_epithelial": "epithelial",
    "normal_epithelial": "epithelial", "epithelial_cell": "epithelial", "tumor_cell": "epithelial",
    # inflammatory
    "inflammatory": "inflammatory", "immune_cells": "inflammatory", "immune": "inflammatory",
    "lymphocyte": "inflammatory", "lymphocytes": "inflammatory", "plasma": "inflammatory",
    "plasma_cell": "inflammatory", "neutrophil": "inflammatory", "neutrophils": "inflammatory",
    "eosinophil": "inflammatory", "eosinophils": "inflammatory", "macrophage": "inflammatory",
    "macrophages": "inflammatory", "inflammatory_cell": "inflammatory",
    # stromal
    "stromal": "stromal", "stroma": "stromal", "spindle": "stromal", "spindle_other": "stromal",
    "fibroblast": "stromal", "fibroblasts": "stromal", "endothelial": "stromal", "connective": "stromal",
    "spindle_shaped": "stromal", "other": "stromal", "miscellaneous": "stromal", "muscle": "stromal",
}


#: How far from a centroid (model-grid px) its class probabilities are averaged (`read_class_probs`; 0 would be
#: the centroid's pixel). `benchmarks/classes.py --read-radius 0,2` measured both on the held-out images: the
#: 2 px (1 µm) disk gives equal or higher F_c for every class on BRCA-M2C and CoNSeP (up to +0.011).
CLASS_READ_RADIUS_PX = 2


def normalise_label(label: str) -> str:
    """`"Immune cells"`, `"immune-cells"` and `" IMMUNE_CELLS "` are one name: `immune_cells`."""
    return re.sub(r"[\s\-]+", "_", str(label).strip().lower())


@dataclass(frozen=True)
class ClassMap:
    """A user's label names → the model's classes, on top of `CLASS_ALIASES` (the user's entries win).

    `ignore` names labels that are no nucleus type the model knows (e.g. "Necrosis", "Unsure"): their points
    still count for detection but not for classes.
    """

    user: Mapping[str, str] = field(default_factory=dict)
    ignore: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, spec: str | None) -> "ClassMap":
        """`"Tumor cells=epithelial,TILs=inflammatory,Unsure=ignore"` (the CLI's `--class-map`), or None."""
        if not spec:
            return cls()
        user: dict[str, str] = {}
        ignore: set[str] = set()
        for item in spec.split(","):
            if not item.strip():
                continue
            name, sep, target = item.partition("=")
            target = normalise_label(target)
            if not sep or not name.strip():
                raise ValueError(f"--class-map: {item.strip()!r} is not NAME=CLASS (CLASS one of {', '.join(CLASSES)} or ignore)")
            if target == "ignore":
                ignore.add(normalise_label(name))
            elif target in CLASSES:
                user[normalise_label(name)] = target
            else:
                raise ValueError(f"--class-map: {target!r} is not a class (one of {', '.join(CLASSES)} or ignore)")
        return cls(user, frozenset(ignore))

    def class_of(self, label: str | None) -> str | None:
        """The model class of one label; None for no label, an ignored one, or one nobody mapped."""
        if label is None:
            return None
        key = normalise_label(label)
        if not key or key in self.ignore:
            return None
        return self.user.get(key) or CLASS_ALIASES.get(key)

    def indices(self, labels: Iterable[str | None], source: str = "") -> np.ndarray:
        """Class index (into `CLASSES`) per label, −1 where there is none; a label nobody mapped is an error
        naming it, so a typo never silently drops a class."""
        labels = list(labels)
        out = np.full(len(labels), -1, np.int64)
        unknown: set[str] = set()
        for i, label in enumerate(labels):
            if label is None or not str(label).strip() or normalise_label(label) in self.ignore:
                continue
            cls_name = self.class_of(label)
            if cls_name is None:
                unknown.add(str(label))
            else:
                out[i] = CLASSES.index(cls_name)
        if unknown:
            where = f"{source}: " if source else ""
            raise ValueError(f"{where}label(s) {', '.join(sorted(unknown))} map to no class; say what they are with "
                             f"--class-map 'NAME=CLASS' (CLASS one of {', '.join(CLASSES)} or ignore)")
        return out


def class_names(probs: np.ndarray) -> np.ndarray:
    """The most probable class of each row of an (N, K) probability array, as names."""
    probs = np.asarray(probs)
    if len(probs) == 0:
        return np.zeros(0, dtype=object)
    return np.asarray(CLASSES, dtype=object)[np.argmax(probs, axis=1)]


def read_class_probs(probs_map: np.ndarray, y_px: np.ndarray, x_px: np.ndarray, radius_px: float = 0.0) -> np.ndarray:
    """(N, K) class probabilities of an (H, W, K) map at centroids (pixel-index coordinates of that map).

    `radius_px` 0 reads the pixel holding the centroid; larger averages over the disk of that radius around it
    (clipped at the map's edge), which `benchmarks/classes.py` compares with reading one pixel."""
    h, w, k = probs_map.shape
    yi = np.clip(np.rint(np.asarray(y_px)).astype(np.int64), 0, h - 1)
    xi = np.clip(np.rint(np.asarray(x_px)).astype(np.int64), 0, w - 1)
    if radius_px <= 0 or len(yi) == 0:
        return probs_map[yi, xi].astype(np.float32)
    r = int(np.floor(radius_px))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = dy**2 + dx**2 <= radius_px**2
    dy, dx = dy[inside], dx[inside]
    ys = np.clip(yi[:, None] + dy[None], 0, h - 1)
    xs = np.clip(xi[:, None] + dx[None], 0, w - 1)
    return probs_map[ys, xs].mean(axis=1).astype(np.float32)
