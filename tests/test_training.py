"""Training from point annotations: the paper's targets and augmentation, real data, checkpoints, resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsiproc.learn import datasets
from wsiproc.cli import main
from wsiproc.learn.trainer import train
from wsiproc.learn.augment import augment_block
from wsiproc.learn.sampling import BlockSampler
from wsiproc.learn.targets import disk_targets
from wsiproc.learn.training import TrainConfig, TrainingImage


def test_each_point_becomes_a_disk_of_radius_4_px() -> None:
    mask = disk_targets((40, 40), np.array([[10.2, 12.0], [30.0, 30.0]]), 4, round_centres=True, drop_outside=True)
    assert mask.sum() == 2 * 49  # 49 pixel centres lie within 4 px of a pixel centre
    assert mask[12, 10] and mask[12, 14] and not mask[12, 15]


def test_the_one_disk_renderer_rounds_centres_for_blocks_and_follows_sub_pixel_ones_for_crops() -> None:
    """Pixel counts of the two renderers it replaced (the blocks' integer-centred dilation, the crops' sub-pixel
    disks), which it reproduced exactly on 3 000 random point sets."""

    def drawn(xy: tuple[float, float], radius_px: float, rounded: bool) -> np.ndarray:
        return disk_targets((20, 20), np.array([xy]), radius_px, round_centres=rounded, drop_outside=rounded)

    assert drawn((10, 10), 4, True).sum() == 49 and drawn((10, 10), 5, True).sum() == 81
    assert drawn((10.5, 10.5), 4.0, False).sum() == 52 and drawn((10.3, 10.0), 2.5, False).sum() == 19
    assert drawn((-0.6, 10), 4, True).sum() == 0  # rounded to column -1, outside: dropped
    assert drawn((-0.4, 10), 4, True).sum() == 29  # rounded to column 0: the half disk inside
    assert drawn((-0.6, 10), 4.0, False).sum() == 24 and drawn((-2.0, 10), 4.0, False).sum() == 13  # beyond the edge, still drawn
    assert list(drawn((10.5, 10), 4, True)[10].nonzero()[0]) == list(range(6, 15))  # half to even: 10.5 → 10
    assert list(drawn((11.5, 10), 4, True)[10].nonzero()[0]) == list(range(8, 17))  # 11.5 → 12
    assert drawn((10, 10), 4, True).dtype == bool


def test_augmentation_thirds_keep_shift_hue_and_add_noise() -> None:
    rng = np.random.default_rng(0)
    block = np.random.default_rng(1).uniform(0.2, 0.8, (16, 16, 3)).astype(np.float32)
    cfg = TrainConfig()
    assert np.array_equal(augment_block(block, 0, rng, cfg), block)
    shifted = augment_block(block, 1, rng, cfg)
    assert not np.allclose(shifted, block) and np.allclose(shifted.max(axis=2), block.max(axis=2), atol=1e-5)  # value kept
    noisy = augment_block(block, 2, rng, cfg)
    assert 0.005 < float(np.std(noisy - block)) < 0.02


@pytest.fixture(scope="module")
def two_images(shared_data: Path) -> list[TrainingImage]:
    ims = datasets.monuseg(shared_data / "monuseg-train", "train")[:2]
    return [TrainingImage.from_level0(a.name, a.read_rgb(), a.points_xy, a.mpp) for a in ims]


def test_monuseg_images_are_resampled_to_half_a_micron(two_images: list[TrainingImage]) -> None:
    assert all(im.rgb.shape == (500, 500, 3) for im in two_images)
    assert all(len(im.points_xy) > 300 and im.points_xy.max() < 500 for im in two_images)


def test_training_lowers_the_loss_and_resumes_from_its_checkpoint(tmp_path: Path, two_images) -> None:
    import keras

    cfg = TrainConfig(block_px=32, batch_size=8, epochs=1, steps_per_epoch=12, learning_rate=1e-3, seed=3)
    probe_x, probe_y = BlockSampler(two_images, cfg).batch(epoch=99, index=0)
    out = tmp_path / "m.keras"
    state = train(two_images, out, cfg, checkpoint_dir=tmp_path / "ckpt", verbose=0)
    assert state["epoch"] == 1 and (tmp_path / "ckpt" / "last.keras").is_file()
    cfg2 = TrainConfig(**{**cfg.__dict__, "epochs": 3})
    state = train(two_images, out, cfg2, checkpoint_dir=tmp_path / "ckpt", verbose=0)
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]  # continued, not restarted
    trained = keras.models.load_model(out, safe_mode=True)
    loss_fn = keras.losses.BinaryCrossentropy()
    loss_trained = float(loss_fn(probe_y, trained(probe_x, training=False)))
    from wsiproc.detection.model import build_model

    keras.utils.set_random_seed(3)
    loss_initial = float(loss_fn(probe_y, build_model()(probe_x, training=False)))
    assert loss_trained < loss_initial * 0.8, (loss_initial, loss_trained)


def test_the_papers_recipe_by_name_reads_label_maps_and_writes_a_loadable_model(tmp_path: Path, shared_data: Path) -> None:
    root = shared_data / "monuseg-train"
    result = CliRunner().invoke(main, [
        "train", "--images", str(root / "images" / "TCGA-18-5592-01Z-00-DX1.tif"), "--points", str(root / "labels"),
        "--mpp", "0.25", "--out", str(tmp_path / "m.keras"), "--recipe", "paper", "--steps", "2",
        "--crop-px", "32", "--batch-size", "4", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "training on 1 images" in result.output and "no held-out images" in result.output
    state = json.loads((tmp_path / "m_checkpoints" / "state.json").read_text())
    assert state["step"] == 2 and state["recipe"]["name"] == "paper" and state["recipe"]["crop_px"] == 32
    from wsiproc.detection.model import load_model

    assert load_model(tmp_path / "m.keras").output_shape == (None, None, None, 1)


def test_the_shipped_model_on_a_fixed_sample_of_every_domains_held_out_images(shared_data: Path, predictor) -> None:
    """The first two held-out images of each domain (fixed by the registry's order, not chosen by score).

    Measured with the shipped model: per-image F1 0.838, 0.864 (MoNuSeg), 0.699, 0.852 (crc-dev), 0.914, 0.887
    (BRCA-M2C), 0.639, 0.863 (CoNSeP), mean 0.820; the previous model scored 0.693 on the same eight.
    """
    from wsiproc.config import RunConfig
    from wsiproc.evaluate.scoring import score_image
    from wsiproc.detection.loop import detect
    from wsiproc.io.slide import open_slide

    f1 = {}
    for name in datasets.DOMAINS:
        for image in datasets.domain(name, shared_data, "held_out")[:2]:
            found = detect(open_slide(image.path, mpp=image.mpp), RunConfig(tissue_mask=False), predictor).detections
            f1[image.name] = score_image(found.xy, image.points_xy, radius_px=5.0 / image.mpp).f1
    assert len(f1) == 8
    assert np.mean(list(f1.values())) >= 0.79, f1
    assert min(f1.values()) >= 0.6, f1


def test_evaluate_command_scores_result_csvs_against_annotations(tmp_path: Path, shared_data: Path) -> None:
    from wsiproc.io.annotations import read_points

    truth = read_points(shared_data / "crc-dev" / "points.csv", image="img1")["img1"]
    kept = truth[: int(len(truth) * 0.9)] + 1.0  # 90 % found, each 1 px off
    rows = ["x,y,x_um,y_um,confidence,area_um2"] + [f"{x},{y},0,0,0.9,20" for x, y in kept]
    (tmp_path / "img1.csv").write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(main, ["evaluate", "--pred", str(tmp_path), "--truth", str(shared_data / "crc-dev" / "points.csv"),
                                       "--mpp", "0.55", "--out", str(tmp_path / "scores.csv")])
    assert "img1" in result.output and (tmp_path / "scores.csv").is_file()
    line = next(l for l in result.output.splitlines() if l.startswith("img1"))
    assert f" {len(kept)} " in line and "1.000" in line  # precision 1.000
    assert f"{len(kept) / len(truth):.3f}" in line  # recall


def test_four_domain_training_of_a_lean_network_lowers_the_loss(tmp_path: Path, shared_data: Path) -> None:
    """The shipped recipe in small: equal domain sampling, augmentation, a U-Net, on two real images per domain."""
    import keras

    from wsiproc.detection.architectures import build
    from wsiproc.learn.sampling import DomainSampler

    domains = {name: [TrainingImage.from_level0(a.name, a.read_rgb(), a.points_xy, a.mpp)
                      for a in datasets.domain(name, shared_data, "train")[:2]] for name in datasets.DOMAINS}
    sampler = DomainSampler(domains, crop_px=64, batch_size=8, seed=5)
    x, y, w = sampler.batch(0, 0)
    assert x.shape == (8, 64, 64, 3) and 0.02 < y.mean() < 0.4  # disks on nuclei, not everywhere
    assert w.min() == 1.0  # fully annotated images teach everywhere
    probe_x, probe_y, _ = sampler.batch(99, 0)
    keras.utils.set_random_seed(5)
    model = build("unet")
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="binary_crossentropy")
    before = float(model.evaluate(probe_x, probe_y, verbose=0))
    for step in range(40):
        model.train_on_batch(*sampler.batch(0, step))
    after = float(model.evaluate(probe_x, probe_y, verbose=0))
    assert after < before * 0.8, (before, after)


def test_each_domain_has_a_fixed_held_out_part(shared_data: Path) -> None:
    counts = {n: (len(datasets.domain(n, shared_data, "train")), len(datasets.domain(n, shared_data, "held_out")))
              for n in datasets.DOMAINS}
    assert counts == {"monuseg": (16, 14), "crc": (40, 10), "brca": (90, 30), "consep": (21, 6)}
    held = {a.name for a in datasets.domain("crc", shared_data, "held_out")}
    assert held == {f"img{i}" for i in range(5, 51, 5)}


def test_evaluate_names_a_folder_without_results_in_one_line(tmp_path: Path, shared_data: Path) -> None:
    result = CliRunner().invoke(main, ["evaluate", "--pred", str(tmp_path), "--truth", str(shared_data / "crc-dev" / "points.csv"),
                                       "--mpp", "0.55"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path}: no prediction files (<image>.csv) in this folder"
