"""Did training work? Held-out F1 of a new model against the one it started from, on each domain's held-out images.

Both models run as `wsiproc run` would run them (the engine and precision `Predictor` picks, run defaults, no
tissue mask: annotated images are tissue throughout), and their nuclei are scored with the evaluator's
one-to-one matching within `radius_um` (5 µm, the paper's), counts summed over a domain's images. On partly
annotated images only the annotated regions are scored, for detections and annotations alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import RunConfig
from ..detection.images import detect_images, detections_of_images
from ..evaluate.scoring import Score, evaluate_class_sets, evaluate_sets
from ..detection.inference import Predictor

RADIUS_UM = 5.0


@dataclass(frozen=True)
class DomainCheck:
    """One domain's held-out score for each model checked, by label ("before", "after")."""

    domain: str
    images: int
    scores: dict

    def to_dict(self) -> dict:
        return {"domain": self.domain, "images": self.images, **{
            label: {"tp": s.tp, "fp": s.fp, "fn": s.fn, "precision": round(s.precision, 4),
                    "recall": round(s.recall, 4), "f1": round(s.f1, 4)} for label, s in self.scores.items()}}


def scored_points(images: Sequence, predictor) -> tuple[dict, dict]:
    """({image: detections}, {image: annotations}) on annotated images (`LabImage` or `datasets.AnnotatedImage`),
    both kept to the annotated regions of partly annotated images: what `held_out_score` and `wsiproc evaluate
    --model` score."""
    found = detect_images(images, predictor, RunConfig(tissue_mask=False))
    pred, truth = {}, {}
    for im in images:
        pred[im.name] = found[im.name][in_regions(im, found[im.name])]
        truth[im.name] = im.points_xy[in_regions(im, im.points_xy)]
    return pred, truth


def in_regions(image, xy: np.ndarray) -> np.ndarray:
    """Which points `xy` lie in the image's annotated regions (`LabImage.inside`; all, for images without)."""
    inside = getattr(image, "inside", None)
    return inside(xy) if inside else np.ones(len(xy), bool)


def held_out_score(images: Sequence, predictor, radius_um: float = RADIUS_UM) -> Score:
    """The micro-averaged score of `predictor` on annotated images."""
    pred, truth = scored_points(images, predictor)
    return evaluate_sets(pred, truth, {im.name: radius_um / im.mpp for im in images})[1]


def check(domains: Sequence, models: dict[str, Path], radius_um: float = RADIUS_UM) -> list[DomainCheck]:
    """Each domain with held-out images, scored with every model of `models` ({label: model file})."""
    predictors = {label: Predictor(path) for label, path in models.items()}
    out = []
    for domain in domains:
        if not domain.held_out:
            continue
        out.append(DomainCheck(domain.name, len(domain.held_out),
                               {label: held_out_score(domain.held_out, p, radius_um) for label, p in predictors.items()}))
    return out


def format_check(checks: Sequence[DomainCheck]) -> str:
    """A table: one row per domain, precision / recall / F1 for each model and the F1 change."""
    if not checks:
        return "no held-out images: nothing to check (give held-out images to see whether training helped)"
    labels = list(checks[0].scores)
    head = "| domain | held-out images | " + " | ".join(f"{label} P / R / F1" for label in labels)
    head += " | F1 change |" if len(labels) == 2 else " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in checks:
        cells = " | ".join(f"{s.precision:.3f} / {s.recall:.3f} / {s.f1:.3f}" for s in c.scores.values())
        change = ""
        if len(labels) == 2:
            a, b = (c.scores[label].f1 for label in labels)
            change = f" {b - a:+.3f} |"
        lines.append(f"| {c.domain} | {c.images} | {cells} |{change}")
    return "\n".join(lines)


def mean_f1(checks: Sequence[DomainCheck], label: str) -> float:
    return float(np.mean([c.scores[label].f1 for c in checks])) if checks else float("nan")


#: HoVer-Net's matching radius for nucleus types (Graham et al. 2019), which the class figures use.
CLASS_RADIUS_UM = 3.0


@dataclass(frozen=True)
class ClassCheck:
    """One domain's held-out class scores (`ClassScore`) for each model with a class head, by label."""

    domain: str
    images: int
    scores: dict

    def to_dict(self) -> dict:
        return {"domain": self.domain, "images": self.images, "radius_um": CLASS_RADIUS_UM, **{
            label: {"f_d": round(s.f_d, 4), **{f"f_c_{c}": round(s.f_c(c), 4) for c in s.classes},
                    **{f"f1_{c}": round(s.f1(c), 4) for c in s.classes}} for label, s in self.scores.items()}}


def class_check(domains: Sequence, models: dict[str, Path], class_map, radius_um: float = CLASS_RADIUS_UM) -> list[ClassCheck]:
    """Each domain whose held-out images carry class labels, scored with every model of `models` that has a
    class head (HoVer-Net's protocol: `evaluate.scoring.score_classes` within `radius_um`)."""
    predictors = {label: p for label, path in models.items() if (p := Predictor(path)).classes}
    out = []
    for domain in domains:
        images = [im for im in domain.held_out if getattr(im, "labels", None) is not None
                  and any(class_map.class_of(v) for v in im.labels if v is not None)]
        if not images or not predictors:  # no held-out label names a class (e.g. QuPath's "Nucleus"): nothing to check
            continue
        by_name = {im.name: im for im in images}
        truth = {}
        for im in images:
            cls = class_map.indices(im.labels, im.name)
            inside = in_regions(im, im.points_xy)
            truth[im.name] = (im.points_xy[inside], cls[inside])
        scores = {}
        for label, p in predictors.items():
            pred = {}
            for name, det in detections_of_images(images, p, RunConfig(tissue_mask=False)).items():
                inside = in_regions(by_name[name], det.xy)
                pred[name] = (det.xy[inside], np.argmax(det.class_probs, axis=1)[inside])
            scores[label] = evaluate_class_sets(pred, truth, {im.name: radius_um / im.mpp for im in images})[1]
        out.append(ClassCheck(domain.name, len(images), scores))
    return out


def format_class_check(checks: Sequence[ClassCheck]) -> str:
    """A table: one row per domain and model, F_d and each class' F_c (HoVer-Net's) and F1."""
    if not checks:
        return ""
    classes = next(iter(checks[0].scores.values())).classes
    head = "| domain | model | F_d | " + " | ".join(f"F_c {c}" for c in classes) + " | " + " | ".join(f"F1 {c}" for c in classes) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in checks:
        for label, s in c.scores.items():
            lines.append(f"| {c.domain} | {label} | {s.f_d:.3f} | " + " | ".join(f"{s.f_c(k):.3f}" for k in classes)
                         + " | " + " | ".join(f"{s.f1(k):.3f}" for k in classes) + " |")
    return "\n".join(lines)
