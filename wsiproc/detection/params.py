"""The run parameters detection reads (`DetectionParams`) and those that choose how the network runs (`EngineParams`).

Each part is frozen and checks itself when made, so a value that cannot work is refused before any slide is
opened, with a message naming the field. `wsiproc.config.RunConfig` composes them with the output parameters
(`wsiproc.outputs.params`) into what the CLI fills in and the run record stores; the detection loop takes a
`DetectionParams` (a `RunConfig` is one).

Every field says, in its metadata (`parameter`), the two things other layers derive from it instead of listing
fields again: whether it changes what a run writes (`OUTPUT`: resume compares exactly those, see
`wsiproc.cohort.batch.OUTPUT_PARAMETERS`), and whether `wsiproc run` has an option for it (`OPTION`, with the
option's `HELP` and `CHOICES`; the flag is the field's name, `--no-<name>` for a switch that is on by default).
"""
from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any

from .classes import CLASS_READ_RADIUS_PX
from .engines import ENGINES, PRECISIONS
from .model import MODEL_MPP, RECEPTIVE_RADIUS_PX, SIZE_MULTIPLE_PX, size_multiple
from .postprocess import POSTPROCESSES, Postprocess

#: Metadata keys of a run parameter (see `parameter`).
OUTPUT, OPTION, HELP, CHOICES = "output", "option", "help", "choices"


def parameter(default: Any, *, output: bool, option: bool = False, help: str | None = None,
              choices: tuple[str, ...] | None = None) -> Any:
    """A run parameter's field: its default, whether it changes the outputs, and its `wsiproc run` option
    (`option`; `help` and `choices` are what the option shows)."""
    return field(default=default, metadata={OUTPUT: output, OPTION: option, HELP: help, CHOICES: choices})


def output_fields(schema: type) -> tuple[str, ...]:
    """The fields of a parameter dataclass that change what a run writes, in field order."""
    return tuple(f.name for f in fields(schema) if f.metadata[OUTPUT])


def option_fields(schema: type) -> tuple[Field, ...]:
    """The fields of a parameter dataclass that `wsiproc run` has an option for, in field order."""
    return tuple(f for f in fields(schema) if f.metadata[OPTION])


def _one_of(names: tuple[str, ...]) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}"


def raise_problems(problems: list[str]) -> None:
    """One ValueError for everything wrong with a set of parameters, so a user fixes them in one go."""
    if problems:
        raise ValueError("; ".join(problems))


@dataclass(frozen=True, kw_only=True)
class DetectionParams:
    """What the detection loop reads: the grids, the tiles, post-processing, stitching, tissue, reading."""

    mpp: float | None = parameter(None, output=True, option=True,  # overrides the slide's stored µm/px
                                  help="Pixel size in µm/px, overriding the file's (needed for plain images).")
    model_mpp: float = parameter(MODEL_MPP, output=True)
    # at model_mpp; 1 024 px: 88 % of the pixels the network sees are cores (512: 77 %), and tiles at the tissue's
    # border are split into quarters (border_quarters), so the larger tile wastes nothing on glass
    tile_px: int = parameter(1024, output=True, option=True, help="Tile core side at 0.5 µm/px.")
    halo_px: int | None = parameter(None, output=True, option=True,  # None: receptive radius + post-processing's reach (halo_for)
                                    help="Context around each tile at 0.5 µm/px (default: what the model and post-processing need).")
    batch_size: int = parameter(1, output=False, option=True,  # one 1 088² tile: as fast per pixel as 4 of 576²
                                help="Tiles per model call (halved automatically on GPU out-of-memory).")
    threshold: float = parameter(0.5, output=True, option=True, help="Confidence threshold.")
    postprocess: str = parameter("peaks", output=True, option=True, choices=POSTPROCESSES,
                                 help="peaks: local maxima of the smoothed confidence (separates touching nuclei); components: the "
                                      "paper's threshold + connected components.")
    min_distance_um: float = parameter(1.0, output=True, option=True,  # peaks: two maxima closer than this are one nucleus
                                       help="peaks: nuclei closer than this are one.")
    smooth_sigma_um: float = parameter(0.5, output=True)  # peaks: Gaussian smoothing of the confidence map before the maxima
    merge_radius_um: float = parameter(2.0, output=True)  # two nuclei of neighbouring tiles closer than this are one
    tissue_mask: bool = parameter(True, output=True, option=True, help="Send every tile to the model, background included.")
    io_workers: int = parameter(2, output=False)  # threads reading tiles ahead of the model
    # tiles at the tissue's border as quarter tiles where that costs less (tiles.split_at_tissue_border); like the
    # tiling itself it does not change what is found (each quarter carries the full halo)
    border_quarters: bool = parameter(True, output=False)
    strict: bool = parameter(False, output=False, option=True,  # default: an undecodable tile is skipped and reported
                             help="A tile that cannot be decoded fails its slide (default: skipped, reported).")
    classes: bool = parameter(True, output=True, option=True,  # nucleus types (detection.classes) where the model has a class head
                              help="Leave out the nucleus types (epithelial, inflammatory, stromal) of a model with a class "
                                   "head: the outputs of a detector alone.")

    def __post_init__(self) -> None:
        raise_problems(detection_problems(self))

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


