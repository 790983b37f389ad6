"""LRP explanations: relevance is finite, conserved, and sits on the nucleus the network detected.

Uses the shipped model (retrained from time to time, so no exact values are checked) on a real CRC H&E
image (0.55 µm/px), resampled to the model's 0.5 µm/px.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from wsiproc.evaluate.explain import BLOCK_PX, RULES, lrp_relevance, lrp_relevance_batch
from wsiproc.detection.postprocess import find_nuclei
from wsiproc.io.resample import rescale_rgb

CRC_MPP = 0.55


@pytest.fixture(scope="module")
def crc_rgb(shared_data: Path) -> np.ndarray:
    """img1.png of crc-dev at 0.5 µm/px (550 × 550)."""
    rgb = np.asarray(Image.open(shared_data / "crc-dev" / "images" / "img1.png").convert("RGB"))
    return rescale_rgb(rgb, CRC_MPP, 0.5)


@pytest.fixture(scope="module")
def detected_blocks(crc_rgb: np.ndarray, predictor) -> list[np.ndarray]:
    """64×64 blocks (RGB in [0, 1]) centred on the 2 most confident nuclei the model finds in a 128 px crop."""
    y0 = x0 = 200
    crop = crc_rgb[y0 : y0 + 128, x0 : x0 + 128]
    nuclei = find_nuclei(predictor(crop[None])[0], 0.5)
    half = BLOCK_PX // 2
    inner = (nuclei.y >= half) & (nuclei.y < 128 - half) & (nuclei.x >= half) & (nuclei.x < 128 - half)
    assert inner.any(), "the shipped model detects no nucleus in a real H&E crop"
    order = np.argsort(-nuclei.confidence[inner])[:2]
    blocks = []
    for y, x in zip(nuclei.y[inner][order], nuclei.x[inner][order]):
        v, u = int(round(y)) + y0, int(round(x)) + x0
        blocks.append(crc_rgb[v - half : v + half, u - half : u + half].astype(np.float32) / 255.0)
    return blocks


@pytest.fixture(scope="module")
def tiny_model():
    """The shipped network's layer types (conv+ReLU, max pooling, dropout, 2× upsampling twice, sigmoid conv)
    with a few channels and random weights and biases: exact LRP properties, checked in milliseconds."""
    import keras
    from keras import initializers, layers

    seeds = iter(range(100))

    def conv(filters: int, activation: str = "relu"):
        # Seeded initialisers: no global random state is touched.
        return layers.Conv2D(filters, 3, padding="same", activation=activation,
                             kernel_initializer=initializers.GlorotUniform(seed=next(seeds)),
                             bias_initializer=initializers.RandomNormal(stddev=0.05, seed=next(seeds)))

    inputs = keras.Input(shape=(None, None, 3))
    x = conv(6)(inputs)
    x = conv(6)(x)
    x = layers.MaxPooling2D(2)(x)
    x = conv(8)(x)
    x = layers.MaxPooling2D(2)(x)
    x = conv(8)(x)
    x = layers.Dropout(0.5)(x)
    x = layers.UpSampling2D(2)(x)
    x = layers.UpSampling2D(2)(x)
    outputs = conv(1, "sigmoid")(x)
    return keras.Model(inputs, outputs)


def _logit(model, block: np.ndarray, yx: tuple[int, int]) -> float:
    p = float(np.asarray(model(block[None], training=False), dtype=np.float64)[0, yx[0], yx[1], 0])
    return float(np.log(p / (1 - p)))


def _rings(size: int = BLOCK_PX, centre: tuple[int, int] = (32, 32)) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.hypot(yy - centre[0], xx - centre[1])


def test_relevance_is_finite_block_shaped_and_local(predictor, detected_blocks: list[np.ndarray]) -> None:
    """Both rules on the shipped model; and LRP-ε's |R| within 4 px of a detected nucleus' centre beats the
    ring 12–28 px out (other cells, stroma), for the model's most confident nuclei."""
    d = _rings()
    for rule in ("epsilon", "alphabeta"):
        batch = np.stack(detected_blocks if rule == "epsilon" else detected_blocks[:1])  # αβ costs twice ε
        relevance = lrp_relevance_batch(predictor.model, batch, [(32, 32)] * len(batch), rule=rule)
        assert relevance.shape == (len(batch), BLOCK_PX, BLOCK_PX) and relevance.dtype == np.float32
        assert np.all(np.isfinite(relevance))
        for r in relevance:
            assert np.abs(r).max() > 0
            # Nothing beyond the receptive field (~29 px around the target) can be relevant.
            assert np.abs(r[d > 40]).max() <= 1e-6 * np.abs(r).max()
            if rule == "epsilon":
                assert np.abs(r[d <= 4]).mean() > np.abs(r[(d > 12) & (d <= 28)]).mean()


