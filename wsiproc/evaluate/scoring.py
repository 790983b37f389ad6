"""Score detected nucleus centres against annotated ones: one-to-one matching within a radius.

A detection is a true positive when it is paired with an annotated nucleus no farther than the radius,
each nucleus and each detection in at most one pair. Among all such pairings the one with the most
pairs is used (ties: the smallest summed distance); greedy nearest-first matching can lose pairs in
chains of crowded nuclei and would score a detector lower than its detections deserve. Precision, recall and F1 of a set are micro-averaged: counts
are summed over images before the ratios are taken, so images weigh by their nucleus count.

Nucleus types (`ClassScore`, `score_classes`) are scored after that same class-blind matching, as the field
does (HoVer-Net, Graham et al. 2019): the classes of matched pairs are compared, and every detection error
is charged to each class' F_c as well.

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

from ..io.annotations import Points, label_centroids, read_label_map, read_labelled_points
from ..detection.classes import CLASSES
from ..io.files import atomic_path
from ..cohort.summary import SUMMARY_NAME

__all__ = [
    "Score",
    "match_points",
    "score_image",
    "evaluate_sets",
    "format_table",
    "write_scores_csv",
    "ClassScore",
    "score_classes",
    "evaluate_class_sets",
    "format_class_table",
    "write_class_scores_csv",
    "read_predictions",
    "read_labelled_predictions",
    "prediction_class_index",
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
    are skipped. A table holding many images (`image,x,y`) is read with `wsiproc.io.annotations.read_points` instead.
    Classes as well: `read_labelled_predictions`.
    """
    return {name: points.xy for name, points in read_labelled_predictions(path).items()}


def read_labelled_predictions(path: str | os.PathLike[str]) -> dict[str, Points]:
    """`read_predictions` with each nucleus' class: {image stem: `Points`}, `labels` the CSV's `class` column
    (names of `CLASSES`, which wsiproc writes for a model with a class head) or None for results without one."""
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
    out: dict[str, Points] = {}
    for file in files:
        out.update(read_labelled_points(file, image=file.stem))
    return out


def prediction_class_index(labels: np.ndarray, source: str = "") -> np.ndarray:
    """Class index (into `CLASSES`) of each predicted class name, −1 for an empty one. Predictions name the
    model's classes exactly, so any other name is an error naming `source` (results of another tool, or a
    file edited by hand), never silently a miss."""
    names = {name: k for k, name in enumerate(CLASSES)}
    out = np.full(len(labels), -1, np.int64)
    unknown: set[str] = set()
    for n, label in enumerate(labels):
        if label is None:
            continue
        if label in names:
            out[n] = names[label]
        else:
            unknown.add(str(label))
    if unknown:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}predicted class(es) {', '.join(sorted(unknown))} are none of {', '.join(CLASSES)}")
    return out

