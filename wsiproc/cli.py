"""The `wsiproc` command line: run, info, train, evaluate."""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import click

from . import __version__
from .config import RunConfig
from .errors import OutputFolderError, one_line, problem
from .summary import SUMMARY_NAME

SAMPLE_SLIDE = Path(__file__).parent / "sample" / "CMU-1-Small-Region.svs"


def _fail_usage(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsiproc")
def main() -> None:
    """Find every cell nucleus in H&E whole-slide images."""


@main.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--sample", is_flag=True, help="Add the bundled sample slide (CMU-1-Small-Region.svs) to the inputs.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--model", "model_path", type=str, help="A shipped model by name (default, paper, lean, unet: see the model card), "
              "a .keras file, or an OpenVINO .xml from `wsiproc quantize` (default: the shipped default).")
@click.option("--mpp", type=float, help="Pixel size in µm/px, overriding the file's (needed for plain images).")
@click.option("--tile-px", type=int, default=RunConfig.tile_px, show_default=True, help="Tile core side at 0.5 µm/px.")
@click.option("--halo-px", type=int, default=RunConfig.halo_px, help="Context around each tile at 0.5 µm/px (default: what the model and post-processing need).")
@click.option("--batch-size", type=int, default=RunConfig.batch_size, show_default=True, help="Tiles per model call (halved automatically on GPU out-of-memory).")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16", "int8", "mixed_float16"]), default=RunConfig.precision,
              show_default=True, help="auto: on a CPU, a validated int8 model beside the .keras, else bfloat16 where the CPU has it, "
                                      "else float32; on a GPU, mixed float16. `wsiproc engines` shows what this machine uses.")
@click.option("--engine", type=click.Choice(["auto", "openvino", "tensorflow"]), default=RunConfig.engine, show_default=True,
              help="auto: OpenVINO on a CPU, TensorFlow on a GPU.")
@click.option("--threshold", type=float, default=RunConfig.threshold, show_default=True, help="Confidence threshold.")
@click.option("--postprocess", type=click.Choice(["peaks", "components"]), default=RunConfig.postprocess, show_default=True,
              help="peaks: local maxima of the smoothed confidence (separates touching nuclei); components: the paper's "
                   "threshold + connected components.")
@click.option("--min-distance-um", type=float, default=RunConfig.min_distance_um, show_default=True,
              help="peaks: nuclei closer than this are one.")
@click.option("--no-tissue-mask", is_flag=True, help="Send every tile to the model, background included.")
@click.option("--density-cell-um", type=float, default=RunConfig.density_cell_um, show_default=True)
@click.option("--geojson-gz", is_flag=True, help="Write <stem>.geojson.gz instead of <stem>.geojson.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file of run parameters (see configs/); options given on the command line win.")
@click.option("--strict", is_flag=True, help="A tile that cannot be decoded fails its slide (default: skipped, reported).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip inputs whose outputs are complete for the same input, model and parameters.")
@click.option("--scheduler", help="dask.distributed: 'local' (a LocalCluster on 127.0.0.1) or an existing scheduler's address.")
@click.option("--workers", type=int, default=2, show_default=True, help="Worker processes for --scheduler local.")
@click.option("--claim-timeout", "claim_timeout", default="24h", show_default=True, metavar="DURATION",
              help="A slide claimed by a process on another host is taken over after this long (e.g. 24h, 90m, 30s; "
                   "a bare number is hours). It must exceed the longest slide's time.")
