"""`wsiproc run`: detect nuclei in every input, write the result files and the cohort table."""
from __future__ import annotations

import contextlib
import re
import signal
import sys
import time
import types
import typing
from dataclasses import Field, fields
from pathlib import Path
from typing import Callable, Iterator

import click

from ..config import RunConfig
from ..detection.params import CHOICES, HELP, OPTION
from ..errors import UsageError
from .common import merged_options, usage_errors

SAMPLE_SLIDE = Path(__file__).parents[1] / "sample" / "CMU-1-Small-Region.svs"

_FIELDS: dict[str, Field] = {f.name: f for f in fields(RunConfig)}
_TYPES: dict[str, object] = typing.get_type_hints(RunConfig)


def _option_param(f: Field) -> tuple[str, bool]:
    """The click parameter of a run parameter's option, and whether the option is its negation (`--no-<name>`)."""
    negated = f.default is True
    return ("no_" if negated else "") + f.name, negated


def parameter_option(name: str) -> Callable:
    """The `wsiproc run` option of the run parameter `name`, made from its field (`wsiproc.detection.params`):
    `--<name>`, or a switch for a bool (`--no-<name>` for one on by default), the field's type or choices, its
    default (shown where there is one) and help."""
    f = _FIELDS[name]
    if not f.metadata[OPTION]:
        raise TypeError(f"{name}: not marked as a `wsiproc run` option (wsiproc.detection.params.OPTION)")
    param, negated = _option_param(f)
    flag = "--" + param.replace("_", "-")
    kind = _TYPES[name]
    if isinstance(kind, types.UnionType):  # `int | None`: the option's type is the value's
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        return click.option(flag, is_flag=True, help=f.metadata[HELP])
    choices = f.metadata[CHOICES]
    return click.option(flag, type=click.Choice(list(choices)) if choices else kind, default=f.default,
                        show_default=f.default is not None, help=f.metadata[HELP])


def parameter_values(values: dict[str, object]) -> dict[str, tuple[str, object]]:
    """The run parameters given by `parameter_option`s, as `merged_options` takes them: field → (click parameter, value)."""
    out = {}
    for f in _FIELDS.values():
        if f.metadata[OPTION]:
            param, negated = _option_param(f)
            out[f.name] = (param, not values[param] if negated else values[param])
    return out


@click.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--sample", is_flag=True, help="Add the bundled sample slide (CMU-1-Small-Region.svs) to the inputs.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--model", "model_path", type=str, help="A shipped model by name (default, paper, lean, unet: see the model card), "
              "a .keras file, or an OpenVINO .xml from `wsiproc quantize` (default: the shipped default).")
@parameter_option("mpp")
@parameter_option("tile_px")
@parameter_option("halo_px")
@parameter_option("batch_size")
@parameter_option("precision")
@parameter_option("engine")
@parameter_option("threshold")
@parameter_option("postprocess")
@parameter_option("min_distance_um")
@parameter_option("tissue_mask")
@parameter_option("classes")
@parameter_option("density_cell_um")
@parameter_option("geojson_gz")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file of run parameters (see configs/); options given on the command line win.")
@parameter_option("strict")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip inputs whose outputs are complete for the same input, model and parameters.")
@click.option("--scheduler", help="dask.distributed: 'local' (a LocalCluster on 127.0.0.1) or an existing scheduler's address.")
@click.option("--workers", type=int, default=2, show_default=True, help="Worker processes for --scheduler local.")
@click.option("--claim-timeout", "claim_timeout", default="24h", show_default=True, metavar="DURATION",
              help="A slide claimed by a process on another host is taken over after this long (e.g. 24h, 90m, 30s; "
                   "a bare number is hours). It must exceed the longest slide's time.")
