"""Read nucleus annotations of any common format as centre points, the one form the evaluator scores.

Annotations arrive as points (CSV, Fiji CellCounter), outlines (Aperio ImageScope XML, QuPath GeoJSON)
or instance label maps. Scoring only needs one point per nucleus, so outlines and masks are reduced to
their area centroids here, once, and everything downstream works on (N, 2) arrays.

Coordinates: x = column, y = row, level-0 pixel-index coordinates (the centre of pixel (0, 0) is
(0.0, 0.0)), the convention of wsiproc's own outputs. Every supported format stores pixel coordinates
already, so values are passed through unchanged: no format's coordinates are shifted or scaled.

Results are keyed by image name so that annotation files can be paired with prediction files; the name
is the file's stem with decorations that annotation tools and data sets add stripped (see `image_key`).

Class labels (nucleus types) come with the points where the format has them (`read_labelled_points`): a CSV's
`class` column, QuPath's classification, ImageScope's annotation attribute, CellCounter's marker type. They are
the annotator's raw names; `wsiproc.detection.classes.ClassMap` maps them onto the model's classes, so reading
never guesses what a name means.
"""
from __future__ import annotations

import csv
import gzip
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError
from shapely import make_valid
from shapely.errors import GEOSException
from shapely.geometry import Polygon, shape
from shapely.geometry.base import BaseGeometry

__all__ = ["Points", "read_labelled_points", "read_points", "read_regions", "read_imagescope_regions", "read_label_map", "label_centroids", "image_key"]

# ElementTree rather than defusedxml, which is not a dependency: Python's expat never fetches external
# entities, and expat >= 2.4.1 (bundled with every Python wsiproc supports) stops entity-expansion
# bombs, which leaves nothing defusedxml would add for local annotation files.

_LABEL_MAP_SUFFIXES = (".png", ".tif", ".tiff")
_GEOJSON_SUFFIXES = (".geojson", ".json")
_KNOWN_SUFFIXES = (".csv", ".xml", *_LABEL_MAP_SUFFIXES, *_GEOJSON_SUFFIXES, ".gz", ".ome")

# Decorations that tools and data sets put around the image name. MoNuSeg's centroid tables are called
# `train_<image>_from_masks.csv`, Fiji saves `CellCounter_<image>.xml`; the rest are common names for an
# image's annotation file.
_KEY_PATTERNS = (
    re.compile(r"^(?:train|test|val)_(?P<key>.+)_from_masks$"),
    re.compile(r"^CellCounter_(?P<key>.+)$"),
    re.compile(
        r"^(?P<key>.+?)[_-](?:points|centroids|centers|centres|annotations?|labels?|masks?|instances?|cellcounter)$",
        re.IGNORECASE,
    ),
)


def image_key(path: str | Path) -> str:
    """The image name a single-image annotation file belongs to: its stem without decorations.

    `train_X_from_masks.csv`, `CellCounter_X.xml`, `X_points.csv`, `X.geojson.gz`, `X_labels.png` and
    `X.xml` all give `X`,
    the stem that wsiproc's prediction files (`X.csv`) carry for image `X.*`.
    """
    name = Path(path).stem
    while True:  # double extensions: .geojson.gz, .ome.tif
        stem, dot, ext = name.rpartition(".")
        if not dot or not stem or f".{ext.lower()}" not in _KNOWN_SUFFIXES:
            break
        name = stem
    for pattern in _KEY_PATTERNS:
        match = pattern.match(name)
        if match:
            return match["key"]
    return name


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare .xy and .labels instead
class Points:
    """The nuclei of one image: centres and, where the annotation names them, each one's class label.

    `xy` is (N, 2) float64 x, y. `labels` is an (N,) object array of the raw label strings (None for a point
    without one), or None where the file holds no labels at all: a caller can tell "no classes annotated"
    from "some points unlabelled", which decides whether a class score is possible.
    """

    xy: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.xy):
            raise ValueError(f"Points: {len(self.labels)} labels for {len(self.xy)} points")

    def __len__(self) -> int:
        return len(self.xy)


def read_labelled_points(path: str | Path, image: str | None = None) -> dict[str, Points]:
    """`read_points` with each nucleus' class label: {image name: `Points`}.

    Labels, by format: CSV, the first of the columns `class`, `classification`, `type`, `label` (a `label`
    column of integers only is an instance id, as in MoNuSeg's centroid tables, not a class; an empty cell is
    no label); QuPath GeoJSON, the feature's `classification`; Aperio ImageScope XML, the class of
    `read_imagescope_regions`; Fiji CellCounter, the marker type's `Name`, else `"Type <n>"`. Instance label
    maps have none. A file whose format or content names no class gives `labels` None.
    """
    path = Path(path)
    points, declared_name = _read_any(path)
    if isinstance(points, Points):
        return {image if image is not None else declared_name or image_key(path): points}
    if image is None:
        return points
    if image not in points:
        names = list(points)
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(f"{path}: no points for image {image!r} (the file has {len(names)} images: {shown})")
    return {image: points[image]}


