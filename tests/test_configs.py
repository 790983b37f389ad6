"""Every shipped config file is valid and complete; bad configs are refused with a clear message."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from wsiproc.cli import main
from wsiproc.config import RunConfig, load_config_file

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["default.yaml", "gpu.yaml", "cpu-fast.yaml"])
def test_shipped_run_configs_hold_every_parameter_and_validate(name: str) -> None:
    values = load_config_file(CONFIGS / name)
    assert set(values) == RunConfig.field_names()
    RunConfig(**values).validate()


def test_default_yaml_matches_the_built_in_defaults() -> None:
    assert RunConfig(**load_config_file(CONFIGS / "default.yaml")) == RunConfig()


@pytest.mark.parametrize("text, message", [
    ("tile_px: 256\ncolour: blue\n", "unknown parameter(s) colour"),
    ("tile_px: 30\n", "tile_px must be a positive multiple of 4"),
    ("threshold: 1.5\n", "threshold must lie in (0, 1)"),
    ("- a list\n", "must be a mapping"),
    ("tile_px: [unclosed\n", "cannot read config"),
])
def test_bad_configs_are_refused_before_any_work(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = CliRunner().invoke(main, ["run", "--sample", "--out", str(tmp_path / "out"), "--config", str(config)])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_command_line_options_override_the_config_file(tmp_path: Path, monkeypatch) -> None:
    import wsiproc.cohort.batch as batch

    seen = {}

    def capture(inputs, out_dir, cfg, predictor, **kwargs):  # stop right before any slide is read
        seen["cfg"] = cfg
        return []

    monkeypatch.setattr(batch, "run_batch", capture)
    config = tmp_path / "c.yaml"
    config.write_text("tile_px: 256\nthreshold: 0.7\n")
    CliRunner().invoke(main, ["run", "--sample", "--out", str(tmp_path), "--config", str(config), "--threshold", "0.6"])
    assert seen["cfg"].tile_px == 256 and seen["cfg"].threshold == 0.6


def test_adapt_yaml_holds_every_adapt_parameter_with_the_papers_values() -> None:
    from wsiproc.learn.adapt import AdaptConfig

    values = load_config_file(CONFIGS / "adapt.yaml", AdaptConfig)
    cfg = AdaptConfig(**values).validate()
    assert cfg == AdaptConfig() and (cfg.high, cfg.low, cfg.block_px) == (0.8, 0.5, 64)
    with pytest.raises(ValueError, match="unknown parameter"):
        load_config_file(CONFIGS / "default.yaml", AdaptConfig)


# ------------------------------------------------------------------------------- parameters by what they affect


@pytest.mark.parametrize("part, values, message", [
    ("DetectionParams", {"tile_px": 30}, "tile_px must be a positive multiple of 4 (got 30)"),
    ("DetectionParams", {"threshold": 1.5}, "threshold must lie in (0, 1) (got 1.5)"),
    ("DetectionParams", {"postprocess": "blobs"}, "postprocess must be one of peaks, components (got 'blobs')"),
    ("DetectionParams", {"mpp": 250.0}, "mpp must be a pixel size in µm/px (got 250.0)"),
    ("EngineParams", {"precision": "int4"}, "precision must be auto, float32, bfloat16, int8 or mixed_float16 (got 'int4')"),
    ("EngineParams", {"engine": "onnx"}, "engine must be auto, openvino or tensorflow (got 'onnx')"),
    ("OutputParams", {"density_cell_um": 0}, "density_cell_um must be > 0 (got 0)"),
])
def test_each_part_checks_itself_when_made_and_is_frozen(part: str, values: dict, message: str) -> None:
    import dataclasses

    from wsiproc.detection.params import DetectionParams, EngineParams
    from wsiproc.outputs.params import OutputParams

    kind = {"DetectionParams": DetectionParams, "EngineParams": EngineParams, "OutputParams": OutputParams}[part]
    with pytest.raises(ValueError) as err:
        kind(**values)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:  # the composed config refuses it the same way
        RunConfig(**values)
    assert str(err.value) == message
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(kind(), next(iter(values)), 1)


def test_run_config_is_the_three_parts_with_one_flat_api(tmp_path: Path) -> None:
    import dataclasses

    from wsiproc.detection.params import DetectionParams, EngineParams
    from wsiproc.outputs.params import OutputParams

    cfg = RunConfig(threshold=0.6, engine="openvino", geojson_gz=True)
    assert (cfg.threshold, cfg.engine, cfg.geojson_gz) == (0.6, "openvino", True)
    assert isinstance(cfg, DetectionParams)  # what the detection loop takes
    assert cfg.detection_params == DetectionParams(threshold=0.6)
    assert cfg.engine_params == EngineParams(engine="openvino") and cfg.output_params == OutputParams(geojson_gz=True)
    assert RunConfig.field_names() == {f.name for part in (DetectionParams, EngineParams, OutputParams) for f in dataclasses.fields(part)}
    with pytest.raises(ValueError, match="tile_px must be a positive multiple of 4 .*; threshold must lie in"):
        RunConfig(tile_px=30, threshold=2.0)  # every problem in one message
    with pytest.raises(ValueError, match="threshold must lie in"):
        dataclasses.replace(cfg, threshold=0.0)
    missing = tmp_path / "m.keras"
    with pytest.raises(ValueError, match="m.keras: model file not found"):
        RunConfig(model_path=str(missing)).validate()  # the file system is checked on demand
    assert cfg.validate() is cfg


def test_resume_compares_the_fields_marked_as_changing_the_output() -> None:
    import dataclasses

    from wsiproc.cohort.batch import OUTPUT_PARAMETERS
    from wsiproc.detection.params import OUTPUT

    marked = {f.name for f in dataclasses.fields(RunConfig) if f.metadata[OUTPUT]}
    assert set(OUTPUT_PARAMETERS) == marked
    assert marked == {"model_mpp", "mpp", "tile_px", "halo_px", "threshold", "postprocess", "min_distance_um", "smooth_sigma_um",
                      "merge_radius_um", "tissue_mask", "density_cell_um", "geojson_gz", "precision", "engine", "classes"}
    assert RunConfig.field_names() - marked == {"model_path", "batch_size", "io_workers", "strict", "border_quarters"}


def test_wsiproc_run_has_an_option_for_each_field_marked_as_one() -> None:
    import dataclasses

    from wsiproc.cli.run import run
    from wsiproc.detection.params import OPTION

    flags = {flag for p in run.params for flag in p.opts}
    for f in dataclasses.fields(RunConfig):
        flag = ("--no-" if f.default is True else "--") + f.name.replace("_", "-")  # a switch on by default is turned off
        assert (flag in flags) == f.metadata[OPTION], f.name
    assert {"--model", "--no-tissue-mask", "--no-classes", "--strict", "--geojson-gz", "--tile-px", "--mpp"} <= flags
    defaults = {p.name: p.default for p in run.params}
    assert (defaults["tile_px"], defaults["threshold"], defaults["density_cell_um"]) == (1024, 0.5, 50.0)
