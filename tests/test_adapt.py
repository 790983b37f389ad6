"""`wsiproc adapt` on real unlabeled H&E: the block store, resume, provenance, both recipes, the consistency filter,
the negatives, the unsure weights and the guard against no positives."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsiproc.cli import main


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, shared_data: Path) -> list[Path]:
    """Three crc-dev images (another lab and scanner), used without their annotations."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("cohort")
    paths = []
    for name in ("img3", "img17", "img40"):
        # 192 × 192 crops keep the test quick: one small tile each at 0.5 µm/px.
        crop = Image.open(shared_data / "crc-dev" / "images" / f"{name}.png").convert("RGB").crop((0, 0, 192, 192))
        paths.append(folder / f"{name}.png")
        crop.save(paths[-1])
    return paths


def _adapt(cohort: list[Path], out: Path, work: Path, *extra: str):
    return CliRunner().invoke(main, ["adapt", *map(str, cohort), "--mpp", "0.55", "--out", str(out), "--work", str(work),
                                     "--epochs", "1", "--steps-per-epoch", "2", "--per-slide-cap", "40", *extra])


def test_adapt_mines_a_block_store_fine_tunes_and_records_provenance(tmp_path: Path, cohort, shipped_model) -> None:
    import zarr

    from wsiproc.io.files import file_sha256
    from wsiproc.detection.model import load_model
    from wsiproc.learn.adapt.pseudo_labels import NUCLEUS, UNSURE

    out, work = tmp_path / "adapted.keras", tmp_path / "work"
    result = _adapt(cohort, out, work, "--recipe", "consistency")
    assert result.exit_code == 0, result.output
    store = zarr.open_group(str(work / "blocks.zarr"), mode="r")
    slides = store.attrs["slides"]
    assert store.attrs["recipe"] == "consistency"
    assert [Path(s["path"]).name for s in slides] == ["img3.png", "img17.png", "img40.png"]
    n = sum(s["blocks"] for s in slides)
    assert 0 < n <= 3 * 40
    assert store["images"].shape == (n, 64, 64, 3) and store["targets"].shape == (n, 64, 64)
    assert store["slide"].shape == (n,) and store["position"].shape == (n, 2) and store["centred"].shape == (n,)
    targets, centred = store["targets"][:], store["centred"][:]
    assert set(np.unique(targets)) <= {0, 1, 2}
    assert (targets[centred, 32, 32] == NUCLEUS).all()  # centred blocks sit on a confident, consistent nucleus
    assert 0.2 < (~centred).mean() < 0.5  # a third at random tissue positions: the new domain's background
    assert (targets == UNSURE).any()  # unsure candidates exist in real tissue and are kept out of the loss
    assert 0.02 < (targets == NUCLEUS).mean() < 0.5  # other nuclei are drawn too, the rest is background
    assert all(s["hard_positives"] >= int(np.sum(centred[store["slide"][:] == i])) for i, s in enumerate(slides))
    provenance = json.loads((tmp_path / "adapted.json").read_text())
    assert provenance["base_model"]["sha256"] == file_sha256(shipped_model)
    assert provenance["adapted_model_sha256"] == file_sha256(out)
    assert provenance["recipe"] == "consistency" and provenance["adapt_config"]["views"] == 4
    assert provenance["calibration"]["tiles"] == 3  # calibrated first: one tile per crop
    assert provenance["thresholds"] == {"high": 0.8, "low": 0.5} and provenance["blocks"] == n
    assert [c["sha256"] for c in provenance["cohort"]] == [file_sha256(p) for p in cohort]
    assert load_model(out).count_params() == load_model(shipped_model).count_params()

    again = _adapt(cohort, tmp_path / "again.keras", work, "--recipe", "consistency")  # same work folder: resumes
    assert again.exit_code == 0, again.output
    assert again.output.count("already mined") == 3 and "cohort calibration already done" in again.output
    assert sum(s["blocks"] for s in zarr.open_group(str(work / "blocks.zarr"), mode="r").attrs["slides"]) == n

    other = _adapt(cohort, tmp_path / "paper.keras", work, "--recipe", "paper")  # a store is one recipe's
    assert other.exit_code != 0 and "holds blocks of the 'consistency' recipe, not 'paper'" in other.output


