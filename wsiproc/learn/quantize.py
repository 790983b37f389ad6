"""A `.keras` model → an OpenVINO int8 model (NNCF post-training quantisation), and the checks that keep it honest.

Why int8 through OpenVINO: on CPUs with VNNI or AMX, int8 convolutions run several times faster than float32
(`benchmarks/throughput.py` measures it on the machine at hand), and NNCF's post-training quantisation needs no
retraining: weights are quantised per output channel, activation ranges are calibrated on real H&E crops at
0.5 µm/px from the training domains, and a fast bias correction pass removes most of the rounding's offset.
The float model it starts from is the converted one the OpenVINO engine runs (sub-pixel head, uint8 input), so
int8 and float32 see the same graph.

`wsiproc quantize X.keras … --out X.int8.xml` writes ``X.int8.xml`` / ``X.int8.bin`` and a sidecar
``X.int8.xml.json``: the source model's name and sha256, the pair's own sha256s, the calibration, and (with
``--validate``) the F1 of float32 and int8 on every held-out domain. The sidecar is what makes the file safe to
pick up: an int8 file whose source `.keras` has since changed, or that is not the file its sidecar describes, is
refused by `check_sidecar` instead of silently running old weights; and `--precision auto` picks int8 only when
the sidecar records an F1 loss <= `engines.F1_TOLERANCE` on every held-out domain (`validation_passed`).
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Sequence

import numpy as np

from ..detection.model import MODEL_MPP, SIZE_MULTIPLE_PX
from ..io.files import file_sha256

#: Side of a calibration crop at 0.5 µm/px: the network is fully convolutional, so small crops calibrate the
#: same per-tensor ranges as whole tiles at a fraction of the cost. 128 is a multiple of every architecture's
#: size multiple (4 or 8) and twice the largest receptive radius.
CALIBRATION_CROP_PX = 128
#: Crops used when the caller does not say: enough to see stroma, nuclei, fat and glass in every domain.
CALIBRATION_CROPS = 64
#: Training images read per domain for calibration (evenly spread over its training split).
IMAGES_PER_DOMAIN = 8


def sidecar_path(model_path: str | Path) -> Path:
    """Where the provenance of an int8 model is written: `<name>.json` beside it (`X.int8.xml.json`)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def _quotas(n_crops: int, n_images: int) -> list[int]:
    """Crops per image, as even as possible, so one large image cannot dominate the calibrated ranges."""
    return [n_crops // n_images + (i < n_crops % n_images) for i in range(n_images)]


def _random_crops(rgb: np.ndarray, mpp: float, k: int, crop_px: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`k` random `crop_px` crops of one image after resampling it to the model's 0.5 µm/px (none if too small)."""
    from ..io.resample import rescale_rgb

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
    from ..io.slide import open_slide

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
    from . import datasets

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
    import nncf
    import openvino as ov

    from ..detection.architectures import geometry
    from ..detection.engines import ModelCache, convert_keras, model_geometry
    from ..detection.model import load_model

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
    import nncf
    import openvino as ov

    from ..detection.engines import ir_sha256
    from ..io.files import atomic_path

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
    with atomic_path(sidecar_path(out_path)) as part:
        part.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out_path


def quantize_model(model_path: str | Path, crops: list[np.ndarray], out_path: str | Path,
                   calibration: dict | None = None, cache_dir: str | Path | None = None) -> Path:
    """`model_path` (.keras) → int8 `out_path` (.xml + .bin) with its sidecar; returns `out_path`."""
    model, geometry = quantize_openvino(model_path, crops, cache_dir)
    info = {"precision": "int8", "geometry": geometry, "calibration": {"crops": len(crops), "crop_px": [int(s) for s in crops[0].shape[:2]],
                                                  "mpp": MODEL_MPP, **(calibration or {})}}
    return write_ir(model, out_path, model_path, info)


def _read_sidecar(path: Path) -> dict | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{side}: unreadable sidecar of {path.name} ({exc.__class__.__name__})") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{side}: unreadable sidecar of {path.name} (not a JSON object)")
    return record


def _source_of(path: Path, record: dict) -> Path | None:
    """The source `.keras` named in the sidecar: beside the model first (files moved together), else where it was."""
    beside = path.with_name(str(record.get("source_model", "")))
    if record.get("source_model") and beside.is_file():
        return beside
    recorded = Path(str(record.get("source_path", "")))
    return recorded if record.get("source_path") and recorded.is_file() else None


def check_sidecar(path: str | Path, source: str | Path | None = None, source_sha256: str | None = None) -> dict | None:
    """Refuse a stale int8 model: one that is not the pair its sidecar describes, or whose source `.keras` changed.

    `source`: the `.keras` the model must have been made from (the Predictor looking beside a model); then a
    missing sidecar is refused too, since nothing says which model the file belongs to. Without `source`
    (an IR given as the model), no sidecar means nothing to check (None), and the source named in the sidecar
    is checked where it can be found (beside the IR, or where it was converted from).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    record = _read_sidecar(path)
    if record is None:
        if source is not None:
            raise ValueError(f"{path}: no sidecar {sidecar_path(path).name}, so nothing says it was made from "
                             f"{Path(source).name}; rerun wsiproc quantize")
        return None
    bin_path = path.with_suffix(".bin")
    if (record.get("xml_sha256") != file_sha256(path) or not bin_path.is_file()
            or record.get("bin_sha256") != file_sha256(bin_path)):
        raise ValueError(f"{path}: does not match its sidecar {sidecar_path(path).name} (file replaced or "
                         "half-written); rerun wsiproc quantize")
    source = Path(source) if source is not None else _source_of(path, record)
    if source is not None:
        actual = source_sha256 or file_sha256(source)
        if actual != record.get("source_sha256"):
            raise ValueError(f"{path}: stale, made from an earlier version of {source} "
                             f"(sha256 {str(record.get('source_sha256'))[:12]}…); rerun wsiproc quantize {source}")
    return record


def stored_precision(path: str | Path) -> str:
    """'int8' or 'float32': what an IR file holds (its sidecar says; else the graph's FakeQuantize nodes do)."""
    path = Path(path)
    record = _read_sidecar(path)
    if record and record.get("precision") in ("int8", "float32"):
        return str(record["precision"])
    try:
        return "int8" if b"FakeQuantize" in path.read_bytes() else "float32"
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def validation_passed(record: dict | None) -> tuple[bool, str]:
    """Whether the sidecar's F1 check lets `--precision auto` pick the int8 model, and why (one line)."""
    from ..detection.engines import F1_TOLERANCE

    validation = (record or {}).get("validation")
    if not validation or not validation.get("domains"):
        return False, "not validated (wsiproc quantize --validate DATA scores it on the held-out domains)"
    from .datasets import DOMAINS

    missing = [name for name in DOMAINS if name not in validation["domains"]]
    if missing:
        return False, f"not validated on every held-out domain (missing: {', '.join(missing)})"
    losses = {name: d["f1_loss"] for name, d in validation["domains"].items()}
    worst = max(losses, key=losses.get)
    text = ", ".join(f"{name} {loss:+.4f}" for name, loss in losses.items())
    if losses[worst] > F1_TOLERANCE:
        return False, f"F1 loss {losses[worst]:.4f} on {worst} > {F1_TOLERANCE} (losses: {text})"
    return True, f"F1 loss <= {F1_TOLERANCE} on every held-out domain ({text})"


def domain_f1(predictor, images) -> tuple[float, float, float]:
    """(precision, recall, F1) of `predictor` on annotated images: 5 µm one-to-one matching, micro-averaged
    (the project's scoring, as benchmarks/accuracy.py computes it), through the same `detect` as a run."""
    from ..config import RunConfig
    from ..evaluate.scoring import detect_images, evaluate_sets

    pred = detect_images(images, predictor, RunConfig(tissue_mask=False))  # annotated crops are tissue throughout
    _, total = evaluate_sets(pred, {im.name: im.points_xy for im in images}, {im.name: 5.0 / im.mpp for im in images})
    return total.precision, total.recall, total.f1


def validate(source: str | Path, int8_path: str | Path, data_root: str | Path, domains: Sequence[str] | None = None,
             echo=None) -> dict:
    """F1 of OpenVINO float32 and of the int8 model on every domain's held-out split, and the loss between them.

    float32 runs on OpenVINO too (it agrees with TensorFlow to ~1e-6), so the loss is the quantisation's alone.
    """
    from . import datasets
    from ..detection.engines import F1_TOLERANCE
    from ..detection.inference import Predictor

    f32 = Predictor(source, precision="float32", engine="openvino")
    int8 = Predictor(int8_path, engine="openvino")
    out: dict = {"data": str(Path(data_root).resolve()), "tolerance": F1_TOLERANCE, "domains": {}}
    for name in domains or datasets.DOMAINS:
        images = datasets.domain(name, data_root, "held_out")
        if not images:
            raise ValueError(f"{Path(data_root) / datasets.DOMAINS[name][0]}: no held-out images of domain {name}")
        f1_ref, f1_q = domain_f1(f32, images)[2], domain_f1(int8, images)[2]
        out["domains"][name] = {"images": len(images), "f1_float32": round(f1_ref, 5), "f1_int8": round(f1_q, 5),
                                "f1_loss": round(f1_ref - f1_q, 5)}
        if echo:
            echo(f"{name}: F1 float32 {f1_ref:.4f}, int8 {f1_q:.4f} ({len(images)} held-out images)")
    out["passed"] = validation_passed({"validation": out})[0]
    return out


def record_validation(int8_path: str | Path, validation: dict) -> dict:
    """Add `validation` to the sidecar (rewritten atomically; the model pair itself is not touched)."""
    from ..io.files import atomic_path

    int8_path = Path(int8_path)
    record = check_sidecar(int8_path)
    if record is None:
        raise ValueError(f"{int8_path}: no sidecar to record the validation in; rerun wsiproc quantize")
    record["validation"] = validation
    with atomic_path(sidecar_path(int8_path)) as part:
        part.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
