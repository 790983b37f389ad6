"""`wsiproc engines`: which engine and precision this machine runs, and why."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), help="A .keras or .xml model (default: the shipped one).")
@click.option("--engine", type=click.Choice(["auto", "openvino", "tensorflow"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16", "int8", "mixed_float16"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def engines(model_path: Path | None, engine: str, precision: str, as_json: bool) -> None:
    """What this machine will run: engine, precision and why, CPU flags, OpenVINO version, what else is available."""
    from ..detection.engines import report
    from ..detection.model import DEFAULT_MODEL_PATH

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


