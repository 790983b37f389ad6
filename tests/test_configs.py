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
