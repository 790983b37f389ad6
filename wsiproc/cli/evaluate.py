"""`wsiproc evaluate`: detections scored against annotations (a run's results, or a model run on annotated images)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError
from .common import usage_errors


@click.command()
@click.option("--pred", "pred_spec", help="wsiproc results folder or one result CSV.")
@click.option("--model", "model_spec", help="Instead of --pred: run this model (shipped name or file) on --images and score it.")
@click.option("--images", "images_spec", help="With --model: the annotated images (folder, file or glob).")
@click.option("--truth", "truth_spec", required=True, help="Annotations: file, folder or glob.")
@click.option("--mpp", type=float, required=True, help="Pixel size of the annotated images in µm/px.")
@click.option("--radius-um", type=float, default=5.0, show_default=True, help="Matching radius (the paper: 5 µm).")
@click.option("--masks", "masks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Instance label maps <image>.png|tif: a detection inside an unmatched nucleus mask is a hit.")
@click.option("--out", "out_csv", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as CSV.")
def evaluate(pred_spec: str | None, model_spec: str | None, images_spec: str | None, truth_spec: str, mpp: float,
             radius_um: float, masks_dir: Path | None, out_csv: Path | None) -> None:
    """Precision, recall and F1 per image and over the set (one-to-one matching within --radius-um).

    \b
    wsiproc evaluate --pred results/ --truth points.csv --mpp 0.55
    wsiproc evaluate --model lab.keras --images held_out/ --truth lab.geojson --mpp 0.5   # repeats train's check
    With --model, images annotated in regions (QuPath points inside drawn regions) are scored inside them only.
    """
    from ..evaluate.annotations import image_key, read_label_map
    from ..evaluate.scoring import evaluate_sets, format_table, read_predictions, write_scores_csv
    from ..io.files import expand
    from ..learn.annotated import Annotations

    if (pred_spec is None) == (model_spec is None):
        raise UsageError("give either --pred (results to score) or --model with --images (a model to run and score)")
    if model_spec is not None:
        if images_spec is None:
            raise UsageError("--model needs --images: the annotated images to run it on")
        pred, truth = _run_model(model_spec, images_spec, truth_spec, mpp)
    else:
        with usage_errors(ValueError):  # a folder without results, an unreadable CSV: one line, not a traceback
            pred, truth = read_predictions(pred_spec), Annotations.read(truth_spec).points
    label_maps = None
    if masks_dir is not None:
        label_maps = {image_key(p): read_label_map(p) for p in expand(str(masks_dir), {".png", ".tif", ".tiff"})}
        label_maps = {k: v for k, v in label_maps.items() if k in truth}
    per_image, total = evaluate_sets(pred, truth, radius_um / mpp, label_maps=label_maps)
    click.echo(format_table(per_image, total))
    if out_csv:
        write_scores_csv(out_csv, per_image, total)


def _run_model(model_spec: str, images_spec: str, truth_spec: str, mpp: float) -> tuple[dict, dict]:
    """Detections of the model on the annotated images and the annotations, both inside annotated regions."""
    from ..detection.inference import Predictor
    from ..detection.model import resolve_model_path
    from ..io.files import expand
    from ..io.slide import PLAIN_IMAGE_SUFFIXES
    from ..learn.annotated import Annotations, lab_images
    from ..learn.check import scored_points

    files = expand(images_spec, PLAIN_IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{images_spec}: no images found")
    try:
        model_path = resolve_model_path(model_spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return scored_points(lab_images(files, Annotations.read(truth_spec), mpp), Predictor(model_path))
