"""`wsiproc evaluate`: detections scored against annotations."""
from __future__ import annotations

from pathlib import Path

import click

from .common import read_annotations


@click.command()
@click.option("--pred", "pred_spec", required=True, help="wsiproc results folder or one result CSV.")
@click.option("--truth", "truth_spec", required=True, help="Annotations: file, folder or glob.")
@click.option("--mpp", type=float, required=True, help="Pixel size of the annotated images in µm/px.")
@click.option("--radius-um", type=float, default=5.0, show_default=True, help="Matching radius (the paper: 5 µm).")
@click.option("--masks", "masks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Instance label maps <image>.png|tif: a detection inside an unmatched nucleus mask is a hit.")
@click.option("--out", "out_csv", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as CSV.")
def evaluate(pred_spec: str, truth_spec: str, mpp: float, radius_um: float, masks_dir: Path | None, out_csv: Path | None) -> None:
    """Precision, recall and F1 per image and over the set (one-to-one matching within --radius-um)."""
    from ..evaluate.annotations import image_key, read_label_map
    from ..evaluate.scoring import evaluate_sets, format_table, read_predictions, write_scores_csv
    from ..io.files import expand

    pred = read_predictions(pred_spec)
    truth = read_annotations(truth_spec)
    label_maps = None
    if masks_dir is not None:
        label_maps = {image_key(p): read_label_map(p) for p in expand(str(masks_dir), {".png", ".tif", ".tiff"})}
        label_maps = {k: v for k, v in label_maps.items() if k in truth}
    per_image, total = evaluate_sets(pred, truth, radius_um / mpp, label_maps=label_maps)
    click.echo(format_table(per_image, total))
    if out_csv:
        write_scores_csv(out_csv, per_image, total)
