"""Run parameters in one dataclass: what the CLI fills in and what the run record stores."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import problem
from .detection.model import MODEL_MPP, RECEPTIVE_RADIUS_PX, SIZE_MULTIPLE_PX, size_multiple
from .detection.classes import CLASS_READ_RADIUS_PX
from .detection.postprocess import POSTPROCESSES, Postprocess


@dataclass
class RunConfig:
    model_path: str | None = None  # None: the model shipped inside the package
    mpp: float | None = None  # overrides the slide's stored µm/px
    model_mpp: float = MODEL_MPP
    tile_px: int = 512  # tile core side at model_mpp
    halo_px: int | None = None  # None: the model's receptive radius plus the post-processing's reach (see halo_for)
    batch_size: int = 4
    threshold: float = 0.5
    postprocess: str = "peaks"  # peaks: local maxima of the smoothed map (separates touching nuclei); components: the paper's rule
    min_distance_um: float = 1.0  # peaks: two maxima closer than this are one nucleus
    smooth_sigma_um: float = 0.5  # peaks: Gaussian smoothing of the confidence map before the maxima are taken
    merge_radius_um: float = 2.0
    tissue_mask: bool = True
    density_cell_um: float = 50.0
    geojson_gz: bool = False
    io_workers: int = 2
    strict: bool = False  # a tile that cannot be decoded fails the slide (default: skipped and reported)
    precision: str = "auto"  # auto | float32 | bfloat16 | int8 | mixed_float16 (see wsiproc.detection.engines.resolve)
    engine: str = "auto"  # auto (OpenVINO on a CPU, TensorFlow on a GPU) | openvino | tensorflow
    classes: bool = True  # nucleus types (wsiproc.detection.classes) in every output, where the model has a class head

    def validate(self) -> "RunConfig":
        problems = []
        if self.tile_px <= 0 or self.tile_px % SIZE_MULTIPLE_PX:
            problems.append(f"tile_px must be a positive multiple of {SIZE_MULTIPLE_PX} (got {self.tile_px})")
        if self.halo_px is not None and (self.halo_px < 0 or self.halo_px % SIZE_MULTIPLE_PX):
            problems.append(f"halo_px must be a non-negative multiple of {SIZE_MULTIPLE_PX} (got {self.halo_px})")
        if self.postprocess not in POSTPROCESSES:
            problems.append(f"postprocess must be one of {', '.join(POSTPROCESSES)} (got {self.postprocess!r})")
        if self.min_distance_um <= 0 or self.smooth_sigma_um < 0:
            problems.append(f"min_distance_um must be > 0 and smooth_sigma_um >= 0 (got {self.min_distance_um}, {self.smooth_sigma_um})")
        if not 0.0 < self.threshold < 1.0:
            problems.append(f"threshold must lie in (0, 1) (got {self.threshold})")
        if self.precision not in ("auto", "float32", "bfloat16", "int8", "mixed_float16"):
            problems.append(f"precision must be auto, float32, bfloat16, int8 or mixed_float16 (got {self.precision!r})")
        if self.engine not in ("auto", "openvino", "tensorflow"):
            problems.append(f"engine must be auto, openvino or tensorflow (got {self.engine!r})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.density_cell_um <= 0:
            problems.append(f"density_cell_um must be > 0 (got {self.density_cell_um})")
        if self.mpp is not None and not 0 < self.mpp < 100:
            problems.append(f"mpp must be a pixel size in µm/px (got {self.mpp})")
        if self.model_path is not None and not Path(self.model_path).is_file():
            problems.append(f"{self.model_path}: model file not found")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def postprocessor(self) -> Postprocess:
        return Postprocess.from_um(self.postprocess, self.threshold, self.min_distance_um, self.smooth_sigma_um, self.model_mpp)

    def halo_for(self, geometry: dict) -> int:
        """The halo a tile needs with this model: given, or the receptive radius plus the post-processing's
        reach, at least the 32 px tiles always had, rounded up to the model's size multiple."""
        multiple = size_multiple(geometry)
        if self.halo_px is not None:
            if self.halo_px % multiple:
                raise ValueError(f"halo_px must be a multiple of {multiple} for this model (got {self.halo_px})")
            return self.halo_px
        radius = int(geometry.get("receptive_radius_px") or RECEPTIVE_RADIUS_PX)
        class_radius = int(geometry.get("class_receptive_radius_px") or 0)  # read at centroids, in the core
        need = max(RECEPTIVE_RADIUS_PX, radius + self.postprocessor().reach_px, class_radius + CLASS_READ_RADIUS_PX)
        return -(-need // multiple) * multiple

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def load_config_file(path: str | Path, schema: type = RunConfig) -> dict:
    """Values of a YAML config, checked against the fields of `schema` (yaml.safe_load: no code from files)."""
    import yaml

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