@pytest.mark.parametrize("rule", sorted(RULES))
def test_relevance_is_conserved_without_biases(tiny_model, rule: str) -> None:
    """With zero biases nothing absorbs relevance: the input's relevance sums to the explained logit."""
    import keras

    model = keras.models.clone_model(tiny_model)
    model.set_weights([np.zeros_like(w) if w.ndim == 1 else w for w in tiny_model.get_weights()])
    block = np.random.default_rng(1).uniform(0, 1, (BLOCK_PX, BLOCK_PX, 3)).astype(np.float32)
    for target in [(30, 33), (0, 63), (63, 5)]:
        total = float(lrp_relevance(model, block, target, rule=rule, epsilon=1e-9).sum())
        assert total == pytest.approx(_logit(model, block, target), rel=1e-3, abs=1e-5), target


def test_relevance_with_biases_and_batches(tiny_model) -> None:
    """With biases the ε rule leaves the biases' share out (so the sum differs from the logit), αβ ignores
    them and stays conserved; a batch gives what one block at a time gives, whatever the targets."""
    rng = np.random.default_rng(2)
    blocks = rng.uniform(0, 1, (3, BLOCK_PX, BLOCK_PX, 3)).astype(np.float32)
    targets = [(32, 32), (5, 60), (63, 0)]
    batch = lrp_relevance_batch(tiny_model, blocks, targets, rule="epsilon")
    for block, target, r in zip(blocks, targets, batch):
        single = lrp_relevance(tiny_model, block, target)
        np.testing.assert_allclose(r, single, rtol=1e-4, atol=1e-6 * (np.abs(single).max() + 1e-12))
        assert np.all(np.isfinite(r)) and r.shape == (BLOCK_PX, BLOCK_PX)
        assert np.abs(r[_rings(centre=target) > 40]).max(initial=0) == 0
    # αβ leaves biases out of the redistribution: the logit (bias included) arrives whole at the input.
    r = lrp_relevance(tiny_model, blocks[0], (32, 32), rule="alpha1beta0")
    assert float(r.sum()) == pytest.approx(_logit(tiny_model, blocks[0], (32, 32)), rel=1e-3, abs=1e-5)


def test_bad_arguments(predictor) -> None:
    block = np.zeros((BLOCK_PX, BLOCK_PX, 3), np.float32)
    with pytest.raises(ValueError, match="unknown LRP rule"):
        lrp_relevance(predictor.model, block, (32, 32), rule="gradient")
    with pytest.raises(ValueError, match="outside"):
        lrp_relevance(predictor.model, block, (64, 0))
    with pytest.raises(ValueError, match="RGB block"):
        lrp_relevance(predictor.model, block[..., 0], (32, 32))
    assert set(RULES) >= {"epsilon", "alphabeta"}


def test_cli_explain_writes_the_panel(shared_data: Path, shipped_model: Path, tmp_path: Path) -> None:
    from wsiproc.cli import main

    image = shared_data / "crc-dev" / "images" / "img1.png"
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["explain", str(image), "--n", "1", "--out", str(out), "--mpp", str(CRC_MPP),
                                       "--region-px", "64", "--seed", "3", "--model", str(shipped_model)])
    assert result.exit_code == 0, result.output
    panel = out / "img1_explain.png"
    assert panel.is_file() and f"saved {panel}" in result.output
    with Image.open(panel) as img:
        assert img.format == "PNG" and 200 <= img.width <= 2000 and 300 <= img.height <= 2000
        assert np.asarray(img.convert("L"), dtype=np.float32).std() > 20
    assert sorted(p.name for p in out.iterdir()) == ["img1_explain.png"]


@pytest.mark.parametrize("case", ["missing", "no-mpp"])
def test_cli_explain_errors_are_one_line(shared_data: Path, tmp_path: Path, case: str) -> None:
    from wsiproc.cli import main

    path = tmp_path / "nope.svs" if case == "missing" else shared_data / "crc-dev" / "images" / "img1.png"
    result = CliRunner().invoke(main, ["explain", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{path}: ")


def test_cli_explain_refuses_a_tflite_model_in_one_line(shared_data: Path, tmp_path: Path) -> None:
    from wsiproc.cli import main

    model = tmp_path / "m.int8.tflite"
    model.write_bytes(b"TFL3")
    image = shared_data / "crc-dev" / "images" / "img1.png"
    result = CliRunner().invoke(main, ["explain", str(image), "--mpp", "0.55", "--model", str(model), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == (f"{model}: TFLite models are no longer run; make an OpenVINO int8 model with `wsiproc quantize` "
                                     "from the .keras it came from")  # engines.resolve's message, as for a run
