"""Result files of one slide: detections as CSV and QuPath GeoJSON, a nucleus density map, and (last) the run
record of `wsiproc.outputs.record`.

Where the detections carry nucleus types (`Detections.class_probs`, see `wsiproc.detection.classes`), the CSV
gains a class and a probability per class, each GeoJSON detection is classified by its type, and one density
map per class is written beside the total; without them every file is exactly what it was before classes.

Every file is written through `wsiproc.io.files.atomic_path`, so a run that is killed half way never leaves a file under
its final name that looks finished; `write_outputs` writes the run record last, so its presence marks a
complete result.

Slides hold up to millions of nuclei, so the tabular writers stream in chunks instead of building one
giant string or dict.
"""
from __future__ import annotations

import gzip as gzip_module
import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import geojson
import numpy as np
import tifffile
from PIL import Image

from ..detection.classes import CLASSES, QUPATH_CLASSES
from ..detection.detections import Detections
from ..io.files import atomic_path
from .record import class_figures, write_run_record
from .qc import write_qc_png

if TYPE_CHECKING:
    from .qc import QcSlide

__all__ = [
    "write_csv",
    "write_geojson",
    "density_map",
    "class_density_maps",
    "write_density_tiff",
    "write_density_png",
    "write_outputs",
    "RESULT_SUFFIXES",
]

CSV_HEADER = "x,y,x_um,y_um,confidence,area_um2"
#: Probability columns (CSV) and measurements (GeoJSON) of the nucleus types, in `CLASSES` order.
CLASS_PROB_NAMES = tuple(f"p_{name}" for name in CLASSES)
#: What the CSV header gains with classes: the most probable class, then each class' probability.
CSV_CLASS_HEADER = ",".join(("class", *CLASS_PROB_NAMES))
NUCLEUS_CLASS = "Nucleus"
NUCLEUS_COLOR_RGB = (200, 0, 120)
"""QuPath draws (and lists) detections in their classification's colour; a magenta that stands out on H&E."""

_DECIMALS = {"x": 2, "y": 2, "um": 3, "confidence": 4, "area": 2}
"""Decimals shared by CSV and GeoJSON, so both files carry identical values (0.01 px is far below a
centroid's accuracy, and fixed formatting is ~2x faster than shortest-repr floats)."""
#: QuPath's pixel (0, 0) spans [0, 1); our pixel-index convention puts its centre at 0.
QUPATH_PIXEL_OFFSET = 0.5

_CHUNK = 50_000  # rows per formatting step: bounds memory whatever the slide's nucleus count


# ------------------------------------------------------------------------------------------- tables


def _sorted_order(det: Detections) -> np.ndarray:
    """Row-major order (y, then x): files do not depend on the order in which tiles finished."""
    return np.lexsort((np.asarray(det.x_px), np.asarray(det.y_px)))


