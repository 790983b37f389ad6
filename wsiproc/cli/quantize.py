"""`wsiproc quantize`: an OpenVINO int8 model that `wsiproc run` picks up."""
from __future__ import annotations

from pathlib import Path

import click

from ..detection.model_files import F1_TOLERANCE
from ..errors import UsageError, WsiprocError, problem


@click.command()
@click.argument("model_path", metavar="MODEL.keras", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--domains", "domains_root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Calibrate on the training images of every domain under this data root (e.g. ../shared/data).")
@click.option("--calibration", "calibration_spec",
              help="Or calibrate on these H&E images (file, folder or glob) like those to be run; needs --mpp.")
@click.option("--mpp", type=float, help="Pixel size of the --calibration images in µm/px.")
@click.option("--validate", "validate_root", type=click.Path(exists=True, path_type=Path),
              help="Score float32 and int8 on held-out images and record it: every built-in domain under this data "
                   "root, or each domain of a domains YAML (a lab's own, as wsiproc train reads). --precision auto "
                   "picks the int8 model only if its F1 loss is <= --tolerance on each.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=F1_TOLERANCE, show_default=True,
              help="Largest F1 loss against float32, on any validated domain, at which auto picks the int8 model.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The int8 model, .xml (+ .bin beside it); default MODEL.int8.xml, where `wsiproc run` looks for it.")
@click.option("--crops", "n_crops", type=click.IntRange(min=1), default=64, show_default=True, help="Calibration crops in all.")
@click.option("--crop-px", type=int, default=128, show_default=True, help="Calibration crop side at 0.5 µm/px.")
@click.option("--seed", type=int, default=0, show_default=True)
def quantize(model_path: Path, domains_root: Path | None, calibration_spec: str | None, mpp: float | None, validate_root: Path | None,
             tolerance: float, out_path: Path | None, n_crops: int, crop_px: int, seed: int) -> None:
    """Convert MODEL.keras to an OpenVINO int8 model (NNCF post-training quantisation) that `wsiproc run` uses."""
    from ..detection.model_files import ModelFiles, record_path
    from ..io.files import expand
    from ..io.slide import PLAIN_IMAGE_SUFFIXES
    from ..learn.quantize import crops_from_files, domain_crops, quantize_model, record_validation, validate

    out_path = out_path or ModelFiles.of(model_path).int8
    if out_path.suffix.lower() != ".xml":
        raise UsageError(f"{out_path}: the output must end in .xml (OpenVINO writes the weights beside it as .bin)")
    if (domains_root is None) == (calibration_spec is None):
        raise UsageError("give either --domains DATA_ROOT or --calibration IMAGES --mpp X")
    try:
        if domains_root is not None:
            crops = domain_crops(domains_root, n_crops=n_crops, crop_px=crop_px, seed=seed)
            source = {"domains": str(domains_root)}
        else:
            if mpp is None or not 0 < mpp < 100:
                raise UsageError(f"--calibration needs --mpp, the images' pixel size in µm/px (got {mpp})")
            images = expand(calibration_spec, PLAIN_IMAGE_SUFFIXES)
            if not images:
                raise UsageError(f"{calibration_spec}: no calibration images found")
            crops = crops_from_files(images, mpp, n_crops=n_crops, crop_px=crop_px, seed=seed)
            source = {"images": len(images)}
        quantize_model(model_path, crops, out_path, calibration=source)
        click.echo(f"saved {out_path} (int8, calibrated on {len(crops)} crops of {crop_px} px"
                   + (f" from {source['images']} images)" if "images" in source else " from the training domains)")
                   + f"; provenance in {record_path(out_path)}")
        if validate_root is not None:
            result = validate(model_path, out_path, validate_root, echo=lambda line: click.echo(line, err=True),
                              tolerance=tolerance)
            record_validation(out_path, result)
            click.echo(f"validation: {'passed' if result['passed'] else 'FAILED'} (F1 loss <= {result['tolerance']} on every "
                       f"validated domain); {'--precision auto uses it' if result['passed'] else 'auto will not use it'}")
    except UsageError:
        raise
    except (ValueError, OSError, RuntimeError) as exc:  # messages name their file; NNCF's and OpenVINO's may not
        message = problem(exc)
        raise WsiprocError(message if ": " in message else f"{model_path}: {message}") from exc