def test_the_paper_recipe_teaches_every_low_threshold_nucleus_and_nothing_else(tmp_path: Path, cohort, shipped_model) -> None:
    import zarr

    out, work = tmp_path / "paper.keras", tmp_path / "work"
    result = _adapt(cohort, out, work, "--recipe", "paper")
    assert result.exit_code == 0, result.output
    store = zarr.open_group(str(work / "blocks.zarr"), mode="r")
    targets = store["targets"][:]
    assert len(targets) and store["centred"][:].all()  # only blocks around hard positives, no random ones
    assert set(np.unique(targets)) == {0, 1}  # nothing unsure: the paper teaches every pixel
    assert (targets[:, 32, 32] == 1).mean() > 0.9  # a 0.5 component's centre can sit off its 0.8 core's
    assert json.loads((tmp_path / "paper.json").read_text())["recipe"] == "paper"


def test_consistency_keeps_what_every_view_finds_and_leaves_the_rest_unsure() -> None:
    """Four synthetic views of a 64 × 64 map: a steady nucleus, one a view misses, a faint one and a trace."""
    from wsiproc.learn.adapt.config import AdaptConfig
    from wsiproc.learn.adapt.pseudo_labels import consistent_labels
    from wsiproc.detection.postprocess import Postprocess

    yy, xx = np.mgrid[:64, :64]

    def blob(x, y, peak):
        return peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2))

    maps = np.stack([blob(12, 12, 0.95) + blob(40, 12, 0.9 if v else 0.1) + blob(12, 44, 0.42) + blob(44, 44, 0.2)
                     for v in range(4)])
    labels = consistent_labels(maps, AdaptConfig(), Postprocess("peaks", 0.5, 2, 1.0))
    np.testing.assert_allclose(labels.hard_xy, [[12, 12]], atol=0.5)  # found by all four views, mean 0.95
    np.testing.assert_allclose(labels.nuclei_xy, [[12, 12]], atol=0.5)
    unsure = sorted(map(tuple, np.round(labels.unsure_xy).astype(int)))
    assert unsure == [(12, 44), (40, 12)]  # missed by a view (mean 0.7); faint (0.42); the 0.2 trace is background


def test_unsure_pixels_weigh_nothing_in_the_fine_tuning_loss(tmp_path: Path) -> None:
    from wsiproc.learn.adapt.pseudo_labels import NUCLEUS, UNSURE
    from wsiproc.learn.adapt.store import BlockStore, MinedSlide, StoreSampler
    from wsiproc.learn.training import TrainConfig

    targets = np.zeros((4, 64, 64), np.uint8)
    targets[:, 28:36, 28:36] = NUCLEUS
    targets[:, :8, :8] = UNSURE
    store = BlockStore(tmp_path / "blocks.zarr", 64)
    store.add({"path": "a", "sha256": "aa"}, MinedSlide(np.full((4, 64, 64, 3), 128, np.uint8), targets, np.zeros((4, 2)),
                                                         np.ones(4, bool), 4, 0.1))
    x, y, w = StoreSampler(store, TrainConfig(batch_size=3)).batch(0, 0)
    assert x.shape == (3, 64, 64, 3) and y.shape == (3, 64, 64, 1) and w.shape == (3, 64, 64)
    assert (w == 0).sum() == 3 * 64 and (y[..., 0][w == 0] == 0).all()  # the 8 × 8 corner, wherever flips put it
    assert y.sum() == 3 * 64 and (w[y[..., 0] == 1] == 1).all()


