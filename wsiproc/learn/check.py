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
from ..evaluate.scoring import Score, detect_images, evaluate_sets

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
        inside = getattr(im, "inside", None)
        pred[im.name] = found[im.name][inside(found[im.name])] if inside else found[im.name]
        truth[im.name] = im.points_xy[inside(im.points_xy)] if inside else im.points_xy
    return pred, truth


def held_out_score(images: Sequence, predictor, radius_um: float = RADIUS_UM) -> Score:
    """The micro-averaged score of `predictor` on annotated images."""
    pred, truth = scored_points(images, predictor)
    return evaluate_sets(pred, truth, {im.name: radius_um / im.mpp for im in images})[1]


def check(domains: Sequence, models: dict[str, Path], radius_um: float = RADIUS_UM) -> list[DomainCheck]:
    """Each domain with held-out images, scored with every model of `models` ({label: model file})."""
    from ..detection.inference import Predictor

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
