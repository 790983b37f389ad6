"""`wsiproc adapt`: a model fine-tuned on a new cohort's own confident detections."""
from __future__ import annotations

from pathlib import Path

import click

from ..config import RunConfig
from ..detection.model_files import ModelFiles
from ..errors import WsiprocError
from .common import merged_options, usage_errors


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The adapted .keras model.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Base model (default: the shipped one).")
@click.option("--mpp", type=float, help="Pixel size in µm/px for inputs that do not store it.")
@click.option("--recipe", type=click.Choice(["calibrate", "consistency", "paper"]), default="consistency", show_default=True,
              help="consistency: calibrate, then fine-tune on pseudo-nuclei that survive test-time views, shown to the "
                   "model under strong stain and blur changes; calibrate: only align each slide's colours to the nearest "
                   "training domain and re-calibrate confidences (folded into the weights), for a cohort unlike the "
                   "model's training data, in minutes; paper: the paper's recipe, for reproduction.")
@click.option("--align-colour", "colour", is_flag=True,
              help="Calibration also maps the cohort's tissue colours onto the model's training images (off: measured to "
                   "help one new lab and hurt a known one).")
@click.option("--no-slide-colours", "no_slide_colours", is_flag=True,
              help="Calibration never aligns each slide's colours (by default a cohort whose confidences sank below the training domains' gets per-slide "
                   "alignment to the nearest training domain, which every run of the adapted model then repeats).")
@click.option("--reference", "reference_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The base model's training statistics (default: <model>.reference.json beside it).")
@click.option("--high", type=float, default=0.8, show_default=True, help="Threshold for hard positives.")
@click.option("--low", type=float, default=0.5, show_default=True, help="Threshold for the nuclei drawn into each block's target.")
@click.option("--max-blocks", type=int, default=20000, show_default=True)
@click.option("--mine-tiles", type=int, default=64, show_default=True,
              help="Tissue tiles per slide read for blocks, drawn at random (0: every tile; a 1 cm² slide has ~400).")
@click.option("--per-slide-cap", type=int, help="Blocks per slide at most (default: --max-blocks spread over the cohort).")
@click.option("--epochs", type=int, default=2, show_default=True)
@click.option("--steps-per-epoch", type=int, help="Default: one pass over the mined blocks.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--student-augment", type=click.Choice(["paper", "strong"]), default="strong", show_default=True,
              help="consistency: the student's augmentation of the mined blocks: the paper's thirds (as is, hue shift, "
                   "noise) or strong stain, contrast, blur and noise (the shipped training recipe's).")
@click.option("--match-density", type=click.Choice(["familiar", "always", "never"]), default="familiar", show_default=True,
              help="consistency: fold in the threshold that gives the fine-tuned model its teacher's nucleus count on the "
                   "cohort's sampled tiles, so it cannot over-detect: for a cohort calibration judged familiar (where the "
                   "teacher's count is right), always, or never.")
@click.option("--work", "work_dir", type=click.Path(file_okay=False, path_type=Path), help="Block store and checkpoints (default: <out>_work); rerun to resume.")
@click.option("--no-tissue-mask", is_flag=True, help="Mine every tile, background included.")
@click.option("--scheduler", help="dask.distributed: 'local' or an existing scheduler's address (slides are mined in parallel).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file of adapt parameters (see configs/adapt.yaml); options given on the command line win.")
@click.pass_context
def adapt(ctx: click.Context, inputs: tuple[Path, ...], out_path: Path, model_path: Path | None, mpp: float | None, recipe: str,
          colour: bool, no_slide_colours: bool, reference_path: Path | None, high: float,
          low: float, max_blocks: int, mine_tiles: int, per_slide_cap: int | None, epochs: int, steps_per_epoch: int | None, lr: float, seed: int,
          student_augment: str, match_density: str, work_dir: Path | None, no_tissue_mask: bool, scheduler: str | None, config_file: Path | None) -> None:
    """Adapt a model to a new cohort without annotations: calibrate it to the cohort (and, with --recipe consistency
    or paper, fine-tune it on mined pseudo-labels)."""
    from ..cohort.cluster import dask_client
    from ..detection.inference import Predictor
    from ..learn.adapt import AdaptConfig
    from ..learn.adapt import adapt as run_adapt
    from ..learn.calibrate import Reference

    options = {"recipe": ("recipe", recipe), "colour": ("colour", colour), "slide_colours": ("no_slide_colours", not no_slide_colours),
               "high": ("high", high), "low": ("low", low), "max_blocks": ("max_blocks", max_blocks),
               "mine_tiles": ("mine_tiles", mine_tiles or None),
               "per_slide_cap": ("per_slide_cap", per_slide_cap), "epochs": ("epochs", epochs),
               "steps_per_epoch": ("steps_per_epoch", steps_per_epoch), "learning_rate": ("lr", lr), "seed": ("seed", seed),
               "student_augment": ("student_augment", student_augment), "match_density": ("match_density", match_density)}
    with usage_errors(ValueError, FileNotFoundError):
        cfg = AdaptConfig(**merged_options(ctx, config_file, AdaptConfig, options))
        cfg.validate()
        run_cfg = RunConfig(model_path=str(model_path) if model_path else None, mpp=mpp, tissue_mask=not no_tissue_mask).validate()
        predictor = Predictor(run_cfg.model_path)
        reference = Reference.load(reference_path) if reference_path else None
    work = work_dir or out_path.with_name(out_path.stem + "_work")
    try:
        with dask_client(scheduler) as client:
            provenance = run_adapt(list(inputs), out_path, work, run_cfg, cfg, predictor,
                                   echo=lambda line: click.echo(line, err=True), client=client, reference=reference)
    except ValueError as exc:  # nothing to adapt on (no positives, unreadable cohort): the run's own failure
        raise WsiprocError(f"error: {exc}") from exc
    how = (f"fine-tuned on {provenance['blocks']} blocks" if provenance["training"] else "calibrated") + \
        f" from {len(provenance['cohort'])} slides"
    click.echo(f"saved {out_path} ({how}); provenance in {ModelFiles.of(out_path).provenance}")