def test_a_strong_student_sees_every_block_recoloured_and_its_pseudo_labels_unchanged(tmp_path: Path) -> None:
    from wsiproc.learn.adapt import AdaptConfig
    from wsiproc.learn.adapt.pseudo_labels import NUCLEUS
    from wsiproc.learn.adapt.store import BlockStore, MinedSlide, StoreSampler
    from wsiproc.learn.training import TrainConfig

    pink = np.array([200, 140, 190], np.uint8)  # one colour: flips and turns cannot change a block
    targets = np.zeros((6, 64, 64), np.uint8)
    targets[:, 28:36, 28:36] = NUCLEUS
    store = BlockStore(tmp_path / "blocks.zarr", 64)
    store.add({"path": "a", "sha256": "aa"}, MinedSlide(np.broadcast_to(pink, (6, 64, 64, 3)).copy(), targets, np.zeros((6, 2)),
                                                         np.ones(6, bool), 6, 0.1))
    cfg = TrainConfig(batch_size=6)
    as_stored = pink / 255.0
    paper_x, paper_y, _ = StoreSampler(store, cfg, AdaptConfig(student_augment="paper").student_augmentation).batch(0, 0)
    np.testing.assert_allclose(paper_x[0], np.broadcast_to(as_stored, (64, 64, 3)), atol=1e-6)  # a third as is
    strong = AdaptConfig(recipe="consistency", student_augment="strong", stain_sigma=0.1).validate().student_augmentation
    x, y, w = StoreSampler(store, cfg, strong).batch(0, 0)
    shift = np.abs(x.mean(axis=(1, 2)) - as_stored).max(axis=1)
    assert (shift > 0.005).all(), shift  # every block recoloured
    assert y.sum() == paper_y.sum() == 6 * 64 and (w == 1).all()
    with pytest.raises(ValueError, match="student_augment must be one of paper, strong"):
        AdaptConfig(student_augment="heavy").validate()


def test_an_over_confident_student_is_given_back_its_teachers_nucleus_count(tmp_path: Path, cohort, shipped_model) -> None:
    from wsiproc.config import RunConfig
    from wsiproc.detection.images import detect_images
    from wsiproc.detection.inference import Predictor
    from wsiproc.detection.model import load_model, save_model
    from wsiproc.learn.adapt import AdaptConfig
    from wsiproc.learn.adapt.drift import density_threshold, match_density
    from wsiproc.learn.calibrate import fold_threshold
    from wsiproc.learn.datasets import AnnotatedImage

    assert density_threshold(np.array([0.9, 0.8, 0.6, 0.4, 0.2]), 3) == pytest.approx(0.5)  # between kept and left out
    run_cfg = RunConfig(mpp=0.55, engine="tensorflow", precision="float32")
    teacher = Predictor(shipped_model, engine="tensorflow", precision="float32")
    student = load_model(shipped_model)
    fold_threshold(student, 0.3)  # self-training's drift: 0.5 on the student is 0.3 on the teacher
    save_model(student, tmp_path / "student.keras")
    check = match_density(cohort, run_cfg, teacher, tmp_path / "student.keras", AdaptConfig(recipe="consistency"), echo=print)
    assert check.tiles == 3 and check.student_detections > check.teacher_detections > 20
    assert 0.6 < check.threshold < 0.8  # the teacher's 0.5 is sigmoid(logit(0.5) - logit(0.3)) = 0.70 on the student
    images = [AnnotatedImage(p.stem, p, 0.55, np.zeros((0, 2))) for p in cohort]
    cfg = RunConfig(mpp=0.55, tissue_mask=False)

    def count(model: Path) -> int:
        return sum(len(xy) for xy in detect_images(images, Predictor(model, engine="tensorflow", precision="float32"), cfg).values())

    assert abs(count(tmp_path / "student.keras") - count(shipped_model)) <= 2  # the cohort's density as the teacher had it


