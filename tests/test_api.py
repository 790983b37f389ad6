"""The public API as a user meets it: `import wsiproc`, then open, detect, run a batch; and what stays unloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import wsiproc

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "wsiproc" / "sample" / "CMU-1-Small-Region.svs"


def test_detect_and_run_batch_read_like_the_readme(tmp_path: Path, predictor) -> None:
    slide = wsiproc.open_slide(SAMPLE)
    try:
        nuclei = wsiproc.detect(slide, wsiproc.RunConfig(), model=predictor)
    finally:
        slide.close()
    assert isinstance(nuclei, wsiproc.Detections) and len(nuclei) > 1000
    assert nuclei.x_px.min() >= -0.5 and nuclei.x_px.max() <= slide.dimensions[0] - 0.5

    lines: list[str] = []
    outcomes = wsiproc.run_batch([SAMPLE], tmp_path, model=predictor, echo=lines.append)
    assert [o.status for o in outcomes] == ["done"], lines
    record = json.loads((tmp_path / f"{SAMPLE.stem}.json").read_text())
    assert record["nuclei"] == len(nuclei)  # the batch writes what detect returns
    csv = np.loadtxt(tmp_path / f"{SAMPLE.stem}.csv", delimiter=",", skiprows=1, ndmin=2, usecols=range(6))
    assert np.allclose(np.sort(csv[:, 0]), np.sort(nuclei.x_px), atol=0.005)
    assert (tmp_path / "summary.csv").is_file()


def test_public_names_are_the_documented_ones() -> None:
    assert set(wsiproc.__all__) == {"__version__", "open_slide", "RunConfig", "detect", "run_batch", "Detections",
                                  "CLASSES", "Predictor"}
    assert {"detect", "run_batch"} <= set(dir(wsiproc))


def _loaded_after(code: str) -> tuple[set[str], float]:
    """Top-level modules loaded by `code` in a fresh interpreter, and its wall time."""
    probe = code + "\nimport sys, json; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1])), time.perf_counter() - t0


HEAVY = {"tensorflow", "keras", "openvino", "nncf", "matplotlib"}


def test_import_wsiproc_loads_nothing_heavy() -> None:
    loaded, _ = _loaded_after("import wsiproc")
    assert not loaded & (HEAVY | {"numpy", "dask", "scipy"})


def test_import_wsiproc_changes_no_import_machinery_the_cli_does() -> None:
    """The quiet-TensorFlow import hook is the CLI's choice (its process and its dask workers), not the library's."""
    probe = ("import sys\nbefore = list(sys.meta_path)\nimport wsiproc, wsiproc.config\nassert sys.meta_path == before, sys.meta_path\n"
             "from wsiproc.cli import main\nassert sys.meta_path == before\n"
             "try:\n    main(['info', '--help'])\nexcept SystemExit:\n    pass\n"
             "assert [type(f).__name__ for f in sys.meta_path if f not in before] == ['_TensorFlowFinder'], sys.meta_path\n")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True)


def _has_quiet_hook() -> bool:
    import sys

    return any(type(f).__name__ == "_TensorFlowFinder" for f in sys.meta_path)


def test_workers_of_the_cli_cluster_start_tensorflow_quietly_too() -> None:
    from wsiproc.cohort.cluster import dask_client

    with dask_client("local", n_workers=1) as client:
        assert list(client.run(_has_quiet_hook).values()) == [True]


def test_help_and_info_do_not_load_tensorflow() -> None:
    run_cli = ("import sys; from wsiproc.cli import main\n"
               "try:\n    main([{args}], standalone_mode=True)\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n")
    help_loaded, help_s = _loaded_after(run_cli.format(args='"--help"'))
    info_loaded, _ = _loaded_after(run_cli.format(args=f'"info", {str(SAMPLE)!r}'))
    assert not help_loaded & HEAVY, help_loaded & HEAVY
    assert not info_loaded & HEAVY, info_loaded & HEAVY
    assert "dask" not in help_loaded | info_loaded  # help loads click and the option tables only
    assert help_s < 5  # about 0.5 s on an idle machine; generous for a loaded CI runner


def test_a_tensorflow_run_prints_no_tensorflow_lines(tmp_path: Path, tiny_model: Path) -> None:
    """TensorFlow's start-up lines (oneDNN, absl, CPU features) stay off the terminal; --verbose lets them through."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WSIPROC_VERBOSE", None)
    args = ["run", str(SAMPLE), "--model", str(tiny_model), "--engine", "tensorflow", "--quiet", "--no-tissue-mask"]
    quiet = subprocess.run([sys.executable, "-m", "wsiproc.cli", *args, "--out", str(tmp_path / "quiet")], cwd=REPO,
                           env=env, capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    noise = ("oneDNN", "absl", "cpu_feature_guard", "tensorflow/", "I0000", "W0000")
    assert not [line for line in quiet.stderr.splitlines() if any(n in line for n in noise)], quiet.stderr
    verbose = subprocess.run([sys.executable, "-m", "wsiproc.cli", "--verbose", *args, "--out", str(tmp_path / "verbose")],
                             cwd=REPO, env=env, capture_output=True, text=True)
    assert verbose.returncode == 0, verbose.stderr
    assert "oneDNN" in verbose.stderr or "absl" in verbose.stderr  # TensorFlow 2.2x says one of them at start-up
    quiet_csv = (tmp_path / "quiet" / f"{SAMPLE.stem}.csv").read_bytes()
    assert quiet_csv == (tmp_path / "verbose" / f"{SAMPLE.stem}.csv").read_bytes()  # the same numbers either way


def test_errors_map_to_exit_codes_in_one_place(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wsiproc.cli import main
    from wsiproc.cli.common import exit_code
    from wsiproc.errors import ModelError, ModelNotFoundError, OutputFolderError, SlideError, UsageError, WsiprocError

    assert exit_code(UsageError("x")) == 2
    assert {exit_code(e) for e in (SlideError("x"), ModelError("x"), OutputFolderError("x"), WsiprocError("x"))} == {1}
    assert isinstance(SlideError("x"), ValueError) and isinstance(ModelNotFoundError("x"), FileNotFoundError)
    missing = tmp_path / "missing.keras"
    result = CliRunner().invoke(main, ["explain", str(SAMPLE), "--out", str(tmp_path), "--model", str(missing)])
    assert result.exit_code == 1 and result.output.strip() == f"{missing}: model file not found"
    result = CliRunner().invoke(main, ["run", str(SAMPLE), "--out", str(tmp_path), "--claim-timeout", "soon"])
    assert result.exit_code == 2 and result.output.startswith("error: --claim-timeout: expected a duration")