def detection_problems(p: DetectionParams) -> list[str]:
    """What is wrong with detection parameters, one line each (empty: nothing)."""
    problems = []
    if p.tile_px <= 0 or p.tile_px % SIZE_MULTIPLE_PX:
        problems.append(f"tile_px must be a positive multiple of {SIZE_MULTIPLE_PX} (got {p.tile_px})")
    if p.halo_px is not None and (p.halo_px < 0 or p.halo_px % SIZE_MULTIPLE_PX):
        problems.append(f"halo_px must be a non-negative multiple of {SIZE_MULTIPLE_PX} (got {p.halo_px})")
    if p.postprocess not in POSTPROCESSES:
        problems.append(f"postprocess must be one of {', '.join(POSTPROCESSES)} (got {p.postprocess!r})")
    if p.min_distance_um <= 0 or p.smooth_sigma_um < 0:
        problems.append(f"min_distance_um must be > 0 and smooth_sigma_um >= 0 (got {p.min_distance_um}, {p.smooth_sigma_um})")
    if not 0.0 < p.threshold < 1.0:
        problems.append(f"threshold must lie in (0, 1) (got {p.threshold})")
    if p.batch_size < 1:
        problems.append(f"batch_size must be >= 1 (got {p.batch_size})")
    if p.mpp is not None and not 0 < p.mpp < 100:
        problems.append(f"mpp must be a pixel size in µm/px (got {p.mpp})")
    return problems


@dataclass(frozen=True, kw_only=True)
class EngineParams:
    """Which model runs, on which engine, in which precision (`wsiproc.detection.engines.resolve`)."""

    model_path: str | None = parameter(None, output=False)  # None: the shipped model; its sha256, not its path, is compared
    precision: str = parameter("auto", output=True, option=True, choices=PRECISIONS,
                               help="auto: on a CPU, a validated int8 model beside the .keras, else bfloat16 where the CPU has "
                                    "it, else float32; on a GPU, mixed float16 (TensorFlow) or float32 (keras). `wsiproc engines` shows what this machine uses.")
    engine: str = parameter("auto", output=True, option=True, choices=ENGINES,
                            help="auto: OpenVINO on a CPU, TensorFlow on a GPU it sees, else Keras on JAX or PyTorch "
                                 "(keras; one Keras backend per process).")

    def __post_init__(self) -> None:
        raise_problems(engine_problems(self))


def engine_problems(p: EngineParams) -> list[str]:
    """What is wrong with engine parameters, one line each (the model file itself is checked by `RunConfig.validate`)."""
    problems = []
    if p.precision not in PRECISIONS:
        problems.append(f"precision must be {_one_of(PRECISIONS)} (got {p.precision!r})")
    if p.engine not in ENGINES:
        problems.append(f"engine must be {_one_of(ENGINES)} (got {p.engine!r})")
    return problems