def test_mining_reads_only_the_tiles_it_draws_from_a_large_slide(slides: Path, predictor) -> None:
    from wsiproc.config import RunConfig
    from wsiproc.detection.tiles import plan_tiles
    from wsiproc.detection.tiling import SlideSampler
    from wsiproc.io.slide import open_slide
    from wsiproc.learn.adapt import AdaptConfig, mine_slide

    path = slides / "CMU-1-Small-Region.svs"
    run_cfg = RunConfig(tile_px=512)
    with open_slide(path, None) as slide:
        grid, planned, _, _ = plan_tiles(SlideSampler.for_slide(slide, run_cfg.model_mpp), run_cfg, predictor.geometry)
    assert len(planned) > 6  # the sample's tissue spans more tiles than are drawn
    mined = mine_slide(path, run_cfg, predictor, AdaptConfig(recipe="consistency", mine_tiles=2), cap=400, seed=3)
    rows_cols = {(int(y) // grid.tile_px, int(x) // grid.tile_px) for x, y in mined.positions}
    assert 0 < len(mined.images) and len(rows_cols) <= 2  # every block from the two drawn tiles
    assert not any("implausible" in w for w in mined.warnings)  # the density is judged on the tissue read


def test_a_half_written_slide_in_the_store_is_dropped_on_resume(tmp_path: Path) -> None:
    from wsiproc.learn.adapt.store import BlockStore, MinedSlide

    store = BlockStore(tmp_path / "blocks.zarr", 64)
    mined = MinedSlide(np.zeros((5, 64, 64, 3), np.uint8), np.zeros((5, 64, 64), np.uint8), np.zeros((5, 2)), np.ones(5, bool), 7, 0.1)
    store.add({"path": "a", "sha256": "aa"}, mined)
    store.group["images"].append(np.zeros((3, 64, 64, 3), np.uint8), axis=0)  # killed before the commit
    reopened = BlockStore(tmp_path / "blocks.zarr", 64)
    assert len(reopened) == 5 and reopened.group["images"].shape[0] == 5
    assert reopened.finished("aa")["blocks"] == 5 and reopened.finished("bb") is None


def test_adapt_refuses_a_cohort_without_confident_nuclei(tmp_path: Path, shipped_model) -> None:
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), (250, 250, 250)).save(blank)
    result = _adapt([blank], tmp_path / "a.keras", tmp_path / "work", "--no-tissue-mask", "--recipe", "consistency")
    assert result.exit_code == 1
    assert "cohort calibration skipped: 0 tissue pixels in the sampled tiles" in result.output
    assert "no confident nuclei were found in any slide of the cohort" in result.output
    assert "no confident nuclei (none above the high threshold)" in result.output
    assert not (tmp_path / "a.keras").exists()


def test_calibrate_only_refuses_a_cohort_without_tissue(tmp_path: Path, shipped_model) -> None:
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), (250, 250, 250)).save(blank)
    result = _adapt([blank], tmp_path / "a.keras", tmp_path / "work", "--no-tissue-mask", "--recipe", "calibrate")
    assert result.exit_code == 1
    assert "nothing to adapt: calibration needs the base model's reference statistics" in result.output
    assert not (tmp_path / "a.keras").exists()
    fine_tuned = _adapt([blank], tmp_path / "a.keras", tmp_path / "work2", "--no-tissue-mask")  # default: consistency
    assert fine_tuned.exit_code == 1
    assert "no confident nuclei were found in any slide of the cohort" in fine_tuned.output
    assert not (tmp_path / "a.keras").exists()


def test_the_teacher_count_is_kept_only_for_a_cohort_judged_familiar() -> None:
    """A foreign cohort's teacher is what adaptation corrects: its count is no target there (adapt.drift)."""
    from wsiproc.learn.adapt import AdaptConfig
    from wsiproc.learn.calibrate import Calibration

    def judged(threshold: float, slide_colours: dict | None = None) -> Calibration:
        eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        return Calibration(eye, [0.0, 0.0, 0.0], [0.7, 0.5, 0.7], 100000, threshold, 0.8, (0.7, 0.9), 8, 1000, slide_colours or {})

    cfg = AdaptConfig(recipe="consistency").validate()
    assert cfg.matches_density(judged(0.5))  # familiar: the student may not find more than its teacher
    assert not cfg.matches_density(judged(0.41))  # foreign: the student keeps its own count
    assert not cfg.matches_density(judged(0.5, {"a.svs": {"domain": "crc"}}))  # foreign, its aligned slides back in range
    assert cfg.matches_density(None)  # no reference statistics: the count bounds over-detection
    assert AdaptConfig(recipe="consistency", match_density="always").matches_density(judged(0.41))
    assert not AdaptConfig(recipe="consistency", match_density="never").matches_density(judged(0.5))
    assert not AdaptConfig(recipe="paper").matches_density(judged(0.5))
    with pytest.raises(ValueError, match="match_density must be one of familiar, always, never"):
        AdaptConfig(match_density="sometimes").validate()
