"""Run parameters, composed from the three parts by what they affect: what the CLI fills in and the run record stores.

`RunConfig` is one frozen dataclass with every field of `DetectionParams` and `EngineParams`
(`wsiproc.detection.params`) and `OutputParams` (`wsiproc.outputs.params`), so `RunConfig(threshold=0.6)` and
`cfg.threshold` read as one flat set of parameters, and a `RunConfig` is itself the `DetectionParams` the
detection loop takes. Every part checks itself when made; `validate()` adds what needs the file system (the
model file exists). A changed copy is `dataclasses.replace(cfg, mpp=0.25)`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from .errors import problem
from .detection.params import DetectionParams, EngineParams, detection_problems, engine_problems, raise_problems
from .outputs.params import OutputParams, output_problems


@dataclass(frozen=True, kw_only=True)
class RunConfig(OutputParams, EngineParams, DetectionParams):
    """Every run parameter (fields in the order detection, engine, output); the parts are `detection_params`,
    `engine_params` and `output_params`."""

    def __post_init__(self) -> None:
        raise_problems([*detection_problems(self), *engine_problems(self), *output_problems(self)])

    def validate(self) -> "RunConfig":
        """The parameters checked against the file system too (each part checked itself when made)."""
        if self.model_path is not None and not Path(self.model_path).is_file():
            raise ValueError(f"{self.model_path}: model file not found")
        return self

    @property
    def detection_params(self) -> DetectionParams:
        return _part(DetectionParams, self)

    @property
    def engine_params(self) -> EngineParams:
        return _part(EngineParams, self)

    @property
    def output_params(self) -> OutputParams:
        return _part(OutputParams, self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def _part(part: type, cfg: RunConfig):
    return part(**{f.name: getattr(cfg, f.name) for f in fields(part)})


def load_config_file(path: str | Path, schema: type = RunConfig) -> dict:
    """Values of a YAML config, checked against the fields of `schema` (yaml.safe_load: no code from files)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read config ({problem(exc)})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of parameter: value")
    known = {f.name for f in fields(schema)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return data
