"""Train on annotated domains and check the result: what `wsiproc train` does, as one library call.

    domains = [lab_domain("lab", "images/", "points.geojson", mpp=0.5)]
    result = train_on_domains(domains, "lab.keras", RECIPES["fine-tune"], Start(init_model=DEFAULT_MODEL_PATH))
    result.provenance["check"]   # held-out F1 before and after, per domain

Steps: every domain's training images are read once at 0.5 µm/px; batches come from `DomainSampler` (the shipped
and fine-tuning recipes: equal domain sampling, or `shipped_share` of the built-in domains mixed into a lab's) or
`BlockSampler` (the paper's recipe); `trainer.fit` trains and checkpoints; the held-out check scores the new model
against the starting one; `<out>.json` beside the model records the recipe, start, domains, training history,
check and sha256s (written last, under a temporary name).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..io.files import atomic_write_text, file_sha256
from .annotated import Domain
from .check import DomainCheck, check, format_check
from .trainer import ProgressFn, Recipe, Start, fit
from .training import BlockSampler, DomainSampler, TrainConfig, TrainingImage


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    provenance: dict
    checks: tuple

    def table(self) -> str:
        return format_check(self.checks)


def provenance_path(model_path: str | Path) -> Path:
    """`<model>.json` beside the model, the convention `wsiproc adapt` uses too."""
    return Path(model_path).with_suffix(".json")


def training_images(domain: Domain) -> list[TrainingImage]:
    """A domain's training part at 0.5 µm/px, with each image's annotated regions."""
    return [TrainingImage.from_level0(im.name, im.read_rgb(), im.points_xy, im.mpp, getattr(im, "regions", None) or None)
            for im in domain.train]


def make_source(domains: Sequence[Domain], recipe: Recipe, images: dict[str, list[TrainingImage]] | None = None):
    """The batch source a recipe trains on: `DomainSampler` for crops of every domain, `BlockSampler` for the
    paper's recipe (one domain's blocks around annotated nuclei). `images`: already loaded training images."""
    images = images if images is not None else {d.name: training_images(d) for d in domains}
    if recipe.name == "paper":
        cfg = TrainConfig(block_px=recipe.crop_px, batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
                          disk_radius_px=int(round(recipe.disk_radius_px)), seed=recipe.seed)
        return BlockSampler([im for ims in images.values() for im in ims], cfg)
    shares = None
    if recipe.shipped_share > 0:
        own = [d.name for d in domains if not d.builtin]
        shipped = [d.name for d in domains if d.builtin]
        if not own or not shipped:
            raise ValueError("shipped_share mixes built-in data sets into a lab's images: give both (--data and a lab's images)")
        shares = {n: (1 - recipe.shipped_share) / len(own) for n in own}
        shares.update({n: recipe.shipped_share / len(shipped) for n in shipped})
    return DomainSampler(images, recipe.crop_px, recipe.batch_size, recipe.disk_radius_px, recipe.augment, recipe.seed, shares)


def train_on_domains(domains: Sequence[Domain], out_path: str | Path, recipe: Recipe, start: Start = Start(),
                     work_dir: str | Path | None = None, precision: str = "auto", workers: int = 0,
                     checkpoint_s: float = 180.0, check_domains: Sequence[Domain] | None = None,
                     progress: ProgressFn | None = None, echo: Callable[[str], None] = print) -> TrainResult:
    """Train `out_path` on `domains` with `recipe` from `start`, check it on the held-out images, record it all.

    `check_domains` (default: `domains`) are the domains whose held-out images are scored; the starting model (when
    there is one) is scored beside the new one. Calling again with the same `work_dir` resumes the training.
    """
    out_path = Path(out_path)
    work_dir = Path(work_dir) if work_dir is not None else out_path.with_name(out_path.stem + "_checkpoints")
    t0 = time.perf_counter()
    images = {d.name: training_images(d) for d in domains}
    n_points = sum(len(im.points_xy) for ims in images.values() for im in ims)
    echo(f"training on {sum(map(len, images.values()))} images, {n_points} annotated nuclei "
         f"({', '.join(f'{n}: {len(v)}' for n, v in images.items())}); held out: "
         f"{sum(len(d.held_out) for d in (check_domains or domains))} images")
    source = make_source(domains, recipe, images)
    read_s = time.perf_counter() - t0
    state = fit(source, out_path, recipe, work_dir, start=start, precision=precision, workers=workers,
                checkpoint_s=checkpoint_s, progress=progress)
    t1 = time.perf_counter()
    models = {"before": start.init_model, "after": out_path} if start.init_model is not None else {"after": out_path}
    checks = tuple(check(check_domains if check_domains is not None else domains, models))
    provenance = {
        "command": "train",
        "model_sha256": file_sha256(out_path),
        "start": {**start.describe(), "init_model_sha256": file_sha256(start.init_model) if start.init_model else None},
        "recipe": recipe.to_dict(),
        "precision": state["policy"],
        "backend": state["backend"],
        "domains": [d.describe() for d in domains],
        "training": {"steps": state["step"], "seconds": state["seconds"], "history": state["history"],
                     "read_s": round(read_s, 1)},
        "check": {"radius_um": 5.0, "domains": [c.to_dict() for c in checks], "seconds": round(time.perf_counter() - t1, 1)},
    }
    atomic_write_text(provenance_path(out_path), json.dumps(provenance, indent=2))
    return TrainResult(out_path, provenance, checks)


__all__ = ["TrainResult", "train_on_domains", "make_source", "training_images", "provenance_path", "DomainCheck"]