def read_points(path: str | Path, image: str | None = None) -> dict[str, np.ndarray]:
    """Nucleus centres of an annotation file as {image name: (N, 2) float64 array of x, y}.

    The format is chosen by extension and, where the extension is ambiguous or unknown, by content:
    CSV (`x,y` or `image,x,y` columns), Fiji CellCounter XML, Aperio ImageScope XML (region centroids),
    instance label maps (PNG/TIFF; label centroids) and QuPath GeoJSON (optionally gzipped).

    `image` names the image for single-image files (overriding the name derived from the file) and
    selects one image from multi-image CSVs, where a missing image is an error rather than an empty
    result: a typo would otherwise score as "no nuclei annotated". Class labels: `read_labelled_points`.
    """
    return {name: points.xy for name, points in read_labelled_points(path, image).items()}


def read_imagescope_regions(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """(class name, centroid x, y) of every region of an Aperio ImageScope XML file, in file order.

    The class is the name of the Annotation's first attribute, where MoNuSAC keeps it, or else the
    Annotation's (layer's) Name; ImageScope's default attribute "Description" names no class.
    Polygons give their area centroid, so uneven vertex spacing along the outline does not pull the
    centre. Self-crossing outlines are repaired first with shapely.make_valid, which keeps every lobe
    (buffer(0) drops one). Regions enclosing no area (points, ellipses stored as two corners, lines)
    give the mean of their vertices. Negative regions (holes, NegativeROA="1") and regions without
    vertices mark no nucleus and are skipped.
    """
    path = Path(path)
    root = _parse_xml(path)
    if root.tag != "Annotations":
        raise ValueError(f"{path}: not an Aperio ImageScope XML file (root element <{root.tag}>)")
    return _imagescope_regions(path, root)


def _imagescope_regions(path: Path, root: ET.Element) -> list[tuple[str, np.ndarray]]:
    regions = []
    for annotation in root.iter("Annotation"):
        attribute = annotation.find("Attributes/Attribute")
        class_name = attribute.get("Name", "") if attribute is not None else ""
        if class_name in ("", "Description"):
            class_name = annotation.get("Name", "")
        for region in annotation.iter("Region"):
            if region.get("NegativeROA", "0") == "1":
                continue
            vertices = []
            for vertex in region.iter("Vertex"):
                try:
                    vertices.append((float(vertex.attrib["X"]), float(vertex.attrib["Y"])))
                except (KeyError, ValueError):
                    raise ValueError(
                        f"{path}: region {region.get('Id', '?')} has a vertex without numeric X and Y: {vertex.attrib}"
                    ) from None
            if vertices:
                regions.append((class_name, _outline_centroid(np.asarray(vertices, dtype=np.float64))))
    return regions


def read_label_map(path: str | Path) -> np.ndarray:
    """An instance label map (0 = background, one integer per nucleus) as a 2-D unsigned array.

    Rejects colour and floating-point images: a resized or RGB-rendered "mask" has lost the one-label-
    per-nucleus property, and scoring against it would silently merge or invent nuclei.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            array = tifffile.imread(path)
        except Exception as exc:  # tifffile raises several types for broken files
            raise ValueError(f"{path}: cannot read as TIFF: {exc}") from exc
    else:
        try:
            with Image.open(path) as img:
                if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "PA", "LA"):
                    raise ValueError(
                        f"{path}: {img.mode} image, not an instance label map (expected one integer channel)"
                    )
                array = np.asarray(img)
        except UnidentifiedImageError as exc:
            raise ValueError(f"{path}: cannot read as an image: {exc}") from exc
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"{path}: shape {array.shape}, not an instance label map (expected one 2-D channel)")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: {array.dtype} pixels, not an instance label map (expected integer labels)")
    if np.issubdtype(array.dtype, np.signedinteger):
        if array.size and array.min() < 0:
            raise ValueError(f"{path}: negative labels, not an instance label map (0 = background, >0 = nucleus)")
        array = array.astype(np.uint64 if array.dtype.itemsize > 4 else np.uint32)
    return array


def label_centroids(label_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, (N, 2) x, y centroids) of the nonzero labels of an instance label map, labels ascending.

    The centroid is the mean pixel index of the label's pixels, as scipy.ndimage.center_of_mass gives,
    so a nucleus of one pixel sits exactly on that pixel; computed with one sort and bincounts, which
    does not care how large or sparse the label values are. Labels that occur in no pixel do not exist.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label map has shape {label_map.shape}, expected 2-D")
    flat = label_map.ravel()
    labels, inverse = np.unique(flat, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(labels)).astype(np.float64)
    rows, cols = np.divmod(np.arange(flat.size, dtype=np.int64), label_map.shape[1])
    x = np.bincount(inverse, weights=cols, minlength=len(labels)) / np.maximum(counts, 1)
    y = np.bincount(inverse, weights=rows, minlength=len(labels)) / np.maximum(counts, 1)
    keep = labels != 0
    return labels[keep], np.column_stack([x[keep], y[keep]]).astype(np.float64).reshape(-1, 2)


# ----------------------------------------------------------------------------------------- dispatch


def _read_any(path: Path) -> tuple[Points | dict[str, Points], str | None]:
    """Points of one file (one `Points` for single-image formats, a dict for multi-image ones) and the
    image name the file itself declares, if any (CellCounter's Image_Filename)."""
    kind = _detect_format(path)
    if kind == "csv":
        return _read_csv(path), None
    if kind == "xml":
        root = _parse_xml(path)
        if root.tag == "CellCounter_Marker_File":
            filename = (root.findtext("Image_Properties/Image_Filename") or "").strip()
            declared = image_key(filename.replace("\\", "/")) if filename else None
            return _read_cellcounter(path, root), declared
        if root.tag == "Annotations":
            regions = _imagescope_regions(path, root)
            xy = np.asarray([c for _, c in regions], dtype=np.float64).reshape(-1, 2)
            return Points(xy, _labels_or_none([name or None for name, _ in regions])), None
        raise ValueError(
            f"{path}: unknown XML annotation format (root element <{root.tag}>; "
            "expected <Annotations> of Aperio ImageScope or <CellCounter_Marker_File> of Fiji)"
        )
    if kind == "label_map":
        return Points(label_centroids(read_label_map(path))[1]), None  # masks name no class
    if kind == "geojson":
        return _read_geojson(path), None
    raise ValueError(
        f"{path}: unknown annotation format (expected .csv, .xml, .geojson[.gz], .json or a .png/.tif label map)"
    )


def _detect_format(path: Path) -> str:
    """Extension first; content for unknown extensions so misnamed exports still load."""
    name = path.name.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".xml"):
        return "xml"
    if name.endswith(_LABEL_MAP_SUFFIXES):
        return "label_map"
    if name.endswith(_GEOJSON_SUFFIXES) or name.endswith(tuple(s + ".gz" for s in _GEOJSON_SUFFIXES)):
        return "geojson"
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(b"\x1f\x8b"):
        return "geojson"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<"):
        return "xml"
    if text.startswith((b"{", b"[")):
        return "geojson"
    if head.startswith((b"\x89PNG", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "label_map"
    return "unknown"


# ------------------------------------------------------------------------------------------- readers


#: Columns a CSV may name its points' classes in, the first present wins: `class` as brca-m2c, consep-train and
#: wsiproc's own results write it, then the names spreadsheets and other tools use.
_CLASS_COLUMNS = ("class", "classification", "type", "label")


def _read_csv(path: Path) -> Points | dict[str, Points]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header with x,y or image,x,y columns")
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        if "x" not in columns or "y" not in columns:
            raise ValueError(f"{path}: no x and y columns in header {header}")
        ix, iy, iimage = columns["x"], columns["y"], columns.get("image")
        class_column = next((name for name in _CLASS_COLUMNS if name in columns), None)
        iclass = columns[class_column] if class_column else None
        xs: list[float] = []
        ys: list[float] = []
        images: list[str] = []
        labels: list[str | None] = []
        for row in reader:
            line_no = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            try:
                x, y = float(row[ix]), float(row[iy])
            except (IndexError, ValueError):
                raise ValueError(f"{path}: line {line_no}: x, y not numbers: {row}") from None
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError(f"{path}: line {line_no}: non-finite coordinate: {row}")
            xs.append(x)
            ys.append(y)
            if iimage is not None:
                if iimage >= len(row) or not row[iimage].strip():
                    raise ValueError(f"{path}: line {line_no}: empty image name: {row}")
                images.append(row[iimage].strip())
            if iclass is not None:
                labels.append((row[iclass].strip() or None) if iclass < len(row) else None)
    xy = np.column_stack([np.asarray(xs, np.float64), np.asarray(ys, np.float64)]).reshape(-1, 2)
    if class_column == "label" and all(label is None or _is_integer(label) for label in labels):
        iclass = None  # instance ids (MoNuSeg's `label,x,y,area_px`), not classes
    label_array = _labels_or_none(labels) if iclass is not None else None
    if iimage is None:
        return Points(xy, label_array)
    names, first, inverse = np.unique(np.asarray(images), return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse))[:-1]
    groups = np.split(xy[order], bounds)
    label_groups = np.split(label_array[order], bounds) if label_array is not None else [None] * len(names)
    return {str(names[k]): Points(groups[k], label_groups[k]) for k in np.argsort(first)}  # images in file order


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _labels_or_none(labels: list[str | None]) -> np.ndarray | None:
    """An object array of the labels, or None where no point has one (the file names no class)."""
    if all(label is None for label in labels):
        return None
    out = np.empty(len(labels), dtype=object)
    out[:] = labels
    return out


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not well-formed XML: {exc}") from exc


def _read_cellcounter(path: Path, root: ET.Element) -> Points:
    """All markers of all counter types: each type is a class, and every marker is one nucleus.

    A marker's label is its type's `Name` (Fiji's Cell Counter lets users name the counters), else
    `"Type <n>"` after the counter number, which users map with `--class-map "Type 1=epithelial"`.
    MarkerX/MarkerY are ImageJ pixel indices (uncalibrated), already our convention; MarkerZ, the
    slice of a stack, is ignored since whole-slide images are single planes.
    """
    points = []
    labels: list[str | None] = []
    for marker_type in root.iter("Marker_Type"):
        name = (marker_type.findtext("Name") or "").strip()
        number = (marker_type.findtext("Type") or "").strip()
        label = name or (f"Type {number}" if number else None)
        for marker in marker_type.iter("Marker"):
            points.append(_marker_xy(path, marker))
            labels.append(label)
    if not points:  # markers outside any <Marker_Type>: an unusual file, still nuclei
        points = [_marker_xy(path, marker) for marker in root.iter("Marker")]
        labels = [None] * len(points)
    return Points(np.asarray(points, dtype=np.float64).reshape(-1, 2), _labels_or_none(labels))


def _marker_xy(path: Path, marker: ET.Element) -> tuple[float, float]:
    x_text, y_text = marker.findtext("MarkerX"), marker.findtext("MarkerY")
    try:
        return float(x_text), float(y_text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(
            f"{path}: a <Marker> has no numeric MarkerX and MarkerY ({x_text!r}, {y_text!r})"
        ) from None


def _read_geojson(path: Path) -> Points:
    """Nucleus points of a QuPath export: a FeatureCollection, a bare list of features, or a single feature.

    Point geometries give the point, MultiPoint (QuPath's "Points" annotations) one point each, polygons
    their area centroid. Cell objects use their `nucleusGeometry` when present, since the nucleus, not
    the cell outline around it, is what was annotated. Features without geometry are skipped. Where the file
    holds points, its polygon annotations are the regions the points were marked in (`read_regions`), not nuclei.
    Each nucleus is labelled with its feature's QuPath classification (`_qupath_class`).
    """
    nuclei, labels, _ = _geojson_nuclei_and_regions(path)
    return Points(np.asarray(nuclei, dtype=np.float64).reshape(-1, 2), _labels_or_none(labels))


def read_regions(path: str | Path) -> dict[str, list[BaseGeometry]]:
    """The annotated regions of a QuPath GeoJSON export, {image name: [shapely polygons in level-0 pixels]}.

    QuPath users mark nuclei with the Points tool inside a drawn region (a rectangle, polygon or brush area)
    and export both; only the inside of the regions was looked at, so only it may teach "no nucleus here".
    The rule: in a file with Point or MultiPoint features, every Polygon / MultiPolygon *annotation* (QuPath's
    `objectType` "annotation", what a user draws) is a region; detections and cells are nuclei. A file without
    points holds nucleus outlines (every nucleus of the image was outlined), and other formats have no regions:
    both give {} (the whole image is annotated).
    """
    path = Path(path)
    if _detect_format(path) != "geojson":
        return {}
    _, _, regions = _geojson_nuclei_and_regions(path)
    return {image_key(path): regions} if regions else {}


def _geojson_features(path: Path) -> list[dict[str, Any]]:
    opener: Any = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{path}: not valid (gzipped) JSON: {exc}") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise ValueError(f"{path}: not GeoJSON (expected a FeatureCollection, a Feature or a list of features)")
    if not isinstance(features, list):
        raise ValueError(f"{path}: 'features' is not a list")
    for number, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise ValueError(f"{path}: feature {number} is not a GeoJSON Feature")
    return features


def _geojson_nuclei_and_regions(
    path: Path,
) -> tuple[list[tuple[float, float]], list[str | None], list[BaseGeometry]]:
    """(nucleus points, their labels, annotated regions) of a GeoJSON file; see `_read_geojson`, `read_regions`."""
    features = [(n, f, f.get("nucleusGeometry") or f.get("geometry")) for n, f in enumerate(_geojson_features(path))]
    features = [(n, f, g) for n, f, g in features if g is not None]
    has_points = any(isinstance(g, dict) and g.get("type") in ("Point", "MultiPoint") for _, _, g in features)
    points: list[tuple[float, float]] = []
    labels: list[str | None] = []
    regions: list[BaseGeometry] = []
    for number, feature, geometry in features:
        try:
            if has_points and geometry.get("type") in ("Polygon", "MultiPolygon") and _object_type(feature) == "annotation":
                region = shape(geometry)
                regions.append(region if region.is_valid else make_valid(region))
            else:
                found = _geometry_points(geometry)
                points.extend(found)
                labels.extend([_qupath_class(feature)] * len(found))  # a MultiPoint's points share its class
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, GEOSException) as exc:
            raise ValueError(f"{path}: feature {number} (id {feature.get('id')!r}): {exc}") from None
    return points, labels, regions


def _qupath_class(feature: dict[str, Any]) -> str | None:
    """The QuPath classification of a feature as one name, or None for an unclassified object.

    QuPath writes `"classification": {"name": ..., "color": ...}`; exports before 0.2 wrote the name as a plain
    string; 0.4 and later write a derived class (e.g. Tumor: Positive) as `"names": ["Tumor", "Positive"]`.
    Those are joined with ": ", QuPath's own spelling of a derived class, so the label is the name the user
    sees in QuPath whichever version wrote the file (and maps with `--class-map 'Tumor: Positive=epithelial'`).
    """
    props = feature.get("properties")
    classification = props.get("classification") if isinstance(props, dict) else None
    if isinstance(classification, str):
        return classification.strip() or None
    if not isinstance(classification, dict):
        return None
    name = classification.get("name")
    if isinstance(name, str) and name.strip():
        return name.strip()
    names = classification.get("names")
    if isinstance(names, list):
        parts = [str(n).strip() for n in names if str(n).strip()]
        return ": ".join(parts) or None
    return None


def _object_type(feature: dict[str, Any]) -> str | None:
    """QuPath's object type: `annotation` (drawn by a user), `detection` or `cell` (found by a command)."""
    props = feature.get("properties")
    return props.get("objectType") if isinstance(props, dict) else None


def _geometry_points(geometry: dict[str, Any]) -> list[tuple[float, float]]:
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Point":
        return [(float(coords[0]), float(coords[1]))]
    if kind == "MultiPoint":
        return [(float(c[0]), float(c[1])) for c in coords]
    if kind in ("Polygon", "MultiPolygon"):
        try:
            geom: BaseGeometry | None = shape(geometry)
            if not geom.is_valid:
                geom = make_valid(geom)
        except (ValueError, GEOSException):  # rings of fewer than 4 positions
            geom = None
        if geom is not None and not geom.is_empty and geom.area > 0:
            return [(geom.centroid.x, geom.centroid.y)]
        outline = [(float(c[0]), float(c[1])) for ring in _rings(kind, coords) for c in ring]
        return [tuple(np.mean(outline, axis=0))] if outline else []
    raise ValueError(f"unsupported geometry type {kind!r} (expected Point, MultiPoint, Polygon or MultiPolygon)")


def _rings(kind: str, coords: Any) -> list[Any]:
    """Exterior rings only: holes do not move where a degenerate outline sits."""
    return [coords[0]] if kind == "Polygon" else [poly[0] for poly in coords if poly]


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _outline_centroid(vertices: np.ndarray) -> np.ndarray:
    """Area centroid of an outline; mean of vertices where the outline encloses no area."""
    if len(vertices) >= 3:
        try:
            polygon: BaseGeometry = Polygon(vertices)
            if not polygon.is_valid:  # self-crossing hand-drawn outlines
                polygon = make_valid(polygon)
        except (ValueError, GEOSException):
            polygon = Polygon()
        if not polygon.is_empty and polygon.area > 0:
            return np.array([polygon.centroid.x, polygon.centroid.y], dtype=np.float64)
    return vertices.mean(axis=0)
