"""`wsiproc evaluate`: detections scored against annotations (a run's results, or a model run on annotated images).

Where both the detections and the annotations say what each nucleus is (results of a model with a class head;
annotations with class labels, mapped onto the model's classes by `--class-map` and the built-in names), a
class table follows the detection table: F_d, HoVer-Net's F_c and the per-class F1 after the same matching.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from ..errors import UsageError
from .common import usage_errors


@dataclass(frozen=True)
class _Scored:
    """What is scored: per image, predicted and annotated centres and, where known, their classes."""

    pred: dict  # {image: (N, 2) xy}
    truth: dict  # {image: (M, 2) xy}
    pred_class: dict | None  # {image: (N,) class index}; None: the predictions have no classes
    truth_labels: dict  # {image: (M,) raw labels or None}
    no_pred_classes: str = "the predictions carry no classes"  # why pred_class is None


@click.command()
@click.option("--pred", "pred_spec", help="wsiproc results folder or one result CSV.")
@click.option("--model", "model_spec", help="Instead of --pred: run this model (shipped name or file) on --images and score it.")
@click.option("--images", "images_spec", help="With --model: the annotated images (folder, file or glob).")
@click.option("--truth", "truth_spec", required=True, help="Annotations: file, folder or glob.")
@click.option("--mpp", type=float, required=True, help="Pixel size of the annotated images in µm/px.")
@click.option("--radius-um", type=float, default=5.0, show_default=True,
              help="Matching radius (the paper: 5 µm; HoVer-Net's class protocol: 3 µm).")
@click.option("--masks", "masks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Instance label maps <image>.png|tif: a detection inside an unmatched nucleus mask is a hit.")
@click.option("--class-map", "class_map_spec",
              help="Annotation labels → classes, 'NAME=CLASS,...' (CLASS: epithelial, inflammatory, stromal or ignore).")
@click.option("--out", "out_csv", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the table as CSV (and the class table beside it as <name>_class_scores.csv).")
def evaluate(pred_spec: str | None, model_spec: str | None, images_spec: str | None, truth_spec: str, mpp: float,
             radius_um: float, masks_dir: Path | None, class_map_spec: str | None, out_csv: Path | None) -> None:
    """Precision, recall and F1 per image and over the set (one-to-one matching within --radius-um).

    \b
    wsiproc evaluate --pred results/ --truth points.csv --mpp 0.55
    wsiproc evaluate --model lab.keras --images held_out/ --truth lab.geojson --mpp 0.5   # repeats train's check
    wsiproc evaluate --pred results/ --truth counts.xml --mpp 0.5 --class-map 'Type 1=epithelial,Type 2=inflammatory'
    With --model, images annotated in regions (QuPath points inside drawn regions) are scored inside them only.
    With classes on both sides, a class table (F_d, F_c, F1 per class) follows.
    """
    from ..detection.classes import ClassMap
    from ..io.annotations import image_key, read_label_map
    from ..evaluate.scoring import evaluate_sets, format_table, read_labelled_predictions, write_scores_csv
    from ..io.files import expand
    from ..learn.annotated import Annotations

    if (pred_spec is None) == (model_spec is None):
        raise UsageError("give either --pred (results to score) or --model with --images (a model to run and score)")
    with usage_errors(ValueError):
        class_map = ClassMap.parse(class_map_spec)
    if model_spec is not None:
        if images_spec is None:
            raise UsageError("--model needs --images: the annotated images to run it on")
        scored = _run_model(model_spec, images_spec, truth_spec, mpp)
    else:
        with usage_errors(ValueError):  # a folder without results, an unreadable CSV: one line, not a traceback
            scored = _read_results(read_labelled_predictions(pred_spec), Annotations.read(truth_spec))
    classes = _class_sets(scored, truth_spec, class_map, strict=class_map_spec is not None)
    label_maps = None
    if masks_dir is not None:
        label_maps = {image_key(p): read_label_map(p) for p in expand(str(masks_dir), {".png", ".tif", ".tiff"})}
        label_maps = {k: v for k, v in label_maps.items() if k in scored.truth}
    per_image, total = evaluate_sets(scored.pred, scored.truth, radius_um / mpp, label_maps=label_maps)
    click.echo(format_table(per_image, total))
    if out_csv:
        write_scores_csv(out_csv, per_image, total)
    if isinstance(classes, str):
        click.echo(f"no class table: {classes}")
        return
    _class_table(*classes, radius_um, mpp, out_csv, masks=label_maps is not None)


def _read_results(pred: dict, annotations) -> _Scored:
    """The results' centres and classes (names of `CLASSES` in their `class` column) and the annotations."""
    from ..evaluate.scoring import prediction_class_index

    with_classes = {name: p for name, p in pred.items() if p.labels is not None}
    without = [name for name, p in pred.items() if p.labels is None and len(p)]
    pred_class = None
    reason = "the results have no class column (a model without a class head, or classes turned off)"
    if with_classes and without:
        reason = f"some results have no class column ({', '.join(sorted(without)[:3])}): results of different runs?"
    elif with_classes:
        pred_class = {name: prediction_class_index(p.labels, f"results of {name!r}") if p.labels is not None
                      else np.full(len(p), -1, np.int64) for name, p in pred.items()}
    return _Scored({name: p.xy for name, p in pred.items()}, annotations.points, pred_class,
                   dict(annotations.labels), reason)


