"""Score detected nucleus centres against annotated ones: one-to-one matching within a radius.

A detection is a true positive when it is paired with an annotated nucleus no farther than the radius,
each nucleus and each detection in at most one pair. Among all such pairings the one with the most
pairs is used (ties: the smallest summed distance); greedy nearest-first matching can lose pairs in
chains of crowded nuclei and would score a detector lower than its detections deserve. Precision, recall and F1 of a set are micro-averaged: counts
are summed over images before the ratios are taken, so images weigh by their nucleus count.

Everything here is in level-0 pixels (x = column, y = row); a caller with a radius in micrometres
converts it once, `radius_px = radius_um / mpp`.
"""
from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

from .annotations import label_centroids, read_label_map, read_points
from ..io.files import atomic_path

__all__ = [
    "Score",
    "match_points",
    "score_image",
    "evaluate_sets",
    "format_table",
    "write_scores_csv",
    "read_predictions",
    "detect_images",
]

TOTAL_ROW = "ALL (micro)"
_COLUMNS = ("image", "n_true", "n_pred", "tp", "fp", "fn", "precision", "recall", "f1")


@dataclass(frozen=True)
class Score:
    """Counts of one image or, summed with `+`, of a set (micro-average)."""

    tp: int
    fp: int
    fn: int

    @property
    def n_pred(self) -> int:
        return self.tp + self.fp

    @property
    def n_true(self) -> int:
        return self.tp + self.fn

    @property
    def precision(self) -> float:
        """0 without predictions: a ratio of nothing would otherwise turn a table's total into NaN."""
        return self.tp / self.n_pred if self.n_pred else 0.0

    @property
    def recall(self) -> float:
        return self.tp / self.n_true if self.n_true else 0.0

    @property
    def f1(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 0.0

    def __add__(self, other: Score) -> Score:
        if not isinstance(other, Score):
            return NotImplemented
        return Score(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def __radd__(self, other: object) -> Score:
        """Lets `sum(scores)` start from its default 0."""
        if other == 0:
            return self
        return NotImplemented


def match_points(pred_xy: np.ndarray, true_xy: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (pred_idx, true_idx) of the one-to-one pairs no farther apart than `radius_px` (inclusive).

    The pairing has the most pairs possible, and among those the smallest summed distance. Only pairs
    within the radius are ever considered (found with a k-d tree) and the assignment is solved on that
    sparse set of candidates, which keeps thousands of points per image in the tens of milliseconds.
    Pairs are returned sorted by prediction index.
    """
    pred = _as_points(pred_xy, "pred_xy")
    true = _as_points(true_xy, "true_xy")
    _check_radius(radius_px)
    if not len(pred) or not len(true):
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    i, j, distance = _pairs_within(pred, true, radius_px)
    return _max_matching(i, j, distance, len(pred), len(true))


def score_image(
    pred_xy: np.ndarray,
    true_xy: np.ndarray | None,
    radius_px: float,
    label_map: np.ndarray | None = None,
) -> Score:
    """TP, FP and FN of one image.

    Without `label_map`, TP is the number of pairs of `match_points`.

    With an instance label map (MoNuSeg's rule), the nuclei are the map's labels, and a detection may be
    paired with a nucleus when it lies within `radius_px` of the label's centroid *or* inside the label's
    pixels (at the pixel its coordinates round to): a detection on a large or elongated nucleus, off its
    centroid, still finds it. Pairing stays one-to-one and maximal, as above. Nuclei are identified by
    label, not by `true_xy`, because a centroid can lie outside its own non-convex mask, so points cannot
    be assigned to labels by lookup; with a label map `true_xy` is therefore not used (pass None).
    """
    pred = _as_points(pred_xy, "pred_xy")
    _check_radius(radius_px)
    if label_map is None:
        if true_xy is None:
            raise ValueError("true_xy is required without a label map")
        true = _as_points(true_xy, "true_xy")
        tp = len(match_points(pred, true, radius_px)[0])
        return Score(tp, len(pred) - tp, len(true) - tp)

    label_map = np.asarray(label_map)
    labels, centroids = label_centroids(label_map)
    if not len(pred) or not len(labels):
        return Score(0, len(pred), len(labels))
    i, j, distance = _pairs_within(pred, centroids, radius_px)

    # Detections inside a mask, paired with that label, at their distance to its centroid.
    col = np.floor(pred[:, 0] + 0.5).astype(np.int64)
    row = np.floor(pred[:, 1] + 0.5).astype(np.int64)
    on_map = (row >= 0) & (row < label_map.shape[0]) & (col >= 0) & (col < label_map.shape[1])
    inside = np.flatnonzero(on_map)
    hit = label_map[row[inside], col[inside]]
    inside, hit = inside[hit != 0], hit[hit != 0]
    nucleus = np.searchsorted(labels, hit)
    inside_distance = np.hypot(*(pred[inside] - centroids[nucleus]).T)

    i = np.concatenate([i, inside])
    j = np.concatenate([j, nucleus])
    distance = np.concatenate([distance, inside_distance])
    tp = len(_max_matching(i, j, distance, len(pred), len(labels))[0])
    return Score(tp, len(pred) - tp, len(labels) - tp)


def evaluate_sets(
    pred: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    radius_px: float | Mapping[str, float],
    label_maps: Mapping[str, str | os.PathLike[str] | np.ndarray] | None = None,
) -> tuple[dict[str, Score], Score]:
    """Per-image scores (in the order of `truth`) and their micro-averaged total.

    Every annotated image is scored: one without predictions scores all its nuclei as missed rather than
    being dropped, which would flatter the total. Predicted images without annotations cannot be scored
    and are left out. Both cases raise one warning each, naming the images, since they usually mean
    mismatched file names. `radius_px` may differ per image (images of different pixel sizes).

    Images listed in `label_maps` (label map arrays or files) are scored with the label-map rule of
    `score_image`, so their nuclei are the map's labels. Where the annotated points count differently
    (MoNuSeg's polygons and label maps differ by a nucleus here and there), a warning names the image.
    """
    label_maps = label_maps or {}
    per_image: dict[str, Score] = {}
    missing: list[str] = []
    recounted: list[str] = []
    for name, true_xy in truth.items():
        radius = _radius_for(radius_px, name)
        label_map = label_maps.get(name)
        source = f"image {name!r}"
        if label_map is not None and not isinstance(label_map, np.ndarray):
            source = str(label_map)
            label_map = read_label_map(label_map)
        if name not in pred:
            missing.append(name)
        try:
            per_image[name] = score_image(pred.get(name, np.zeros((0, 2))), true_xy, radius, label_map)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        if label_map is not None and per_image[name].n_true != len(true_xy):
            recounted.append(f"{name}: {per_image[name].n_true} labels, {len(true_xy)} points")
    _warn_mismatches(per_image, missing, recounted, [name for name in pred if name not in truth])
    return per_image, sum(per_image.values(), Score(0, 0, 0))


def _radius_for(radius_px: float | Mapping[str, float], name: str) -> float:
    if isinstance(radius_px, Mapping):
        if name not in radius_px:
            raise ValueError(f"no radius_px given for image {name!r}")
        return float(radius_px[name])
    return float(radius_px)


def _warn_mismatches(per_image: Mapping[str, Score], missing: list[str], recounted: list[str], extra: list[str]) -> None:
    """One warning per kind of mismatch between predictions, points and label maps (stacklevel: evaluate_sets' caller)."""
    if missing:
        lost = sum(per_image[name].fn for name in missing)
        warnings.warn(
            f"no predictions for {len(missing)} of {len(per_image)} annotated images ({_some(missing)}): "
            f"their {lost} nuclei count as missed",
            stacklevel=3,
        )
    if recounted:
        warnings.warn(
            f"label maps and annotated points count different nuclei ({_some(recounted, 3)}): "
            "scored against the label maps",
            stacklevel=3,
        )
    if extra:
        warnings.warn(
            f"predictions for {len(extra)} images without annotations ({_some(extra)}): not scored", stacklevel=3
        )


def format_table(per_image: Mapping[str, Score], total: Score) -> str:
    """Aligned plain-text table for a terminal or a log, one row per image and the total last."""
    rows = [list(_COLUMNS)] + [_row(name, s, 3) for name, s in per_image.items()] + [_row(TOTAL_ROW, total, 3)]
    widths = [max(len(r[k]) for r in rows) for k in range(len(_COLUMNS))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *map(line, rows[1:-1]), rule, line(rows[-1])]) + "\n"


def write_scores_csv(path: str | os.PathLike[str], per_image: Mapping[str, Score], total: Score) -> Path:
    """The table of `format_table` as CSV, total last; written atomically so a reader never sees half a file."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_COLUMNS)
    writer.writerows(_row(name, s, 6) for name, s in per_image.items())
    writer.writerow(_row(TOTAL_ROW, total, 6))
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return Path(path)


def read_predictions(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """{image stem: (N, 2) x, y} of wsiproc's detection CSVs: a results folder or one `<stem>.csv`.

    The stem is used exactly as written, because wsiproc names each result after its input image.
    Score tables (`*_scores.csv`), the cohort table (`summary.csv`) and hidden temporary files in the folder
    are skipped. A table holding many images (`image,x,y`) is read with `wsiproc.evaluate.annotations.read_points` instead.
    """
    from ..cohort.summary import SUMMARY_NAME

    path = Path(path)
    if path.is_dir():
        files = sorted(
            p for p in path.glob("*.csv")
            if not p.name.endswith("_scores.csv") and not p.name.startswith(".") and p.name != SUMMARY_NAME
        )
        if not files:
            raise ValueError(f"{path}: no prediction files (<image>.csv) in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    out: dict[str, np.ndarray] = {}
    for file in files:
        out.update(read_points(file, image=file.stem))
    return out


# ----------------------------------------------------------------------------------------- internals


def _as_points(xy: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(xy, dtype=np.float64)
    if points.size == 0:
        return points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} has shape {points.shape}, expected (N, 2) x, y")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{name} has non-finite coordinates")
    return points


def _check_radius(radius_px: float) -> None:
    if not (isinstance(radius_px, (int, float, np.number)) and math.isfinite(radius_px) and radius_px > 0):
        raise ValueError(f"radius_px must be a positive number of pixels, got {radius_px!r}")


def _pairs_within(a: np.ndarray, b: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (index in a, index in b, distance) with distance <= radius, coincident points included."""
    pairs = cKDTree(a).sparse_distance_matrix(cKDTree(b), radius_px, output_type="ndarray")
    keep = pairs["v"] <= radius_px
    return pairs["i"][keep].astype(np.intp), pairs["j"][keep].astype(np.intp), pairs["v"][keep]


def _max_matching(
    i: np.ndarray, j: np.ndarray, cost: np.ndarray, n_left: int, n_right: int
) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-cardinality, then minimum-cost, one-to-one matching using only the edges (i, j, cost).

    Solved as a minimum-weight full matching of a sparse bipartite graph (scipy's LAPJVsp), so time
    and memory grow with the candidate pairs, not with n_left * n_right: a dense assignment matrix
    would need gigabytes for a large region. A full matching must cover the smaller side, which real
    pairs alone rarely can, so each node of that side gets a private stand-in partner at cost `big`.
    `big` exceeds any sum of real costs a matching can have, so one more real pair always beats any
    saving in distance: the solver maximises pairs first, then minimises their summed cost. Costs are
    shifted by 1 because the solver treats zero weights (coincident points) as missing edges; every
    full matching has the same number of edges, so the shift changes no comparison.
    """
    if not len(i):
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    order = np.lexsort((cost, j, i))  # repeated edges: keep the cheapest
    i, j, cost = i[order], j[order], cost[order]
    first = np.r_[True, (np.diff(i) != 0) | (np.diff(j) != 0)]
    i, j, cost = i[first], j[first], cost[first]

    swap = n_left > n_right  # the smaller side is the one that must be covered
    rows, cols, n_rows, n_cols = (j, i, n_right, n_left) if swap else (i, j, n_left, n_right)
    big = (float(cost.max()) + 2.0) * (n_rows + 1)
    stand_in = np.arange(n_rows)
    graph = csr_matrix(
        (np.r_[cost + 1.0, np.full(n_rows, big)], (np.r_[rows, stand_in], np.r_[cols, n_cols + stand_in])),
        shape=(n_rows, n_cols + n_rows),
    )
    _, partner = min_weight_full_bipartite_matching(graph)
    real = partner < n_cols
    matched_rows, matched_cols = np.flatnonzero(real), partner[real].astype(np.intp)
    pred_idx, true_idx = (matched_cols, matched_rows) if swap else (matched_rows, matched_cols)
    by_pred = np.argsort(pred_idx, kind="stable")
    return pred_idx[by_pred], true_idx[by_pred]


def _row(name: str, score: Score, decimals: int) -> list[str]:
    counts = [score.n_true, score.n_pred, score.tp, score.fp, score.fn]
    ratios = [score.precision, score.recall, score.f1]
    return [name, *map(str, counts), *(f"{v:.{decimals}f}" for v in ratios)]


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def detect_images(images, predictor, cfg) -> dict[str, np.ndarray]:
    """Nucleus centres (level-0 x, y) of annotated images (`datasets.AnnotatedImage`), through the same `detect`
    as a run: what every accuracy figure of a model is computed from."""
    from ..detection.loop import detect
    from ..io.slide import open_slide

    out = {}
    for im in images:
        slide = open_slide(im.path, mpp=im.mpp)
        try:
            out[im.name] = detect(slide, cfg, predictor).detections.xy
        finally:
            slide.close()
    return out
