"""`wsiproc explain`: LRP heat maps of what the network calls a nucleus."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import ModelError, WsiprocError, one_line, problem


@click.command()
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
    from ..evaluate.explain import explain_slide

    try:
        path = explain_slide(slide_path, out_dir, model_path=model_path, n=n_nuclei, rule=rule, seed=seed, mpp=mpp,
                             region_px=region_px or None)
    except ModelError as exc:  # names the model file
        raise ModelError(problem(exc)) from exc
    except (ValueError, OSError) as exc:  # the slide's (or the output folder's) problem, named by the slide
        raise WsiprocError(one_line(exc, slide_path)) from exc
    click.echo(f"saved {path}")