# --------------------------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class ClassScore:
    """Counts of a class-aware detection score of one image or, summed with `+`, of a set (micro-average).

    Predictions and truths are first paired exactly as `score_image` pairs them (`match_points`); classes play
    no part in the pairing, so the detection counts (`tp_d`, `fp_d`, `fn_d`) are those of `Score`. Then, per
    class c (tuples in the order of `classes`), over the matched pairs whose truth has a class:
    `tp_c` both c, `tn_c` neither c, `fp_c` prediction c and truth another class, `fn_c` truth c and
    prediction another class (or none). `fp_u` / `fn_u` count the unmatched predictions / truths of class c,
    and `n_pred` all predictions of class c. A matched pair whose truth has no class (label −1: unlabelled or
    ignored) counts for detection only, in no class count: nobody said what the nucleus is, so neither a right
    nor a wrong class can be scored.
    """

    tp_c: tuple[int, ...]
    tn_c: tuple[int, ...]
    fp_c: tuple[int, ...]
    fn_c: tuple[int, ...]
    fp_u: tuple[int, ...]
    fn_u: tuple[int, ...]
    n_pred: tuple[int, ...]
    tp_d: int
    fp_d: int
    fn_d: int
    classes: tuple[str, ...] = CLASSES

    @classmethod
    def empty(cls, classes: tuple[str, ...] = CLASSES) -> "ClassScore":
        zeros = (0,) * len(classes)
        return cls(zeros, zeros, zeros, zeros, zeros, zeros, zeros, 0, 0, 0, tuple(classes))

    @property
    def detection(self) -> Score:
        """The detection counts as a `Score` (what `format_table` shows)."""
        return Score(self.tp_d, self.fp_d, self.fn_d)

    @property
    def f_d(self) -> float:
        """Detection F1: 2 TP_d / (2 TP_d + FP_d + FN_d)."""
        return self.detection.f1

    def _index(self, c: int | str) -> int:
        """A class by name or by index into `classes`."""
        return self.classes.index(c) if isinstance(c, str) else int(c)

    def n_true(self, c: int | str) -> int:
        """Annotated nuclei of class c, matched or not."""
        k = self._index(c)
        return self.tp_c[k] + self.fn_c[k] + self.fn_u[k]

    def f_c(self, c: int | str) -> float:
        """HoVer-Net's classification F (Graham et al. 2019, eq. 7, α = 2, 2, 1, 1):
        2(TP_c + TN_c) / (2(TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_d + FN_d). It scores the class among the
        detected nuclei and charges every detection error too, so it is the figure papers report as F_c."""
        k = self._index(c)
        right = self.tp_c[k] + self.tn_c[k]
        denominator = 2 * right + 2 * self.fp_c[k] + 2 * self.fn_c[k] + self.fp_d + self.fn_d
        return 2 * right / denominator if denominator else 0.0

    def counts(self, c: int | str) -> Score:
        """Plain counts of class c after the global matching: TP matched pairs both c; FP predictions of c
        unmatched or matched to a truth of another class; FN truths of c unmatched or matched to a prediction
        of another class."""
        k = self._index(c)
        return Score(self.tp_c[k], self.fp_c[k] + self.fp_u[k], self.fn_c[k] + self.fn_u[k])

    def f1(self, c: int | str) -> float:
        return self.counts(c).f1

    def precision(self, c: int | str) -> float:
        return self.counts(c).precision

    def recall(self, c: int | str) -> float:
        return self.counts(c).recall

    def __add__(self, other: "ClassScore") -> "ClassScore":
        if not isinstance(other, ClassScore):
            return NotImplemented
        if other.classes != self.classes:
            raise ValueError(f"cannot add class scores of classes {self.classes} and {other.classes}")

        def add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(x + y for x, y in zip(a, b))

        return ClassScore(add(self.tp_c, other.tp_c), add(self.tn_c, other.tn_c), add(self.fp_c, other.fp_c),
                          add(self.fn_c, other.fn_c), add(self.fp_u, other.fp_u), add(self.fn_u, other.fn_u),
                          add(self.n_pred, other.n_pred), self.tp_d + other.tp_d, self.fp_d + other.fp_d,
                          self.fn_d + other.fn_d, self.classes)

    def __radd__(self, other: object) -> "ClassScore":
        """Lets `sum(scores)` start from its default 0."""
        if other == 0:
            return self
        return NotImplemented


def score_classes(
    pred_xy: np.ndarray,
    pred_class: np.ndarray,
    true_xy: np.ndarray,
    true_class: np.ndarray,
    radius_px: float,
    classes: tuple[str, ...] = CLASSES,
) -> ClassScore:
    """The `ClassScore` of one image: points paired by `match_points` (as `score_image`), then classes compared.

    `pred_class` and `true_class` are class indices into `classes`, −1 for none (a truth nobody labelled, or
    one whose label is ignored; a prediction of a model without classes). A truth of −1 still counts for
    detection but is left out of every class count of its pair; a prediction of −1 is "not c" for every c.
    """
    pred = _as_points(pred_xy, "pred_xy")
    true = _as_points(true_xy, "true_xy")
    k = len(classes)
    pc = _class_index(pred_class, len(pred), k, "pred_class")
    tc = _class_index(true_class, len(true), k, "true_class")
    i, j = match_points(pred, true, radius_px)
    p, t = pc[i], tc[j]
    labelled = t >= 0
    p, t = p[labelled], t[labelled]
    unmatched_pred = np.ones(len(pred), bool)
    unmatched_pred[i] = False
    unmatched_true = np.ones(len(true), bool)
    unmatched_true[j] = False

    def per_class(values: np.ndarray) -> tuple[int, ...]:
        return tuple(int(n) for n in np.bincount(values[values >= 0], minlength=k))

    both = per_class(p[p == t])
    pred_c, true_c = per_class(p), per_class(t)
    return ClassScore(
        tp_c=both,
        tn_c=tuple(len(t) - pred_c[c] - true_c[c] + both[c] for c in range(k)),
        fp_c=tuple(pred_c[c] - both[c] for c in range(k)),
        fn_c=tuple(true_c[c] - both[c] for c in range(k)),
        fp_u=per_class(pc[unmatched_pred]),
        fn_u=per_class(tc[unmatched_true]),
        n_pred=per_class(pc),
        tp_d=len(i),
        fp_d=len(pred) - len(i),
        fn_d=len(true) - len(i),
        classes=tuple(classes),
    )


