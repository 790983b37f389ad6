"""The networks by name: the contract they share, the geometry they declare, and ImageNet initialisation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsiproc.detection import architectures
from wsiproc.detection.postprocess import find_nuclei, find_peaks
from wsiproc.io.resample import rescale_rgb


@pytest.mark.parametrize("arch, multiple, halo", [("paper", 4, 28), ("vgg-lean", 4, 20), ("unet", 8, 48)])
def test_each_network_maps_rgb_to_a_confidence_map_of_the_same_size(arch: str, multiple: int, halo: int) -> None:
    model = architectures.build(arch)
    geo = architectures.geometry(model)
    assert (geo.size_multiple_px, geo.halo_px) == (multiple, halo)
    x = np.random.default_rng(0).random((2, 96, 64, 3), dtype=np.float32)
    y = np.asarray(model(x))
    assert y.shape == (2, 96, 64, 1) and 0.0 <= y.min() and y.max() <= 1.0


def test_the_declared_halo_covers_the_receptive_field() -> None:
    # Changing one input pixel changes the output only within the receptive radius the geometry declares.
    model = architectures.build("unet")
    radius = architectures.geometry(model).receptive_radius_px
    x = np.random.default_rng(1).random((1, 160, 160, 3), dtype=np.float32)
    x2 = x.copy()
    x2[0, 80, 80] = 1.0 - x2[0, 80, 80]
    diff = np.abs(np.asarray(model(x2)) - np.asarray(model(x)))[0, ..., 0]
    ys, xs = np.nonzero(diff > 1e-7)
    assert len(ys) > 0
    assert np.abs(ys - 80).max() <= radius and np.abs(xs - 80).max() <= radius


def test_the_lean_networks_cost_a_fraction_of_the_paper_network() -> None:
    paper = architectures.multiply_adds_per_pixel(architectures.build("paper"))
    assert 0.55e6 < paper < 0.6e6  # the paper's 0.56 M multiply-adds per pixel
    assert architectures.multiply_adds_per_pixel(architectures.build("vgg-lean")) < paper / 4
    assert architectures.multiply_adds_per_pixel(architectures.build("unet")) < paper / 15


def test_imagenet_normalisation_is_folded_into_the_first_convolution(shared_data: Path) -> None:
    npz = shared_data / "vgg16-imagenet" / "vgg16_block1_2.npz"
    model = architectures.build("vgg-lean")
    architectures.load_vgg16_npz(model, npz)
    import keras

    first = keras.Model(model.inputs, model.get_layer("block1_conv1").output)
    rgb = np.random.default_rng(2).random((1, 12, 12, 3)).astype(np.float32)
    got = np.asarray(first(rgb))[0, 1:-1, 1:-1]  # inside the image: away from the zero padding
    with np.load(npz) as w:
        k, b = w["block1_conv1/kernel"], w["block1_conv1/bias"]
    z = (rgb[0] - architectures.IMAGENET_MEAN_RGB) / architectures.IMAGENET_STD_RGB  # torchvision's input
    ref = np.zeros((10, 10, 64))
    for dy in range(3):
        for dx in range(3):
            ref += np.einsum("hwc,co->hwo", z[dy : dy + 10, dx : dx + 10], k[dy, dx])
    np.testing.assert_allclose(got, np.maximum(ref + b, 0.0), atol=1e-4)
    assert model.get_layer("block2_conv2").trainable


def test_a_network_without_a_vgg_stem_refuses_imagenet_weights(shared_data: Path) -> None:
    with pytest.raises(ValueError, match="no VGG-16 block 1–2 stem"):
        architectures.load_vgg16_npz(architectures.build("unet"), shared_data / "vgg16-imagenet" / "vgg16_block1_2.npz")


def test_peaks_separate_touching_nuclei_that_components_merge() -> None:
    yy, xx = np.mgrid[0:40, 0:60]
    conf = np.zeros((40, 60), np.float32)
    for cx in (24, 34):  # two nuclei 10 px (5 µm) apart whose confidence disks touch
        conf = np.maximum(conf, np.exp(-((xx - cx) ** 2 + (yy - 20) ** 2) / (2 * 5.0**2)))
    assert len(find_nuclei(conf, 0.5)) == 1
    peaks = find_peaks(conf, 0.5, min_distance_px=3, sigma_px=1.0)
    assert len(peaks) == 2
    np.testing.assert_allclose(np.sort(peaks.x), [24, 34], atol=0.5)
    np.testing.assert_allclose(peaks.y, [20, 20], atol=0.5)
    assert (peaks.area_px > 20).all()


@pytest.mark.parametrize("mpp", np.round(np.arange(0.2400, 0.2560, 0.0007), 4))
def test_rescaling_never_fails_on_the_rounded_edge(mpp: float) -> None:
    # 0.2468 µm/px once failed with "box can't exceed original image size".
    rgb = np.full((1000, 1000, 3), 128, np.uint8)
    out = rescale_rgb(rgb, float(mpp), 0.5)
    assert out.shape[:2] == (round(1000 * mpp / 0.5),) * 2 and (out == 128).all()