def _class_sets(scored: _Scored, truth_spec: str, class_map, strict: bool) -> tuple[dict, dict] | str:
    """({image: (xy, class index)} of predictions and of annotations), or why there is no class table.

    Annotation labels no class map names are an error with --class-map (a typo must not drop a class) and
    without it only the reason for no class table: a count of "Nucleus" points still deserves its F1."""
    if scored.pred_class is None:
        return scored.no_pred_classes
    labelled = {name: labels for name, labels in scored.truth_labels.items() if labels is not None and name in scored.truth}
    if not labelled:
        return "the annotations name no classes"
    names = list(scored.truth)
    sizes = [len(scored.truth[name]) for name in names]
    raw = np.concatenate([labelled.get(name, np.full(n, None, dtype=object)) for name, n in zip(names, sizes)]
                         ) if names else np.zeros(0, dtype=object)
    try:
        index = class_map.indices(raw, source=truth_spec)
    except ValueError as exc:
        if strict:
            raise UsageError(str(exc)) from exc
        return str(exc)
    truth_class = dict(zip(names, np.split(index, np.cumsum(sizes)[:-1]) if names else []))
    pred = {name: (scored.pred[name], scored.pred_class[name]) for name in scored.pred}
    truth = {name: (scored.truth[name], truth_class[name]) for name in names}
    return pred, truth


def _class_table(pred: dict, truth: dict, radius_um: float, mpp: float, out_csv: Path | None, masks: bool) -> None:
    from ..evaluate.scoring import evaluate_class_sets, format_class_table, write_class_scores_csv

    _, total = evaluate_class_sets(pred, truth, radius_um / mpp)
    if masks:
        click.echo("class table: points matched within the radius (the label-map rule is for detection only)")
    click.echo(format_class_table(total, radius_um))
    if out_csv:
        write_class_scores_csv(out_csv.with_name(f"{out_csv.stem}_class_scores.csv"), total)


def _run_model(model_spec: str, images_spec: str, truth_spec: str, mpp: float) -> _Scored:
    """Detections of the model on the annotated images and the annotations, both inside annotated regions
    (as `wsiproc.learn.check.scored_points` keeps them), with the model's classes where it has a class head."""
    from ..config import RunConfig
    from ..detection.inference import Predictor
    from ..detection.model import resolve_model_path
    from ..detection.images import detections_of_images
    from ..io.files import expand
    from ..io.slide import PLAIN_IMAGE_SUFFIXES
    from ..learn.annotated import Annotations, lab_images

    files = expand(images_spec, PLAIN_IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{images_spec}: no images found")
    try:
        model_path = resolve_model_path(model_spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    images = lab_images(files, Annotations.read(truth_spec), mpp)
    predictor = Predictor(model_path)
    found = detections_of_images(images, predictor, RunConfig(tissue_mask=False))
    with_classes = all(d.class_probs is not None for d in found.values())  # a class head, and classes on
    pred, pred_class, truth, truth_labels = {}, {}, {}, {}
    for im in images:
        det = found[im.name]
        keep = im.inside(det.xy)
        pred[im.name] = det.xy[keep]
        if with_classes:  # class_probs' columns are `CLASSES` (Detections' contract)
            pred_class[im.name] = (np.argmax(det.class_probs, axis=1) if len(det) else np.zeros(0, np.int64))[keep]
        inside = im.inside(im.points_xy)
        truth[im.name] = im.points_xy[inside]
        truth_labels[im.name] = im.labels[inside] if im.labels is not None else None
    return _Scored(pred, truth, pred_class if with_classes else None, truth_labels,
                   f"the model {model_path.name} has no class head")