def _columns(det: Detections) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x, y, confidence, area as float64 in (y, x) order; refuses NaN/inf, which JSON cannot represent."""
    order = _sorted_order(det)
    names = ("x_px", "y_px", "confidence", "area_um2")
    cols = tuple(np.asarray(getattr(det, name), dtype=np.float64)[order] for name in names)
    for name, values in zip(names, cols):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"Detections.{name} has non-finite values")
    return cols  # type: ignore[return-value]


def _class_columns(det: Detections) -> tuple[np.ndarray, np.ndarray] | None:
    """Class index (into `CLASSES`, the most probable) and (N, K) float64 probabilities in the order of
    `_columns`; None without classes."""
    if det.class_probs is None:
        return None
    probs = np.asarray(det.class_probs, dtype=np.float64)[_sorted_order(det)]
    if not np.all(np.isfinite(probs)):
        raise ValueError("Detections.class_probs has non-finite values")
    winners = np.argmax(probs, axis=1) if len(probs) else np.zeros(0, np.int64)
    return winners, probs


def write_csv(path: str | os.PathLike[str], det: Detections, mpp: float) -> Path:
    """CSV with pixel-index and micrometre coordinates; fixed decimals keep files diffable across runs.

    With classes the columns `class` (the most probable of `CLASSES`) and `p_<class>` (its probabilities, with
    the confidence's decimals) follow the others.

    Rows are %-formatted from Python floats per chunk: np.savetxt formats numpy scalars one by one and
    is about twice as slow on a million rows.
    """
    x, y, conf, area = _columns(det)
    classes = _class_columns(det)
    row = ",".join(f"%.{_DECIMALS[k]}f" for k in ("x", "y", "um", "um", "confidence", "area"))
    header = CSV_HEADER
    if classes is not None:
        row += ",%s" + f",%.{_DECIMALS['confidence']}f" * len(CLASSES)
        header += "," + CSV_CLASS_HEADER
        names = np.asarray(CLASSES, dtype=object)
    row += "\n"
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(header + "\n")
        for start in range(0, len(x), _CHUNK):
            part = slice(start, start + _CHUNK)
            xs, ys = x[part], y[part]
            columns = [xs, ys, xs * mpp, ys * mpp, conf[part], area[part]]
            if classes is not None:
                winners, probs = classes[0][part], classes[1][part]
                columns += [names[winners], *probs.T]
            fh.write("".join([row % values for values in zip(*(c.tolist() for c in columns))]))
    return Path(path)


def _classification(name: str, rgb: tuple[int, int, int]) -> dict:
    """A QuPath classification as `GsonTools.PathClassTypeAdapter` reads it: a name and an [r, g, b] colour."""
    return {"name": name, "color": [int(c) for c in rgb]}


def _feature_template(with_classes: bool = False) -> str:
    """A %-format template for one QuPath detection, derived from a `geojson.Feature` prototype.

    `geojson.dumps` costs ~80 µs per feature (about 80 s per million nuclei), so features are formatted
    from this template instead (~1 µs each). Deriving it from the library's own serialisation keeps the
    structure defined in one place; `write_geojson`'s tests parse the result with `geojson.loads`.

    `with_classes`: the classification is a `%s` slot (filled with one of `_classification_texts()`) and the
    measurements gain `p_<class>` after confidence and area; without, it is the template of before classes.
    """
    marks = {"id": "@@ID@@", "x": 1.125, "y": 2.125, "c": 3.125, "a": 4.125}
    prob_marks = {name: 5.125 + i for i, name in enumerate(CLASS_PROB_NAMES)} if with_classes else {}
    classification = _classification(NUCLEUS_CLASS, NUCLEUS_COLOR_RGB)
    proto = geojson.Feature(
        id=marks["id"],
        geometry=geojson.Point((marks["x"], marks["y"])),
        properties={
            "objectType": "detection",
            "classification": classification,
            "measurements": {"confidence": marks["c"], "area µm^2": marks["a"], **prob_marks},
        },
    )
    text = geojson.dumps(proto, ensure_ascii=False, separators=(",", ":")).replace("%", "%%")
    replacements = [
        (f'"{marks["id"]}"', '"%s"'),
        (f"[{marks['x']!r},{marks['y']!r}]", f"[%.{_DECIMALS['x']}f,%.{_DECIMALS['y']}f]"),
        (f'"confidence":{marks["c"]!r}', f'"confidence":%.{_DECIMALS["confidence"]}f'),
        (f'"area µm^2":{marks["a"]!r}', f'"area µm^2":%.{_DECIMALS["area"]}f'),
    ]
    if with_classes:
        replacements.append((f'"classification":{_compact_json(classification)}', '"classification":%s'))
        replacements += [(f'"{name}":{mark!r}', f'"{name}":%.{_DECIMALS["confidence"]}f') for name, mark in prob_marks.items()]
    for old, new in replacements:
        if text.count(old) != 1:
            raise RuntimeError(f"unexpected geojson serialisation, cannot find {old!r} in {text}")
        text = text.replace(old, new)
    return text


def _compact_json(value) -> str:
    return geojson.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _classification_texts() -> list[str]:
    """The serialised QuPath classification of each class, in `CLASSES` order (`QUPATH_CLASSES`)."""
    return [_compact_json(_classification(*QUPATH_CLASSES[name])) for name in CLASSES]


def _uuid4_strings(n: int, rng: np.random.Generator | None) -> list[str]:
    """`n` version-4 UUID strings, made in bulk (uuid.uuid4() per feature would dominate the run time).

    With `rng` None the bytes come from os.urandom, as in uuid.uuid4().
    """
    raw = rng.bytes(16 * n) if rng is not None else os.urandom(16 * n)
    b = np.frombuffer(raw, dtype=np.uint8).reshape(n, 16).copy()
    b[:, 6] = (b[:, 6] & 0x0F) | 0x40  # version 4
    b[:, 8] = (b[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexdigits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    nibbles = np.empty((n, 32), dtype=np.uint8)
    nibbles[:, 0::2] = hexdigits[b >> 4]
    nibbles[:, 1::2] = hexdigits[b & 0x0F]
    text = np.full((n, 36), ord("-"), dtype=np.uint8)
    for src, dst in ((slice(0, 8), slice(0, 8)), (slice(8, 12), slice(9, 13)), (slice(12, 16), slice(14, 18)),
                     (slice(16, 20), slice(19, 23)), (slice(20, 32), slice(24, 36))):
        text[:, dst] = nibbles[:, src]
    return text.view("S36").ravel().astype("U36").tolist()


def write_geojson(
    path: str | os.PathLike[str],
    det: Detections,
    mpp: float,
    gzip: bool = False,
    id_seed: int | None = None,
) -> Path:
    """QuPath-importable FeatureCollection of point detections, streamed one feature per line.

    Coordinates are level-0 pixels in QuPath's convention, where pixel (0, 0) spans [0, 1): the
    pixel-index coordinates of `Detections` plus half a pixel, so points sit on the nucleus in QuPath.
    Without classes every detection is of class "Nucleus"; with them, of its most probable class's QuPath
    class (`QUPATH_CLASSES`: Epithelial, Immune cells, Stroma), and its measurements hold `p_<class>` too.
    `mpp` is not applied; it is accepted so every writer takes the same arguments. All numbers carry the
    CSV's fixed decimals. `id_seed` makes the feature ids reproducible; by default they are
    random, as QuPath expects ids to be unique across imports. `gzip=True` compresses (name the file
    `.geojson.gz`); the gzip header carries no name or time so equal inputs give equal bytes.
    """
    del mpp
    x, y, conf, area = _columns(det)
    classes = _class_columns(det)
    template = _feature_template(with_classes=classes is not None)
    if classes is not None:
        classification = np.asarray(_classification_texts(), dtype=object)
    rng = np.random.default_rng(id_seed) if id_seed is not None else None

    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        stream: io.BufferedIOBase = raw
        if gzip:
            stream = gzip_module.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=3, mtime=0)
        with stream, io.TextIOWrapper(stream, encoding="utf-8", newline="\n") as fh:
            fh.write('{"type":"FeatureCollection","features":[\n')
            for start in range(0, len(x), _CHUNK):
                part = slice(start, start + _CHUNK)
                ids = _uuid4_strings(len(x[part]), rng)
                columns = [ids, (x[part] + QUPATH_PIXEL_OFFSET).tolist(), (y[part] + QUPATH_PIXEL_OFFSET).tolist()]
                if classes is not None:
                    columns.append(classification[classes[0][part]].tolist())
                columns += [conf[part].tolist(), area[part].tolist()]
                if classes is not None:
                    columns += [p.tolist() for p in classes[1][part].T]
                rows = zip(*columns)
                if start:
                    fh.write(",\n")
                fh.write(",\n".join([template % row for row in rows]))
            fh.write("\n]}\n")
    return Path(path)


# -------------------------------------------------------------------------------------------- density


def density_map(
    det: Detections, level0_shape_hw: tuple[int, int], mpp: float, cell_um: float = 50.0
) -> np.ndarray:
    """Nuclei per `cell_um` × `cell_um` cell, shape (rows, cols), float32.

    The grid starts at the slide's top-left edge, i.e. half a pixel before the centre of pixel (0, 0),
    and has ceil(size_um / cell_um) cells per axis. The last cell may stick out past the slide; points
    outside the grid (at or beyond the far edge) clamp into the border cells so the sum is always the
    nucleus count.
    """
    h_px, w_px = level0_shape_hw
    rows = max(1, math.ceil(h_px * mpp / cell_um - 1e-9))
    cols = max(1, math.ceil(w_px * mpp / cell_um - 1e-9))
    y_um = np.clip((np.asarray(det.y_px, dtype=np.float64) + 0.5) * mpp, 0.0, rows * cell_um)
    x_um = np.clip((np.asarray(det.x_px, dtype=np.float64) + 0.5) * mpp, 0.0, cols * cell_um)
    counts, _, _ = np.histogram2d(
        y_um, x_um, bins=[np.arange(rows + 1) * cell_um, np.arange(cols + 1) * cell_um]
    )
    return counts.astype(np.float32)


def class_density_maps(
    det: Detections, level0_shape_hw: tuple[int, int], mpp: float, cell_um: float = 50.0
) -> dict[str, np.ndarray] | None:
    """`density_map` of each class' nuclei (by most probable class), on the total map's grid; None without
    classes. Every nucleus is in exactly one class, so the maps sum to `density_map(det, ...)`."""
    if det.class_probs is None:
        return None
    winners = np.argmax(det.class_probs, axis=1) if len(det) else np.zeros(0, np.int64)
    return {name: density_map(det.take(winners == i), level0_shape_hw, mpp, cell_um) for i, name in enumerate(CLASSES)}


def write_density_tiff(path: str | os.PathLike[str], density: np.ndarray, cell_um: float, mpp: float,
                       nucleus_class: str | None = None) -> Path:
    """Float32 TIFF whose pixel size is the grid cell, so GIS/image tools show it at the right scale.

    The cell size is recorded twice: as TIFF resolution (pixels per centimetre) for generic readers, and
    as JSON in ImageDescription together with the slide's level-0 pixel size for our own tools.
    `nucleus_class` names the class a per-class map counts (`"class"` in the description; absent for the total).

    Per-class maps are files of their own (`<stem>_density_<class>.tiff`), not pages or channels of the total
    map's TIFF: each one is then read exactly like the total (one float32 page with the same resolution tags,
    by `tifffile.imread`, Fiji/ImageJ, QuPath or a GIS tool, with nothing to know about page order or channel
    names, which plain TIFF cannot label and ImageJ would show as a z-stack), and `<stem>_density.tiff` stays
    the single page that scripts reading it already expect.
    """
    meta: dict = {"quantity": "nuclei per cell" if nucleus_class is None else f"{nucleus_class} nuclei per cell"}
    if nucleus_class is not None:
        meta["class"] = nucleus_class
    meta.update({"cell_um": float(cell_um), "level0_mpp": float(mpp), "shape_hw": list(density.shape)})
    description = json.dumps(meta)
    per_cm = 10_000.0 / cell_um
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            np.asarray(density, dtype=np.float32),
            description=description,
            metadata=None,
            resolution=(per_cm, per_cm),
            resolutionunit=tifffile.RESUNIT.CENTIMETER,
            photometric="minisblack",
        )
    return Path(path)


def write_density_png(path: str | os.PathLike[str], density: np.ndarray, max_side_px: int = 512) -> Path:
    """Small colour preview for reports; not for measurement (the TIFF holds the counts).

    Colours saturate at the 99th percentile so a few crowded cells do not wash out the rest. Small grids
    are enlarged by an integer nearest-neighbour factor so cells stay crisp squares; grids larger than
    `max_side_px` are box-averaged down.
    """
    from matplotlib import colormaps  # lazy: matplotlib is slow to import; no pyplot, so no GUI backend

    d = np.asarray(density, dtype=np.float32)
    h, w = d.shape
    vmax = float(np.percentile(d, 99)) if d.size else 0.0
    if vmax <= 0:
        vmax = float(d.max()) if d.size and d.max() > 0 else 1.0
    if max(h, w) <= max_side_px:
        k = max(1, max_side_px // max(h, w))
        d = np.repeat(np.repeat(d, k, axis=0), k, axis=1)
    else:
        scale = max_side_px / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        d = np.asarray(Image.fromarray(d).resize(size, Image.Resampling.BOX))
    rgba = colormaps["magma"](np.clip(d / vmax, 0.0, 1.0), bytes=True)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgba[..., :3])).save(tmp, format="PNG")
    return Path(path)


# ------------------------------------------------------------------------------------------- outputs


#: Every file `write_outputs` may write for a slide, after its `<stem>` (`.geojson.gz` instead of `.geojson`
#: with gzip, `_qc.png` with a QC picture): what a batch removes when a slide's set was left incomplete.
#: `_density_<class>.tiff` only with classes.
RESULT_SUFFIXES = (".csv", ".geojson", ".geojson.gz", "_density.tiff", "_density.png",
                   *(f"_density_{name}.tiff" for name in CLASSES), "_qc.png", ".json")


def write_outputs(
    out_dir: str | os.PathLike[str],
    stem: str,
    det: Detections,
    mpp: float,
    level0_shape_hw: tuple[int, int],
    record: dict,
    cell_um: float = 50.0,
    geojson_gz: bool = False,
    id_seed: int | None = None,
    qc: "QcSlide | None" = None,
) -> dict[str, Path]:
    """Write every result file of one slide; `<stem>.json` last, as the marker of a complete result.

    With `qc` (the slide's sampler and tissue mask) the QC picture `<stem>_qc.png` is drawn too. With classes
    (`det.class_probs`) a density map per class `<stem>_density_<class>.tiff` is written (keys
    `density_tiff_<class>`), and the record gains "classes" (`record.class_figures`).

    A record left by an earlier run is removed first: otherwise a rerun interrupted half way would leave
    the old marker next to a mix of old and new files. `record` is not modified; the written copy gains
    "outputs" (key → file name, relative to `out_dir`) and "nuclei".
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out / f"{stem}.csv",
        "geojson": out / (f"{stem}.geojson.gz" if geojson_gz else f"{stem}.geojson"),
        "density_tiff": out / f"{stem}_density.tiff",
        "density_png": out / f"{stem}_density.png",
        "record": out / f"{stem}.json",
    }
    per_class = class_density_maps(det, level0_shape_hw, mpp, cell_um)
    if per_class is not None:
        paths = {**{k: v for k, v in paths.items() if k != "record"},
                 **{f"density_tiff_{name}": out / f"{stem}_density_{name}.tiff" for name in CLASSES}, "record": paths["record"]}
    paths["record"].unlink(missing_ok=True)

    write_csv(paths["csv"], det, mpp)
    write_geojson(paths["geojson"], det, mpp, gzip=geojson_gz, id_seed=id_seed)
    density = density_map(det, level0_shape_hw, mpp, cell_um)
    write_density_tiff(paths["density_tiff"], density, cell_um, mpp)
    write_density_png(paths["density_png"], density)
    for name, class_density in (per_class or {}).items():
        write_density_tiff(paths[f"density_tiff_{name}"], class_density, cell_um, mpp, nucleus_class=name)
    if qc is not None:
        paths = {**{k: v for k, v in paths.items() if k != "record"}, "qc_png": out / f"{stem}_qc.png", "record": paths["record"]}

        write_qc_png(paths["qc_png"], qc.sampler, qc.mask, det, density, mpp, cell_um)

    full = dict(record)
    full["outputs"] = {key: p.name for key, p in paths.items()}
    full["nuclei"] = len(det)
    if det.class_probs is not None:
        full["classes"] = class_figures(det.class_counts(), full)
    write_run_record(paths["record"], full)
    return paths