@click.option("--quiet", "-q", is_flag=True, help="Only errors and the final summary.")
@click.pass_context
def run(ctx: click.Context, inputs: tuple[Path, ...], sample: bool, out_dir: Path, model_path: Path | None,
        config_file: Path | None, resume: bool, scheduler: str | None, workers: int, claim_timeout: str, quiet: bool,
        **parameters: object) -> None:
    """Detect nuclei in every INPUT and write <stem>.csv, .geojson, _density.tiff/.png and .json to --out
    (with a model that has a class head, also each nucleus' type and _density_<class>.tiff; see --no-classes).

    Several processes may share the inputs and --out (SLURM array jobs, machines on an NFS folder): each slide
    is claimed and computed once; summary.csv in --out lists every input.
    """
    if sample:
        inputs = (*inputs, SAMPLE_SLIDE)
    if not inputs:
        raise UsageError("no inputs: give slide or image files (or --sample)")
    from ..detection.model import resolve_model_path

    with usage_errors(ValueError):
        model_file = str(resolve_model_path(model_path)) if model_path else None
    options = {"model_path": ("model_path", model_file), **parameter_values(parameters)}
    with usage_errors(ValueError, TypeError):
        cfg = RunConfig(**merged_options(ctx, config_file, RunConfig, options)).validate()
    try:
        claim_timeout_s = duration_s(claim_timeout)
    except ValueError as exc:
        raise UsageError(f"--claim-timeout: {exc}") from exc
    check_output_names(inputs)

    from ..cohort import batch
    from ..cohort.cluster import dask_client
    from ..detection.inference import Predictor

    with usage_errors(FileNotFoundError, ValueError):
        predictor = Predictor(cfg.model_path, precision=cfg.precision, engine=cfg.engine)
    bars = Bars(quiet)
    try:
        with sigterm_as_interrupt(), dask_client(scheduler, n_workers=workers) as client:
            outcomes = batch.run_batch(list(inputs), out_dir, cfg, predictor, resume=resume, echo=bars.echo,
                                       progress_for=bars.progress_for, client=client, claim_timeout_s=claim_timeout_s)
    except KeyboardInterrupt as exc:
        bars.echo("interrupted: finished results are complete; unfinished ones left no files (rerun to continue)")
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    finally:
        bars.close()  # an OutputFolderError (unusable before the first slide) goes on to the group's handler
    click.echo(batch.summary_table(outcomes))
    sys.exit(1 if getattr(outcomes, "stopped", "") or any(o.status == "failed" for o in outcomes) else 0)


def check_output_names(inputs: tuple[Path, ...]) -> None:
    """Every input writes `<stem>.*` into one folder: two inputs with one stem, or the stem of summary.csv, cannot."""
    from ..cohort.summary import SUMMARY_NAME

    stems: dict[str, Path] = {}
    for path in inputs:
        if path.stem == Path(SUMMARY_NAME).stem:
            raise UsageError(f"{path}: the output name '{path.stem}' is taken by the cohort table {SUMMARY_NAME}: rename the input")
        if path.stem in stems:
            raise UsageError(f"{path} and {stems[path.stem]} share the output name '{path.stem}': rename one or run them separately")
        stems[path.stem] = path


def duration_s(text: str) -> float:
    """"24h", "90m", "30s", "2d" or a bare number of hours, in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", text.lower())
    if not match:
        raise ValueError(f"expected a duration such as 24h, 90m or 30s (got {text!r})")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 3600}[match[2]]


class Terminated(KeyboardInterrupt):
    """SIGTERM (scancel, a SLURM time limit, `kill`): stopped like Ctrl-C, so claims are released and no
    temporary file stays."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Bars:
    """Per-slide progress: a bar on a terminal (tiles done / total, nuclei so far, ETA), plain log lines
    otherwise, nothing with --quiet; a message closes the open bar first."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.open: list = []

    def close(self) -> None:
        for bar in self.open:
            bar.close()
        self.open.clear()

    def echo(self, line: str) -> None:
        self.close()
        click.echo(line, err=True)

    def progress_for(self, path: Path):
        return None if self.quiet else _progress(path, self.open)


def _progress(path: Path, bars: list):
    from tqdm import tqdm  # lazy: only a run's progress bars use it; `wsiproc --help` and the other commands do not

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
