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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..io.files import atomic_write_text, file_sha256
from .annotated import Domain
from ..detection.architectures import CLASS_HEAD_ANCHORS, has_class_head, without_class_head
from ..detection.classes import CLASSES, ClassMap
from ..detection.model_files import ModelFiles
from .check import CLASS_RADIUS_UM, DomainCheck, check, class_check, format_check, format_class_check
from .class_head import HeadRecipe, LabelledImage, collect_examples, train_head, with_trained_head
from .trainer import ProgressFn, Recipe, Start, fit
from .sampling import BlockSampler, DomainSampler
from .training import TrainConfig, TrainingImage
from ..detection.model import load_model, save_model


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    provenance: dict
    checks: tuple
    class_checks: tuple = ()

    def table(self) -> str:
        tables = [format_check(self.checks)] if self.checks or not self.class_checks else []
        if self.class_checks:
            tables.append(f"nucleus types, held out (HoVer-Net's F_c within {CLASS_RADIUS_UM:g} µm):\n"
                          + format_class_check(self.class_checks))
        return "\n\n".join(tables)


def provenance_path(model_path: str | Path) -> Path:
    """`<model>.json` beside the model, the convention `wsiproc adapt` uses too (`ModelFiles.provenance`)."""
    return ModelFiles.of(model_path).provenance


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


#: What `wsiproc train` teaches: the detector, the class head (frozen trunk), both in turn, or (auto) both
#: where the training images' labels name classes and the detector alone where they do not.
TASKS = ("auto", "detection", "classes", "both")


def labelled_images(domains: Sequence[Domain], class_map: ClassMap) -> list[LabelledImage]:
    """The training images of every domain whose annotations carry class labels, at 0.5 µm/px, labels mapped
    through `class_map` (an unmapped name is an error naming it and its image)."""
    out = []
    for d in domains:
        for im in d.train:
            if getattr(im, "labels", None) is None:
                continue
            cls = class_map.indices(im.labels, str(getattr(im, "path", im.name)))
            if (cls >= 0).any():
                out.append(LabelledImage.from_level0(f"{d.name}/{im.name}", im.read_rgb(), im.points_xy, cls, im.mpp))
    return out


def resolve_task(task: str, domains: Sequence[Domain], class_map: ClassMap) -> str:
    """`auto` → `both` where some training image's labels map to classes, else `detection`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} (got {task!r})")
    if task != "auto":
        return task
    for d in domains:
        for im in d.train:
            labels = getattr(im, "labels", None)
            if labels is not None and any(class_map.class_of(v) for v in labels if v is not None):
                return "both"
    return "detection"


def _class_head_of(path: Path | None):
    """The class head's layers of a model file, or None (no file, or a detector alone)."""
    if path is None:
        return None

    model = load_model(path)
    return model if has_class_head(model) else None


def _class_anchor(path: Path) -> tuple[bool, str]:
    """(whether the network at `path` has a place for a class head, its architecture name)."""
    model = load_model(path)
    return has_class_head(model) or model.name in CLASS_HEAD_ANCHORS, model.name


def train_classes(domains: Sequence[Domain], trunk_path: Path, out_path: Path, recipe: HeadRecipe, class_map: ClassMap,
                  work_dir: Path, echo: Callable[[str], None] = print) -> dict:
    """Train a class head on the frozen trunk of `trunk_path` from the domains' class labels; save the detector
    with it at `out_path`; return what the record says about it. Trunk features are cached in `work_dir`."""
    images = labelled_images(domains, class_map)
    if not images:
        raise ValueError("no training image carries class labels that map to the model's classes "
                         f"({', '.join(CLASSES)}); label points (CSV class column, QuPath classification, ...) or use --class-map")
    base = without_class_head(load_model(trunk_path))
    t0 = time.perf_counter()
    examples = collect_examples(base, images, recipe, cache_dir=work_dir / "class_features")
    features_s = time.perf_counter() - t0
    echo(f"class head: trunk features of {len(images)} images × {recipe.views} views in {features_s:.0f} s")
    head, result = train_head(examples, recipe, echo=echo)
    save_model(with_trained_head(base, head), out_path)
    return {"recipe": asdict(recipe), "images": len(images), "features_s": round(features_s, 1), **result.to_dict(),
            "class_map": {"user": dict(class_map.user), "ignore": sorted(class_map.ignore)}}