@click.option("--quiet", "-q", is_flag=True, help="Only errors and the final summary.")
@click.pass_context
def run(ctx: click.Context, inputs: tuple[Path, ...], sample: bool, out_dir: Path, model_path: Path | None, mpp: float | None, tile_px: int, halo_px: int,
        batch_size: int, precision: str, engine: str, threshold: float, postprocess: str, min_distance_um: float, no_tissue_mask: bool, density_cell_um: float, geojson_gz: bool,
        config_file: Path | None, strict: bool, resume: bool, scheduler: str | None, workers: int, claim_timeout: str,
        quiet: bool) -> None:
    """Detect nuclei in every INPUT and write <stem>.csv, .geojson, _density.tiff/.png and .json to --out.

    Several processes may share the inputs and --out (SLURM array jobs, machines on an NFS folder): each slide
    is claimed and computed once; summary.csv in --out lists every input.
    """
    if sample:
        inputs = (*inputs, SAMPLE_SLIDE)
    if not inputs:
        _fail_usage("no inputs: give slide or image files (or --sample)")
    from click.core import ParameterSource

    from .config import load_config_file

    from .model import resolve_model_path

    try:
        model_file = str(resolve_model_path(model_path)) if model_path else None
    except ValueError as exc:
        _fail_usage(str(exc))
    options = {
        "model_path": ("model_path", model_file), "mpp": ("mpp", mpp),
        "tile_px": ("tile_px", tile_px), "halo_px": ("halo_px", halo_px), "batch_size": ("batch_size", batch_size),
        "threshold": ("threshold", threshold), "tissue_mask": ("no_tissue_mask", not no_tissue_mask),
        "postprocess": ("postprocess", postprocess), "min_distance_um": ("min_distance_um", min_distance_um),
        "density_cell_um": ("density_cell_um", density_cell_um), "geojson_gz": ("geojson_gz", geojson_gz),
        "strict": ("strict", strict), "precision": ("precision", precision), "engine": ("engine", engine),
    }
    try:
        values = load_config_file(config_file) if config_file else {}
        for field_name, (param, value) in options.items():
            if field_name not in values or ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE:
                values[field_name] = value
        cfg = RunConfig(**values).validate()
    except (ValueError, TypeError) as exc:
        _fail_usage(str(exc))
    try:
        claim_timeout_s = _duration_s(claim_timeout)
    except ValueError as exc:
        _fail_usage(f"--claim-timeout: {exc}")
    stems: dict[str, Path] = {}
    for path in inputs:
        if path.stem == Path(SUMMARY_NAME).stem:
            _fail_usage(f"{path}: the output name '{path.stem}' is taken by the cohort table {SUMMARY_NAME}: rename the input")
        if path.stem in stems:
            _fail_usage(f"{path} and {stems[path.stem]} share the output name '{path.stem}': rename one or run them separately")
        stems[path.stem] = path

    from .batch import run_batch, summary_table
    from .inference import Predictor

    try:
        predictor = Predictor(cfg.model_path, precision=cfg.precision, engine=cfg.engine)
    except (FileNotFoundError, ValueError) as exc:
        _fail_usage(str(exc))
    bars: list = []

    def progress_for(path: Path):
        if quiet:
            return None
        return _progress(path, bars)

    def echo(line: str) -> None:
        for bar in bars:
            bar.close()
        bars.clear()
        click.echo(line, err=True)

    from .cluster import dask_client

    try:
        with _sigterm_as_interrupt(), dask_client(scheduler, n_workers=workers) as client:
            outcomes = run_batch(list(inputs), out_dir, cfg, predictor, resume=resume, echo=echo, progress_for=progress_for,
                                 client=client, claim_timeout_s=claim_timeout_s)
    except OutputFolderError as exc:  # unusable before the first slide
        echo(str(exc))
        sys.exit(1)
    except KeyboardInterrupt as exc:
        echo("interrupted: finished results are complete; unfinished ones left no files (rerun to continue)")
        sys.exit(143 if isinstance(exc, _Terminated) else 130)
    for bar in bars:
        bar.close()
    click.echo(summary_table(outcomes))
    sys.exit(1 if getattr(outcomes, "stopped", "") or any(o.status == "failed" for o in outcomes) else 0)


