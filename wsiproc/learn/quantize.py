"""A `.keras` model → an OpenVINO int8 model (NNCF post-training quantisation), and the checks that keep it honest.

Why int8 through OpenVINO: on CPUs with VNNI or AMX, int8 convolutions run several times faster than float32
(`benchmarks/throughput.py` measures it on the machine at hand), and NNCF's post-training quantisation needs no
retraining: weights are quantised per output channel, activation ranges are calibrated on real H&E crops at
0.5 µm/px from the training domains, and a fast bias correction pass removes most of the rounding's offset.
The float model it starts from is the converted one the OpenVINO engine runs (sub-pixel head, uint8 input), so
int8 and float32 see the same graph.

`wsiproc quantize X.keras … --out X.int8.xml` writes ``X.int8.xml`` / ``X.int8.bin`` and a sidecar
``X.int8.xml.json``: the source model's name and sha256, the pair's own sha256s, the calibration, and (with
``--validate``) the F1 of float32 and int8 on the held-out images of every domain it was validated on: the
four training domains under a data root, or a lab's own (a domains YAML, as `wsiproc train` reads). The
sidecar is what makes the file safe to pick up (`detection.model_files`): an int8 file whose source `.keras`
has since changed, or that is not the file its sidecar describes, is refused (`check_ir`); and `--precision
auto` picks int8 only when the sidecar records an F1 loss within its recorded tolerance on every domain it was
validated on (`int8_accepted`).
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Sequence

import numpy as np

from . import datasets
from .annotated import load_domains
from .check import held_out_score
from ..config import RunConfig
from ..detection.architectures import geometry
from ..detection.engines import ModelCache, convert_keras, model_geometry
from ..detection.images import detect_images
from ..detection.inference import Predictor
from ..detection.model import MODEL_MPP, SIZE_MULTIPLE_PX, load_model
from ..detection.model_files import F1_TOLERANCE, check_ir, int8_accepted, ir_sha256, record_path
from ..evaluate.scoring import evaluate_sets
from ..io.files import atomic_path, file_sha256
from ..io.resample import rescale_rgb
from ..io.slide import open_slide

#: Side of a calibration crop at 0.5 µm/px: the network is fully convolutional, so small crops calibrate the
#: same per-tensor ranges as whole tiles at a fraction of the cost. 128 is a multiple of every architecture's
#: size multiple (4 or 8) and twice the largest receptive radius.
CALIBRATION_CROP_PX = 128
#: Crops used when the caller does not say: enough to see stroma, nuclei, fat and glass in every domain.
CALIBRATION_CROPS = 64
#: Training images read per domain for calibration (evenly spread over its training split).
IMAGES_PER_DOMAIN = 8


def _quotas(n_crops: int, n_images: int) -> list[int]:
    """Crops per image, as even as possible, so one large image cannot dominate the calibrated ranges."""
    return [n_crops // n_images + (i < n_crops % n_images) for i in range(n_images)]


def _random_crops(rgb: np.ndarray, mpp: float, k: int, crop_px: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`k` random `crop_px` crops of one image after resampling it to the model's 0.5 µm/px (none if too small)."""
    im = rescale_rgb(np.asarray(rgb)[..., :3], mpp, MODEL_MPP)
    if min(im.shape[:2]) < crop_px:
        return []
    ys = rng.integers(0, im.shape[0] - crop_px + 1, k)
    xs = rng.integers(0, im.shape[1] - crop_px + 1, k)
    return [np.ascontiguousarray(im[y : y + crop_px, x : x + crop_px]) for y, x in zip(ys, xs)]


def _check_crop_px(crop_px: int, multiple: int = SIZE_MULTIPLE_PX) -> None:
    if crop_px <= 0 or crop_px % multiple:
        raise ValueError(f"crop_px must be a positive multiple of {multiple} (got {crop_px})")


def calibration_crops(images: Sequence[tuple[np.ndarray, float]], n_crops: int = CALIBRATION_CROPS,
                      crop_px: int = CALIBRATION_CROP_PX, seed: int = 0) -> list[np.ndarray]:
    """Up to `n_crops` uint8 crops of `crop_px` at 0.5 µm/px, cut at random from (RGB image, its µm/px) pairs."""
    _check_crop_px(crop_px)
    rng = np.random.default_rng(seed)
    crops = []
    for (rgb, mpp), k in zip(images, _quotas(n_crops, len(images))):
        crops += _random_crops(rgb, mpp, k, crop_px, rng) if k else []
    if not crops:
        raise ValueError(f"no calibration image is at least {crop_px} px wide at {MODEL_MPP} µm/px")
    return crops


