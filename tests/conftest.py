"""Shared fixtures: where the real data sets live.

The data is public but not redistributable (see ../shared/data/README.md), so it is never copied into the
repository; tests that need it find it beside the checkout and skip, saying why, where it is absent.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`<repo>/../shared/data`, or the folder named by WSIPROC_SHARED_DATA."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    root = Path(os.environ.get("WSIPROC_SHARED_DATA", default))
    if not root.is_dir():
        message = f"shared data not found at {root}: real-data tests need ../shared/data"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a missing data folder is a broken set-up, not a reason to pass quietly
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def slides(shared_data: Path) -> Path:
    return shared_data / "slides"


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The model inside the package: what `wsiproc run` uses without --model."""
    from wsiproc.detection.model import DEFAULT_MODEL_PATH

    if not DEFAULT_MODEL_PATH.is_file():
        pytest.fail(f"the shipped model is missing at {DEFAULT_MODEL_PATH}")
    return DEFAULT_MODEL_PATH


def save_tiny_model(path: Path) -> Path:
    """A real one-layer Keras model that marks dark pixels, as nuclei are dark in H&E.

    It exists for speed: fuzzing, kill and many-process tests exercise input handling, batching, claims and
    file writing, which do not depend on the weights, and the shipped network costs about a second of CPU per
    tile where this one costs milliseconds. One 3×3 convolution over RGB in [0, 1]: every weight -20/27 and
    bias 11 give a sigmoid above 0.5 exactly where the mean of the 3×3×3 neighbourhood is below 0.55
    (haematoxylin).
    """
    import keras
    import numpy as np

    from wsiproc.detection.model import save_model

    rgb = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")
    model = keras.Model(rgb, conv(rgb))
    conv.set_weights([np.full((3, 3, 3, 1), -20 / 27, np.float32), np.array([11.0], np.float32)])
    return save_model(model, path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The dark-pixel model of `save_tiny_model`, saved once per session (test_explain has its own, in memory)."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.keras")


@pytest.fixture(scope="session")
def predictor(shipped_model: Path):
    from wsiproc.detection.inference import Predictor

    return Predictor(shipped_model)


@pytest.fixture(scope="session")
def make_detections():
    """Random but seeded detections over a `width_px` × `height_px` slide, for the writers' tests."""
    import numpy as np

    from wsiproc.detection.detections import Detections

    def make(seed: int, n: int, width_px: float, height_px: float, confidence: tuple[float, float], area_um2: tuple[float, float]) -> Detections:
        rng = np.random.default_rng(seed)
        return Detections(
            x_px=rng.uniform(0, width_px, n),
            y_px=rng.uniform(0, height_px, n),
            confidence=rng.uniform(*confidence, n).astype(np.float32),
            area_um2=rng.uniform(*area_um2, n).astype(np.float32),
        )

    return make


def wait_for(proc: subprocess.Popen, what: str, condition, timeout_s: float = 600) -> None:
    """Poll (every millisecond) until `condition()` holds while the process is still running; a process that
    ends first, or a condition that never comes, fails the test (the process group is killed on time-out)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            err = proc.communicate()[1] if proc.stderr is not None else ""
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {err}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {what} within {timeout_s} s")
        time.sleep(0.001)
