"""`wsiproc train`: a detector from annotated images."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError
from .common import read_annotations


@click.command()
@click.option("--images", "images_spec", required=True, help="Image folder, file or glob pattern.")
@click.option("--points", "points_spec", required=True, help="Annotations: file, folder or glob (CSV, CellCounter XML, ImageScope XML, label maps, GeoJSON).")
@click.option("--mpp", type=float, required=True, help="Pixel size of the images in µm/px.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", type=click.Choice(["paper", "vgg-lean", "unet", "unet32"]), default="paper", show_default=True,
              help="Network to train from scratch (see the model card); ignored with --init-model.")
@click.option("--init-vgg16", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="ImageNet VGG-16 block 1–2 weights (.npz, torchvision's, as in ../shared/data/vgg16-imagenet); paper and vgg-lean.")
@click.option("--freeze-vgg", is_flag=True, help="Keep the VGG-16 layers fixed (as in the paper, with --init-vgg16).")
@click.option("--init-model", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Start from this .keras model's weights.")
@click.option("--epochs", type=int, default=2, show_default=True)
@click.option("--steps-per-epoch", type=int, default=None, help="Default: one block per annotated nucleus per epoch.")
@click.option("--block-px", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--background-fraction", type=float, default=0.25, show_default=True, help="Share of blocks at random positions.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), help="Checkpoint folder (default: <out>_checkpoints); rerun to resume.")
def train(images_spec: str, points_spec: str, mpp: float, out_path: Path, arch: str, init_vgg16: Path | None, freeze_vgg: bool,
          init_model: Path | None, epochs: int,
          steps_per_epoch: int | None, block_px: int, batch_size: int, lr: float, background_fraction: float, seed: int, work: Path | None) -> None:
    """Train a detector on annotated images (the paper's recipe); resumes from the last checkpoint."""
    from ..io.files import expand
    from ..io.slide import PLAIN_IMAGE_SUFFIXES
    from ..learn.annotated import annotated_images
    from ..learn.training import TrainConfig
    from ..learn.training import train as run_training

    if block_px % 8 or block_px < 16:
        raise UsageError(f"--block-px must be a multiple of 8 and at least 16 (got {block_px})")
    if init_vgg16 is not None and arch not in ("paper", "vgg-lean"):
        raise UsageError(f"--init-vgg16 needs a network with a VGG stem (paper, vgg-lean), not {arch}")
    if freeze_vgg and init_vgg16 is None:
        raise UsageError("--freeze-vgg needs --init-vgg16: frozen random layers learn nothing")
    image_files = expand(images_spec, PLAIN_IMAGE_SUFFIXES)
    if not image_files:
        raise UsageError(f"{images_spec}: no images found")
    points = read_annotations(points_spec)
    samples = annotated_images(image_files, points, mpp,
                               skipped=lambda path: click.echo(f"{path}: no annotations found for this image; skipped", err=True))
    if not samples:
        raise UsageError("no image has annotations: check that annotation names match the image file names")
    n_points = sum(len(s.points_xy) for s in samples)
    click.echo(f"training on {len(samples)} images, {n_points} annotated nuclei")
    cfg = TrainConfig(block_px=block_px, batch_size=batch_size, epochs=epochs, steps_per_epoch=steps_per_epoch,
                      learning_rate=lr, background_fraction=background_fraction, freeze_vgg=freeze_vgg, seed=seed, arch=arch)
    state = run_training(samples, out_path, cfg, checkpoint_dir=work, vgg16_weights=init_vgg16,
                         init_model=init_model, verbose=1)
    losses = [h["loss"] for h in state["history"]]
    click.echo(f"saved {out_path}: {state['epoch']} epochs, loss {losses[0]:.4f} → {losses[-1]:.4f}" if losses else f"saved {out_path}")