def _duration_s(text: str) -> float:
    """"24h", "90m", "30s", "2d" or a bare number of hours, in seconds."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", text.lower())
    if not match:
        raise ValueError(f"expected a duration such as 24h, 90m or 30s (got {text!r})")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 3600}[match[2]]


class _Terminated(KeyboardInterrupt):
    """SIGTERM (scancel, a SLURM time limit, `kill`): stopped like Ctrl-C, so claims are released and no
    temporary file stays."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress(path: Path, bars: list):
    """A per-slide bar on a terminal (tiles done / total, nuclei so far, ETA); plain log lines otherwise."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    state = {"last": 0.0}

    def update(n_done: int, n_total: int, n_nuclei: int) -> None:
        if interactive:
            if not bars:
                bars.append(tqdm(total=n_total, desc=path.name, unit="tile", dynamic_ncols=True, file=sys.stderr))
            bar = bars[0]
            bar.total = n_total
            bar.set_postfix(nuclei=n_nuclei, refresh=False)
            bar.update(n_done - bar.n)
            if n_done == n_total:
                bar.close()
                bars.clear()
        elif time.monotonic() - state["last"] > 10 or n_done == n_total:
            state["last"] = time.monotonic()
            click.echo(f"{path}: {n_done}/{n_total} tiles, {n_nuclei} nuclei", err=True)

    return update


@main.command()
@click.argument("slide_path", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, help="Pixel size in µm/px, overriding the file's.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(slide_path: Path, mpp: float | None, as_json: bool) -> None:
    """Vendor, levels, µm/px, chosen reader and tissue fraction of a slide."""
    from .model import MODEL_MPP
    from .pipeline import slide_summary
    from .slide import SlideError, open_slide
    from .tiling import SlideSampler
    from .tissue import tissue_mask

    try:
        slide = open_slide(slide_path, mpp)
    except SlideError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    summary = slide_summary(slide)
    summary["level_dimensions"] = [list(d) for d in slide.level_dimensions]
    summary["level_downsamples"] = [round(d, 4) for d in slide.level_downsamples]
    if slide.mpp is not None:
        summary["tissue_fraction"] = round(tissue_mask(SlideSampler.for_slide(slide, MODEL_MPP)).fraction, 4)
    else:
        summary["tissue_fraction"] = None
    slide.close()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        click.echo(f"{key:>18}: {value}")
    if slide.mpp is None:
        click.echo(f"{slide_path}: no pixel size stored; pass --mpp to run it", err=True)




def _expand(spec: str, suffixes: set[str] | None = None) -> list[Path]:
    """A file, a folder (its files) or a glob pattern → sorted file list."""
    import glob

    path = Path(spec)
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in sorted(glob.glob(spec)) if Path(p).is_file()]
    if suffixes is not None:
        files = [p for p in files if "".join(p.suffixes[-2:]).lower() in suffixes or p.suffix.lower() in suffixes]
    return files


def _read_annotations(spec: str) -> dict:
    from .annotations import read_points

    points: dict = {}
    files = _expand(spec)
    if not files:
        _fail_usage(f"{spec}: no annotation files found")
    for path in files:
        points.update(read_points(path))
    return points


@main.command()
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
    from .annotations import image_key
    from .slide import PLAIN_IMAGE_SUFFIXES, open_slide
    from .training import TrainConfig, TrainingImage
    from .training import train as run_training

    if block_px % 8 or block_px < 16:
        _fail_usage(f"--block-px must be a multiple of 8 and at least 16 (got {block_px})")
    if init_vgg16 is not None and arch not in ("paper", "vgg-lean"):
        _fail_usage(f"--init-vgg16 needs a network with a VGG stem (paper, vgg-lean), not {arch}")
    if freeze_vgg and init_vgg16 is None:
        _fail_usage("--freeze-vgg needs --init-vgg16: frozen random layers learn nothing")
    image_files = _expand(images_spec, PLAIN_IMAGE_SUFFIXES)
    if not image_files:
        _fail_usage(f"{images_spec}: no images found")
    points = _read_annotations(points_spec)
    samples = []
    for path in image_files:
        key = path.stem if path.stem in points else image_key(path)
        if key not in points:
            click.echo(f"{path}: no annotations found for this image; skipped", err=True)
            continue
        slide = open_slide(path, mpp)
        w, h = slide.dimensions
        rgb = slide.read_level(0, 0, 0, w, h)
        slide.close()
        samples.append(TrainingImage.from_level0(key, rgb, points[key], mpp))
    if not samples:
        _fail_usage("no image has annotations: check that annotation names match the image file names")
    n_points = sum(len(s.points_xy) for s in samples)
    click.echo(f"training on {len(samples)} images, {n_points} annotated nuclei")
    cfg = TrainConfig(block_px=block_px, batch_size=batch_size, epochs=epochs, steps_per_epoch=steps_per_epoch,
                      learning_rate=lr, background_fraction=background_fraction, freeze_vgg=freeze_vgg, seed=seed, arch=arch)
    state = run_training(samples, out_path, cfg, checkpoint_dir=work, vgg16_weights=init_vgg16,
                         init_model=init_model, verbose=1)
    losses = [h["loss"] for h in state["history"]]
    click.echo(f"saved {out_path}: {state['epoch']} epochs, loss {losses[0]:.4f} → {losses[-1]:.4f}" if losses else f"saved {out_path}")


@main.command()
@click.option("--pred", "pred_spec", required=True, help="wsiproc results folder or one result CSV.")
@click.option("--truth", "truth_spec", required=True, help="Annotations: file, folder or glob.")
@click.option("--mpp", type=float, required=True, help="Pixel size of the annotated images in µm/px.")
@click.option("--radius-um", type=float, default=5.0, show_default=True, help="Matching radius (the paper: 5 µm).")
@click.option("--masks", "masks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Instance label maps <image>.png|tif: a detection inside an unmatched nucleus mask is a hit.")
@click.option("--out", "out_csv", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as CSV.")
def evaluate(pred_spec: str, truth_spec: str, mpp: float, radius_um: float, masks_dir: Path | None, out_csv: Path | None) -> None:
    """Precision, recall and F1 per image and over the set (one-to-one matching within --radius-um)."""
    from .annotations import image_key, read_label_map
    from .evaluate import evaluate_sets, format_table, read_predictions, write_scores_csv

    pred = read_predictions(pred_spec)
    truth = _read_annotations(truth_spec)
    label_maps = None
    if masks_dir is not None:
        label_maps = {image_key(p): read_label_map(p) for p in _expand(str(masks_dir), {".png", ".tif", ".tiff"})}
        label_maps = {k: v for k, v in label_maps.items() if k in truth}
    per_image, total = evaluate_sets(pred, truth, radius_um / mpp, label_maps=label_maps)
    click.echo(format_table(per_image, total))
    if out_csv:
        write_scores_csv(out_csv, per_image, total)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The adapted .keras model.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Base model (default: the shipped one).")
@click.option("--mpp", type=float, help="Pixel size in µm/px for inputs that do not store it.")
@click.option("--recipe", type=click.Choice(["consistency", "paper"]), default="consistency", show_default=True,
              help="consistency: pseudo-nuclei must survive test-time views, unsure ones are ignored, random tissue "
                   "blocks teach background; paper: the paper's recipe, for reproduction.")
@click.option("--high", type=float, default=0.8, show_default=True, help="Threshold for hard positives.")
@click.option("--low", type=float, default=0.5, show_default=True, help="Threshold for the nuclei drawn into each block's target.")
@click.option("--max-blocks", type=int, default=20000, show_default=True)
@click.option("--per-slide-cap", type=int, help="Blocks per slide at most (default: --max-blocks spread over the cohort).")
@click.option("--epochs", type=int, default=2, show_default=True)
@click.option("--steps-per-epoch", type=int, help="Default: one pass over the mined blocks.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--work", "work_dir", type=click.Path(file_okay=False, path_type=Path), help="Block store and checkpoints (default: <out>_work); rerun to resume.")
@click.option("--no-tissue-mask", is_flag=True, help="Mine every tile, background included.")
@click.option("--scheduler", help="dask.distributed: 'local' or an existing scheduler's address (slides are mined in parallel).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file of adapt parameters (see configs/adapt.yaml); options given on the command line win.")
@click.pass_context
def adapt(ctx: click.Context, inputs: tuple[Path, ...], out_path: Path, model_path: Path | None, mpp: float | None, recipe: str, high: float,
          low: float, max_blocks: int, per_slide_cap: int | None, epochs: int, steps_per_epoch: int | None, lr: float, seed: int,
          work_dir: Path | None, no_tissue_mask: bool, scheduler: str | None, config_file: Path | None) -> None:
    """Adapt a model to a new cohort without annotations: mine confident nuclei, fine-tune on them."""
    from click.core import ParameterSource

    from .adapt import AdaptConfig
    from .adapt import adapt as run_adapt
    from .cluster import dask_client
    from .config import load_config_file
    from .inference import Predictor

    options = {"recipe": ("recipe", recipe), "high": ("high", high), "low": ("low", low), "max_blocks": ("max_blocks", max_blocks),
               "per_slide_cap": ("per_slide_cap", per_slide_cap), "epochs": ("epochs", epochs),
               "steps_per_epoch": ("steps_per_epoch", steps_per_epoch), "learning_rate": ("lr", lr), "seed": ("seed", seed)}
    try:
        values = load_config_file(config_file, AdaptConfig) if config_file else {}
        for field_name, (param, value) in options.items():
            if field_name not in values or ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE:
                values[field_name] = value
        cfg = AdaptConfig(**values)
        cfg.validate()
        run_cfg = RunConfig(model_path=str(model_path) if model_path else None, mpp=mpp, tissue_mask=not no_tissue_mask).validate()
        predictor = Predictor(run_cfg.model_path)
    except (ValueError, FileNotFoundError) as exc:
        _fail_usage(str(exc))
    work = work_dir or out_path.with_name(out_path.stem + "_work")
    try:
        with dask_client(scheduler) as client:
            provenance = run_adapt(list(inputs), out_path, work, run_cfg, cfg, predictor,
                                   echo=lambda line: click.echo(line, err=True), client=client)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"saved {out_path} (fine-tuned on {provenance['blocks']} blocks from {len(provenance['cohort'])} slides); "
               f"provenance in {out_path.with_suffix('.json')}")


@main.command()
@click.argument("slide_path", metavar="SLIDE_OR_IMAGE", type=click.Path(path_type=Path))
@click.option("--n", "n_nuclei", type=click.IntRange(min=1), default=16, show_default=True, help="How many detected nuclei to explain (drawn at random).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder for <stem>_explain.png.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), help="A .keras model (default: the shipped one).")
@click.option("--mpp", type=float, help="Pixel size in µm/px, overriding the file's (needed for plain images).")
@click.option("--rule", type=click.Choice(["epsilon", "alphabeta"]), default="epsilon", show_default=True,
              help="LRP rule for the convolutions: epsilon (LRP-ε) or alphabeta (α=2, β=1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the region and the nuclei drawn.")
@click.option("--region-px", type=click.IntRange(min=0), default=512, show_default=True,
              help="Detect only in one random tissue region of this side at 0.5 µm/px (fast); 0: the whole slide.")
def explain(slide_path: Path, n_nuclei: int, out_dir: Path, model_path: Path | None, mpp: float | None, rule: str, seed: int,
            region_px: int) -> None:
    """Why the network sees a nucleus: LRP heat maps of random detections, as <stem>_explain.png in --out."""
    from .explain import explain_slide

    try:
        path = explain_slide(slide_path, out_dir, model_path=model_path, n=n_nuclei, rule=rule, seed=seed, mpp=mpp,
                             region_px=region_px or None)
    except (ValueError, OSError) as exc:  # SlideError is a ValueError; messages mostly start with the file name
        message = problem(exc)
        if not (model_path and message.startswith(str(model_path))):
            message = one_line(exc, slide_path)
        click.echo(message, err=True)
        sys.exit(1)
    click.echo(f"saved {path}")


@main.command()
@click.argument("model_path", metavar="MODEL.keras", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--domains", "domains_root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Calibrate on the training images of every domain under this data root (e.g. ../shared/data).")
@click.option("--calibration", "calibration_spec",
              help="Or calibrate on these H&E images (file, folder or glob) like those to be run; needs --mpp.")
@click.option("--mpp", type=float, help="Pixel size of the --calibration images in µm/px.")
@click.option("--validate", "validate_root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Score float32 and int8 on every domain's held-out images under this data root and record it: "
                   "--precision auto picks the int8 model only if its F1 loss is <= 0.005 on each.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The int8 model, .xml (+ .bin beside it); default MODEL.int8.xml, where `wsiproc run` looks for it.")
@click.option("--crops", "n_crops", type=click.IntRange(min=1), default=64, show_default=True, help="Calibration crops in all.")
@click.option("--crop-px", type=int, default=128, show_default=True, help="Calibration crop side at 0.5 µm/px.")
@click.option("--seed", type=int, default=0, show_default=True)
def quantize(model_path: Path, domains_root: Path | None, calibration_spec: str | None, mpp: float | None, validate_root: Path | None,
             out_path: Path | None, n_crops: int, crop_px: int, seed: int) -> None:
    """Convert MODEL.keras to an OpenVINO int8 model (NNCF post-training quantisation) that `wsiproc run` uses."""
    from .engines import int8_path_for
    from .quantize import crops_from_files, domain_crops, quantize_model, record_validation, sidecar_path, validate
    from .slide import PLAIN_IMAGE_SUFFIXES

    out_path = out_path or int8_path_for(model_path)
    if out_path.suffix.lower() != ".xml":
        _fail_usage(f"{out_path}: the output must end in .xml (OpenVINO writes the weights beside it as .bin)")
    if (domains_root is None) == (calibration_spec is None):
        _fail_usage("give either --domains DATA_ROOT or --calibration IMAGES --mpp X")
    try:
        if domains_root is not None:
            crops = domain_crops(domains_root, n_crops=n_crops, crop_px=crop_px, seed=seed)
            source = {"domains": str(domains_root)}
        else:
            if mpp is None or not 0 < mpp < 100:
                _fail_usage(f"--calibration needs --mpp, the images' pixel size in µm/px (got {mpp})")
            images = _expand(calibration_spec, PLAIN_IMAGE_SUFFIXES)
            if not images:
                _fail_usage(f"{calibration_spec}: no calibration images found")
            crops = crops_from_files(images, mpp, n_crops=n_crops, crop_px=crop_px, seed=seed)
            source = {"images": len(images)}
        quantize_model(model_path, crops, out_path, calibration=source)
        click.echo(f"saved {out_path} (int8, calibrated on {len(crops)} crops of {crop_px} px"
                   + (f" from {source['images']} images)" if "images" in source else " from the training domains)")
                   + f"; provenance in {sidecar_path(out_path)}")
        if validate_root is not None:
            result = validate(model_path, out_path, validate_root, echo=lambda line: click.echo(line, err=True))
            record_validation(out_path, result)
            click.echo(f"validation: {'passed' if result['passed'] else 'FAILED'} (F1 loss <= {result['tolerance']} on every "
                       f"held-out domain); {'--precision auto uses it' if result['passed'] else 'auto will not use it'}")
    except (ValueError, OSError, RuntimeError) as exc:  # messages name their file; NNCF's and OpenVINO's may not
        message = problem(exc)
        click.echo(message if ": " in message else f"{model_path}: {message}", err=True)
        sys.exit(1)


@main.command()
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), help="A .keras or .xml model (default: the shipped one).")
@click.option("--engine", type=click.Choice(["auto", "openvino", "tensorflow"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16", "int8", "mixed_float16"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def engines(model_path: Path | None, engine: str, precision: str, as_json: bool) -> None:
    """What this machine will run: engine, precision and why, CPU flags, OpenVINO version, what else is available."""
    from .engines import report
    from .model import DEFAULT_MODEL_PATH

    info = report(model_path or DEFAULT_MODEL_PATH, engine, precision)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    choice = info.pop("choice")
    available = info.pop("available")
    for key, value in info.items():
        click.echo(f"{key:>24}: {', '.join(value) if isinstance(value, list) else value}")
    if "error" in choice:
        click.echo(f"{'will run':>24}: cannot run: {choice['error']}")
    else:
        click.echo(f"{'will run':>24}: {choice['engine']} {choice['precision']} on the {choice['device']} ({choice['reason']})")
    for name, state in available.items():
        click.echo(f"{name:>24}: {state}")


if __name__ == "__main__":
    main()