def train_on_domains(domains: Sequence[Domain], out_path: str | Path, recipe: Recipe, start: Start = Start(),
                     work_dir: str | Path | None = None, precision: str = "auto", workers: int = 0,
                     checkpoint_s: float = 180.0, check_domains: Sequence[Domain] | None = None,
                     progress: ProgressFn | None = None, echo: Callable[[str], None] = print,
                     task: str = "detection", class_map: ClassMap = ClassMap(),
                     head_recipe: HeadRecipe = HeadRecipe()) -> TrainResult:
    """Train `out_path` on `domains` with `recipe` from `start`, check it on the held-out images, record it all.

    `task` (`TASKS`): `detection` trains the detector (a class head of the starting model is carried over
    unchanged, and said so); `classes` trains only a class head on the starting model's frozen trunk
    (`class_head`); `both` does one then the other. `check_domains` (default: `domains`) are the domains whose
    held-out images are scored; the starting model (when there is one) is scored beside the new one, for
    detection and, where held-out labels name classes, for classes. Calling again with the same `work_dir`
    resumes the training.
    """
    out_path = Path(out_path)
    work_dir = Path(work_dir) if work_dir is not None else out_path.with_name(out_path.stem + "_checkpoints")
    auto = task == "auto"
    task = resolve_task(task, domains, class_map)
    if task == "classes" and start.init_model is None:
        raise ValueError("a class head is trained on an existing detector: give --init-model")
    t0 = time.perf_counter()
    provenance: dict = {"command": "train", "task": task}
    init_head = _class_head_of(start.init_model)
    if task in ("detection", "both"):
        images = {d.name: training_images(d) for d in domains}
        n_points = sum(len(im.points_xy) for ims in images.values() for im in ims)
        echo(f"training on {sum(map(len, images.values()))} images, {n_points} annotated nuclei "
             f"({', '.join(f'{n}: {len(v)}' for n, v in images.items())}); held out: "
             f"{sum(len(d.held_out) for d in (check_domains or domains))} images")
        source = make_source(domains, recipe, images)
        read_s = time.perf_counter() - t0
        state = fit(source, out_path, recipe, work_dir, start=start, precision=precision, workers=workers,
                    checkpoint_s=checkpoint_s, progress=progress)
        provenance.update({
            "recipe": recipe.to_dict(), "precision": state["policy"], "backend": state["backend"],
            "training": {"steps": state["step"], "seconds": state["seconds"], "history": state["history"],
                         "read_s": round(read_s, 1)}})
    if task in ("classes", "both"):
        trunk = out_path if task == "both" else start.init_model
        has_anchor, architecture = _class_anchor(trunk)
        if not has_anchor:
            if auto:
                echo(f"no class head: the {architecture} network has no place for one (paper, vgg-lean do)")
                task = provenance["task"] = "detection"
            else:
                raise ValueError(f"{trunk}: the {architecture} network has no place for a class head "
                                 f"(networks with one: {', '.join(CLASS_HEAD_ANCHORS)})")
    if task in ("classes", "both"):
        provenance["class_head"] = train_classes(domains, trunk, out_path, head_recipe, class_map, work_dir, echo)
    elif init_head is not None:  # `fit` put the starting model's head back on the new detector
        provenance["class_head"] = {"carried_over_from": str(start.init_model), "retrained": False}
        echo("the starting model's class head was kept unchanged on the new detector (not retrained: "
             "give class labels or --task both to retrain it)")
    t1 = time.perf_counter()
    models = {"before": start.init_model, "after": out_path} if start.init_model is not None else {"after": out_path}
    on = check_domains if check_domains is not None else domains
    checks = tuple(check(on, models)) if task != "classes" else ()
    class_checks = tuple(class_check(on, models, class_map)) if task != "detection" or init_head is not None else ()
    provenance.update({
        "model_sha256": file_sha256(out_path),
        "start": {**start.describe(), "init_model_sha256": file_sha256(start.init_model) if start.init_model else None},
        "domains": [d.describe() for d in domains],
        "check": {"radius_um": 5.0, "domains": [c.to_dict() for c in checks],
                  "classes": [c.to_dict() for c in class_checks], "seconds": round(time.perf_counter() - t1, 1)},
    })
    atomic_write_text(provenance_path(out_path), json.dumps(provenance, indent=2))
    return TrainResult(out_path, provenance, checks, class_checks)


__all__ = ["TrainResult", "train_on_domains", "train_classes", "TASKS", "make_source", "training_images", "provenance_path", "DomainCheck"]