def crops_from_files(paths: Sequence[str | Path], mpp: float, n_crops: int = CALIBRATION_CROPS,
                     crop_px: int = CALIBRATION_CROP_PX, seed: int = 0) -> list[np.ndarray]:
    """Calibration crops from image files of pixel size `mpp`, read one at a time (memory stays at one image)."""
    _check_crop_px(crop_px)
    rng = np.random.default_rng(seed)
    crops = []
    for path, k in zip(paths, _quotas(n_crops, len(paths))):
        if not k:
            continue
        slide = open_slide(path, mpp)
        try:
            w, h = slide.dimensions
            crops += _random_crops(slide.read_level(0, 0, 0, w, h), mpp, k, crop_px, rng)
        finally:
            slide.close()
    if not crops:
        raise ValueError(f"no calibration image is at least {crop_px} px wide at {MODEL_MPP} µm/px")
    return crops


def domain_crops(data_root: str | Path, n_crops: int = CALIBRATION_CROPS, crop_px: int = CALIBRATION_CROP_PX,
                 seed: int = 0, images_per_domain: int = IMAGES_PER_DOMAIN, domains: Sequence[str] | None = None) -> list[np.ndarray]:
    """Calibration crops from the *training* split of every domain (`datasets.DOMAINS`), the same number from each.

    The held-out images are never used, so the F1 that `validate` measures on them stays honest.
    """
    _check_crop_px(crop_px)
    names = list(domains or datasets.DOMAINS)
    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    for name, quota in zip(names, _quotas(n_crops, len(names))):
        images = datasets.domain(name, data_root, "train")
        if not images:
            raise ValueError(f"{Path(data_root) / datasets.DOMAINS[name][0]}: no training images of domain {name}")
        picks = [images[int(i)] for i in np.linspace(0, len(images) - 1, min(images_per_domain, len(images), quota))]
        for im, k in zip(picks, _quotas(quota, len(picks))):
            crops += _random_crops(im.read_rgb(), im.mpp, k, crop_px, rng)
    if not crops:
        raise ValueError(f"{data_root}: no calibration image is at least {crop_px} px wide at {MODEL_MPP} µm/px")
    return crops


def quantize_openvino(model_path: str | Path, crops: list[np.ndarray], cache_dir: str | Path | None = None):
    """(int8 OpenVINO model of `model_path` (.keras), its geometry); activations calibrated on `crops` (uint8, 0.5 µm/px)."""
    import nncf  # lazy: seconds to import, and only quantising needs it
    import openvino as ov  # lazy: as nncf


    model_path = Path(model_path)
    if not crops:
        raise ValueError(f"{model_path}: no calibration crops given")
    keras_model = load_model(model_path)
    multiple = geometry(keras_model).size_multiple_px
    bad = [c.shape[:2] for c in crops if c.shape[0] % multiple or c.shape[1] % multiple]
    if bad:
        raise ValueError(f"{model_path}: calibration crops must have sides that are multiples of {multiple} (got {bad[0]})")
    model, _, _ = ModelCache(cache_dir).ir(model_path, file_sha256(model_path), lambda: convert_keras(model_path))
    if isinstance(model, Path):
        model = ov.Core().read_model(model)
    dataset = nncf.Dataset([np.ascontiguousarray(c[None], dtype=np.uint8) for c in crops])
    quantized = nncf.quantize(model, dataset, subset_size=len(crops), target_device=nncf.TargetDevice.CPU)
    return quantized, model_geometry(keras_model)


def write_ir(model, out_path: str | Path, source_model: str | Path, info: dict | None = None) -> Path:
    """Write `model` as `out_path` (.xml) + .bin and its sidecar, all atomically; returns `out_path`.

    The pair is saved under temporary names in the same folder and renamed, .bin first; the sidecar is
    written last, so an .xml without a matching sidecar means an interrupted write (and is refused).
    """
    import nncf  # lazy: seconds to import, and only quantising needs it
    import openvino as ov  # lazy: as nncf


    out_path, source_model = Path(out_path), Path(source_model)
    if out_path.suffix.lower() != ".xml":
        raise ValueError(f"{out_path}: an OpenVINO model is written as .xml (+ .bin)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.{secrets.token_hex(6)}.partial.xml")
    try:
        ov.save_model(model, tmp, compress_to_fp16=False)
        for part in (tmp.with_suffix(".bin"), tmp):
            with open(part, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp.with_suffix(".bin"), out_path.with_suffix(".bin"))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    record = {"source_model": source_model.name, "source_path": str(source_model.resolve()),
              "source_sha256": file_sha256(source_model), "xml_sha256": file_sha256(out_path),
              "bin_sha256": file_sha256(out_path.with_suffix(".bin")), "ir_sha256": ir_sha256(out_path),
              "openvino_version": ov.get_version(), "nncf_version": nncf.__version__, **(info or {})}
    with atomic_path(record_path(out_path)) as part:
        part.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out_path