def evaluate_class_sets(
    pred: Mapping[str, tuple[np.ndarray, np.ndarray]],
    truth: Mapping[str, tuple[np.ndarray, np.ndarray]],
    radius_px: float | Mapping[str, float],
    classes: tuple[str, ...] = CLASSES,
) -> tuple[dict[str, ClassScore], ClassScore]:
    """Per-image class scores (in the order of `truth`) and their sum, as `evaluate_sets` does for detection.

    `pred` and `truth` map image names to (xy, class index) pairs. An annotated image without predictions
    scores all its nuclei as missed; predicted images without annotations are left out (`evaluate_sets` is
    the one that warns about both, and callers run it first on the same images).
    """
    per_image: dict[str, ClassScore] = {}
    no_pred = (np.zeros((0, 2)), np.zeros(0, np.int64))
    for name, (true_xy, true_class) in truth.items():
        pred_xy, pred_class = pred.get(name, no_pred)
        try:
            per_image[name] = score_classes(pred_xy, pred_class, true_xy, true_class, _radius_for(radius_px, name), classes)
        except ValueError as exc:
            raise ValueError(f"image {name!r}: {exc}") from None
    return per_image, sum(per_image.values(), ClassScore.empty(classes))


_CLASS_COLUMNS = ("class", "n_true", "n_pred", "f_c", "f1", "precision", "recall")
_CLASS_CSV_COLUMNS = ("class", "n_true", "n_pred", "tp", "fp", "fn", "precision", "recall", "f1", "f_c",
                      "tp_c", "tn_c", "fp_c", "fn_c", "fp_d", "fn_d")
DETECTION_ROW = "detection"


def format_class_table(score: ClassScore, radius_um: float | None = None) -> str:
    """Aligned plain-text table of a class score: a first line with F_d, then per class n_true, n_pred, F_c
    (HoVer-Net's), and the plain F1, precision and recall of the class after the global matching."""
    within = f" within {radius_um:g} µm" if radius_um is not None else ""
    d = score.detection
    head = (f"detection F_d {score.f_d:.3f}{within} (tp {d.tp}, fp {d.fp}, fn {d.fn}); "
            f"F_c: HoVer-Net's class F, F1: per class after the same matching")
    rows = [list(_CLASS_COLUMNS)]
    for k, name in enumerate(score.classes):
        ratios = (score.f_c(k), score.f1(k), score.precision(k), score.recall(k))
        rows.append([name, str(score.n_true(k)), str(score.n_pred[k]), *(f"{v:.3f}" for v in ratios)])
    widths = [max(len(r[k]) for r in rows) for k in range(len(_CLASS_COLUMNS))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    unlabelled = d.n_true - sum(score.n_true(k) for k in range(len(score.classes)))
    tail = [f"({unlabelled} annotated nuclei without a class count for detection only)"] if unlabelled else []
    return "\n".join([head, line(rows[0]), rule, *map(line, rows[1:]), *tail]) + "\n"


def write_class_scores_csv(path: str | os.PathLike[str], score: ClassScore) -> Path:
    """A class score as CSV: a `detection` row (its f1 is F_d) and one row per class with the plain counts, F1
    and F_c and the matched-pair counts F_c is computed from; written atomically like `write_scores_csv`.
    Name it `*_scores.csv` so that `read_predictions` never takes it for results."""
    d = score.detection
    rows = [[DETECTION_ROW, d.n_true, d.n_pred, d.tp, d.fp, d.fn, f"{d.precision:.6f}", f"{d.recall:.6f}",
             f"{d.f1:.6f}", "", "", "", "", "", d.fp, d.fn]]
    for k, name in enumerate(score.classes):
        c = score.counts(k)
        rows.append([name, score.n_true(k), score.n_pred[k], c.tp, c.fp, c.fn, f"{c.precision:.6f}",
                     f"{c.recall:.6f}", f"{c.f1:.6f}", f"{score.f_c(k):.6f}", score.tp_c[k], score.tn_c[k],
                     score.fp_c[k], score.fn_c[k], score.fp_d, score.fn_d])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CLASS_CSV_COLUMNS)
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return Path(path)


def _class_index(values: np.ndarray, n: int, k: int, name: str) -> np.ndarray:
    out = np.asarray(values).reshape(-1)
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries for {n} points")
    if out.size and not np.issubdtype(out.dtype, np.integer):
        raise ValueError(f"{name} must be class indices (integers), got {out.dtype}")
    out = out.astype(np.int64)
    if out.size and (out.min() < -1 or out.max() >= k):
        raise ValueError(f"{name} has indices outside -1 … {k - 1}")
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
