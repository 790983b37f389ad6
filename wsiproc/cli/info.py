"""`wsiproc info`: what a slide file holds and how wsiproc reads it."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("slide_path", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, help="Pixel size in µm/px, overriding the file's.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(slide_path: Path, mpp: float | None, as_json: bool) -> None:
    """Vendor, levels, µm/px, chosen reader and tissue fraction of a slide."""
    from ..io.slide import open_slide
    from ..outputs.record import slide_info

    slide = open_slide(slide_path, mpp)
    try:
        summary = slide_info(slide)
    finally:
        slide.close()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        click.echo(f"{key:>18}: {value}")
    if summary["mpp"] is None:
        click.echo(f"{slide_path}: no pixel size stored; pass --mpp to run it", err=True)
