"""The run parameters of the result files (`OutputParams`): detection never reads them, every one changes what is written.

Frozen and checked when made, with the field metadata of `wsiproc.detection.params.parameter` (output-changing,
`wsiproc run` option); `wsiproc.config.RunConfig` composes it with the detection and engine parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..detection.params import parameter, raise_problems


@dataclass(frozen=True, kw_only=True)
class OutputParams:
    """How the result files are written: the density maps' grid and the GeoJSON's compression."""

    density_cell_um: float = parameter(50.0, output=True, option=True)  # side of a density-map cell
    geojson_gz: bool = parameter(False, output=True, option=True, help="Write <stem>.geojson.gz instead of <stem>.geojson.")

    def __post_init__(self) -> None:
        raise_problems(output_problems(self))


def output_problems(p: OutputParams) -> list[str]:
    """What is wrong with output parameters, one line each (empty: nothing)."""
    problems = []
    if p.density_cell_um <= 0:
        problems.append(f"density_cell_um must be > 0 (got {p.density_cell_um})")
    return problems
