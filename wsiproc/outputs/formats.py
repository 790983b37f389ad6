"""Result files of one slide: detections as CSV and QuPath GeoJSON, a nucleus density map, and (last) the run
record of `wsiproc.outputs.record`.

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

from ..detection.detections import Detections
from ..io.files import atomic_path
from .record import write_run_record

if TYPE_CHECKING:
    from .qc import QcSlide

__all__ = [
    "write_csv",
    "write_geojson",
    "density_map",
    "write_density_tiff",
    "write_density_png",
    "write_outputs",
    "RESULT_SUFFIXES",
]

CSV_HEADER = "x,y,x_um,y_um,confidence,area_um2"
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


def write_csv(path: str | os.PathLike[str], det: Detections, mpp: float) -> Path:
    """CSV with pixel-index and micrometre coordinates; fixed decimals keep files diffable across runs.

    Rows are %-formatted from Python floats per chunk: np.savetxt formats numpy scalars one by one and
    is about twice as slow on a million rows.
    """
    x, y, conf, area = _columns(det)
    row = ",".join(f"%.{_DECIMALS[k]}f" for k in ("x", "y", "um", "um", "confidence", "area")) + "\n"
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(CSV_HEADER + "\n")
        for start in range(0, len(x), _CHUNK):
            part = slice(start, start + _CHUNK)
            xs, ys = x[part], y[part]
            columns = [xs, ys, xs * mpp, ys * mpp, conf[part], area[part]]
            fh.write("".join([row % values for values in zip(*(c.tolist() for c in columns))]))
    return Path(path)


def _feature_template() -> str:
    """A %-format template for one QuPath detection, derived from a `geojson.Feature` prototype.

    `geojson.dumps` costs ~80 µs per feature (about 80 s per million nuclei), so features are formatted
    from this template instead (~1 µs each). Deriving it from the library's own serialisation keeps the
    structure defined in one place; `write_geojson`'s tests parse the result with `geojson.loads`.
    """
    marks = {"id": "@@ID@@", "x": 1.125, "y": 2.125, "c": 3.125, "a": 4.125}
    proto = geojson.Feature(
        id=marks["id"],
        geometry=geojson.Point((marks["x"], marks["y"])),
        properties={
            "objectType": "detection",
            "classification": {"name": NUCLEUS_CLASS, "color": list(NUCLEUS_COLOR_RGB)},
            "measurements": {"confidence": marks["c"], "area µm^2": marks["a"]},
        },
    )
    text = geojson.dumps(proto, ensure_ascii=False, separators=(",", ":")).replace("%", "%%")
    for old, new in [
        (f'"{marks["id"]}"', '"%s"'),
        (f"[{marks['x']!r},{marks['y']!r}]", f"[%.{_DECIMALS['x']}f,%.{_DECIMALS['y']}f]"),
        (f'"confidence":{marks["c"]!r}', f'"confidence":%.{_DECIMALS["confidence"]}f'),
        (f'"area µm^2":{marks["a"]!r}', f'"area µm^2":%.{_DECIMALS["area"]}f'),
    ]:
        if text.count(old) != 1:
            raise RuntimeError(f"unexpected geojson serialisation, cannot find {old!r} in {text}")
        text = text.replace(old, new)
    return text


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
    `mpp` is not applied; it is accepted so every writer takes the same arguments. All numbers carry the
    CSV's fixed decimals. `id_seed` makes the feature ids reproducible; by default they are
    random, as QuPath expects ids to be unique across imports. `gzip=True` compresses (name the file
    `.geojson.gz`); the gzip header carries no name or time so equal inputs give equal bytes.
    """
    del mpp
    x, y, conf, area = _columns(det)
    template = _feature_template()
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
                rows = zip(ids, (x[part] + QUPATH_PIXEL_OFFSET).tolist(), (y[part] + QUPATH_PIXEL_OFFSET).tolist(),
                           conf[part].tolist(), area[part].tolist())
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


def write_density_tiff(path: str | os.PathLike[str], density: np.ndarray, cell_um: float, mpp: float) -> Path:
    """Float32 TIFF whose pixel size is the grid cell, so GIS/image tools show it at the right scale.

    The cell size is recorded twice: as TIFF resolution (pixels per centimetre) for generic readers, and
    as JSON in ImageDescription together with the slide's level-0 pixel size for our own tools.
    """
    description = json.dumps(
        {"quantity": "nuclei per cell", "cell_um": float(cell_um), "level0_mpp": float(mpp), "shape_hw": list(density.shape)}
    )
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
RESULT_SUFFIXES = (".csv", ".geojson", ".geojson.gz", "_density.tiff", "_density.png", "_qc.png", ".json")


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

    With `qc` (the slide's sampler and tissue mask) the QC picture `<stem>_qc.png` is drawn too.

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
    paths["record"].unlink(missing_ok=True)

    write_csv(paths["csv"], det, mpp)
    write_geojson(paths["geojson"], det, mpp, gzip=geojson_gz, id_seed=id_seed)
    density = density_map(det, level0_shape_hw, mpp, cell_um)
    write_density_tiff(paths["density_tiff"], density, cell_um, mpp)
    write_density_png(paths["density_png"], density)
    if qc is not None:
        paths = {**{k: v for k, v in paths.items() if k != "record"}, "qc_png": out / f"{stem}_qc.png", "record": paths["record"]}
        from .qc import write_qc_png

        write_qc_png(paths["qc_png"], qc.sampler, qc.mask, det, density, mpp, cell_um)

    full = dict(record)
    full["outputs"] = {key: p.name for key, p in paths.items()}
    full["nuclei"] = len(det)
    write_run_record(paths["record"], full)
    return paths