def quantize_model(model_path: str | Path, crops: list[np.ndarray], out_path: str | Path,
                   calibration: dict | None = None, cache_dir: str | Path | None = None) -> Path:
    """`model_path` (.keras) → int8 `out_path` (.xml + .bin) with its sidecar; returns `out_path`."""
    model, geometry = quantize_openvino(model_path, crops, cache_dir)
    info = {"precision": "int8", "geometry": geometry, "calibration": {"crops": len(crops), "crop_px": [int(s) for s in crops[0].shape[:2]],
                                                  "mpp": MODEL_MPP, **(calibration or {})}}
    return write_ir(model, out_path, model_path, info)


def domain_f1(predictor, images) -> tuple[float, float, float]:
    """(precision, recall, F1) of `predictor` on annotated images: 5 µm one-to-one matching, micro-averaged
    (the project's scoring, as benchmarks/accuracy.py computes it), through the same `detect` as a run."""
    pred = detect_images(images, predictor, RunConfig(tissue_mask=False))  # annotated crops are tissue throughout
    _, total = evaluate_sets(pred, {im.name: im.points_xy for im in images}, {im.name: 5.0 / im.mpp for im in images})
    return total.precision, total.recall, total.f1


def held_out_sets(data: str | Path, domains: Sequence[str] | None = None) -> dict[str, list]:
    """The held-out images to validate on, by domain: under a data root, those of the built-in domains (their
    fixed splits); from a domains YAML (`wsiproc train --domains`), each domain's held-out part (a lab's own)."""
    data = Path(data)
    if data.is_file():
        sets = {d.name: list(d.held_out) for d in load_domains(data)}
        if domains:
            sets = {name: sets[name] for name in domains}
    else:
        sets = {name: datasets.domain(name, data, "held_out") for name in domains or datasets.DOMAINS}
    for name, images in sets.items():
        if not images:
            where = data if data.is_file() else data / datasets.DOMAINS[name][0]
            raise ValueError(f"{where}: no held-out images of domain {name}")
    return sets


def validate(source: str | Path, int8_path: str | Path, data: str | Path, domains: Sequence[str] | None = None,
             echo=None, tolerance: float = F1_TOLERANCE) -> dict:
    """F1 of OpenVINO float32 and of the int8 model on every domain's held-out images (`held_out_sets`), the
    loss between them, and whether every loss is within `tolerance` (what `int8_accepted` judges later).

    float32 runs on OpenVINO too (it agrees with TensorFlow to ~1e-6), so the loss is the quantisation's alone.
    A domains YAML's images are scored as `wsiproc train`'s check scores them (inside annotated regions).
    """
    f32 = Predictor(source, precision="float32", engine="openvino")
    int8 = Predictor(int8_path, engine="openvino")
    lab = Path(data).is_file()
    out: dict = {"data": str(Path(data).resolve()), "tolerance": tolerance, "domains": {}}
    for name, images in held_out_sets(data, domains).items():
        if lab:
            f1_ref, f1_q = held_out_score(images, f32).f1, held_out_score(images, int8).f1
        else:
            f1_ref, f1_q = domain_f1(f32, images)[2], domain_f1(int8, images)[2]
        out["domains"][name] = {"images": len(images), "f1_float32": round(f1_ref, 5), "f1_int8": round(f1_q, 5),
                                "f1_loss": round(f1_ref - f1_q, 5)}
        if echo:
            echo(f"{name}: F1 float32 {f1_ref:.4f}, int8 {f1_q:.4f} ({len(images)} held-out images)")
    out["passed"] = int8_accepted({"validation": out})[0]
    return out


def record_validation(int8_path: str | Path, validation: dict) -> dict:
    """Add `validation` to the sidecar (rewritten atomically; the model pair itself is not touched)."""
    int8_path = Path(int8_path)
    record = check_ir(int8_path)
    if record is None:
        raise ValueError(f"{int8_path}: no sidecar to record the validation in; rerun wsiproc quantize")
    record["validation"] = validation
    with atomic_path(record_path(int8_path)) as part:
        part.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
