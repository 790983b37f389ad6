"""A lab's annotated images for training and checking: image files paired with their points and regions.

Users annotate as QuPath, Fiji or a CSV lets them: every nucleus of an image (fully annotated), or points inside
drawn regions (QuPath GeoJSON: only the regions teach, so unlabelled nuclei outside them are not taught as
background). A domain is one lab's (or data set's) images with a held-out part that training never sees and the
final check scores: the user's own (`held_out`), or a fixed one (`fixed_held_out`) when none is given.

Problems a user can fix are `UsageError`s naming the file: an image without annotations, one whose annotations
are empty, points that fall outside the image (wrong file, or coordinates not at level 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import UsageError
from ..io.annotations import image_key, read_labelled_points, read_regions
from ..io.files import expand
from ..io.slide import PLAIN_IMAGE_SUFFIXES, open_slide
from shapely.geometry import box
from . import datasets
import yaml
import shapely
from shapely.ops import unary_union

#: Points may sit this far (level-0 px) outside the image before they are called out of bounds: annotation tools
#: put a point on a pixel's edge or corner, which lies up to a pixel outside the last pixel centre.
_EDGE_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class LabImage:
    """One annotated image: its file, µm/px, nucleus centres in level-0 pixels, the annotated regions
    (shapely polygons in level-0 pixels; empty: the whole image is annotated) and the class label of each
    nucleus as the annotation names it (an (N,) object array, None per unlabelled point; None: no labels),
    kept raw so that `wsiproc.detection.classes.ClassMap` decides what each name means."""

    name: str
    path: Path
    mpp: float
    points_xy: np.ndarray
    regions: tuple = ()
    labels: np.ndarray | None = None

    def read_rgb(self) -> np.ndarray:
        slide = open_slide(self.path, self.mpp)
        try:
            w, h = slide.dimensions
            return slide.read_level(0, 0, 0, w, h)
        finally:
            slide.close()

    def inside(self, xy: np.ndarray) -> np.ndarray:
        """Which of the level-0 points `xy` lie in the annotated regions (all, for a fully annotated image)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        if not self.regions:
            return np.ones(len(xy), dtype=bool)

        return shapely.contains_xy(unary_union(list(self.regions)), xy[:, 0], xy[:, 1])


@dataclass(frozen=True)
class Domain:
    """A lab's (or data set's) annotated images: a training part and a held-out part for the final check."""

    name: str
    train: tuple = ()
    held_out: tuple = ()
    builtin: bool = False  # one of the data sets the shipped model was trained on (`wsiproc.learn.datasets`)

    def describe(self) -> dict:
        def images(part: Sequence) -> list[dict]:
            return [{"name": im.name, "path": str(im.path), "mpp": im.mpp, "points": int(len(im.points_xy)),
                     "regions": len(getattr(im, "regions", ()))} for im in part]

        return {"name": self.name, "builtin": self.builtin, "train": images(self.train), "held_out": images(self.held_out)}


@dataclass(frozen=True)
class Annotations:
    """Everything the annotation files of a spec say, by image name: nucleus centres, annotated regions and the
    nuclei's class labels (`labels`: {image: (N,) object array of raw names, or None where the file has none})."""

    points: dict = field(default_factory=dict)
    regions: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)

    @classmethod
    def read(cls, spec: str) -> "Annotations":
        """The annotations of every file `spec` names (file, folder or glob; any format `read_points` reads)."""
        files = expand(spec)
        if not files:
            raise UsageError(f"{spec}: no annotation files found")
        points: dict = {}
        regions: dict = {}
        labels: dict = {}
        for path in files:
            try:
                for name, found in read_labelled_points(path).items():
                    points[name], labels[name] = found.xy, found.labels
                regions.update(read_regions(path))
            except ValueError as exc:
                raise UsageError(str(exc)) from exc
        return cls(points, regions, labels)

    def key_for(self, path: Path) -> str | None:
        """The name under which the annotations of image `path` are held (its stem, or its image key), or None."""
        for key in (path.stem, image_key(path)):
            if key in self.points or key in self.regions:
                return key
        return None


def lab_images(image_files: Iterable[Path], annotations: Annotations, mpp: float) -> list[LabImage]:
    """Every image paired with its annotations, each checked: annotated, not empty, inside the image."""
    out = []
    names = sorted(annotations.points)
    for path in image_files:
        key = annotations.key_for(path)
        if key is None:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise UsageError(f"{path}: no annotations for this image (looked for {path.stem!r}; the annotation files "
                             f"name {len(names)} image(s): {shown or 'none'})")
        pts = np.asarray(annotations.points.get(key, np.zeros((0, 2))), dtype=np.float64).reshape(-1, 2)
        regions = tuple(annotations.regions.get(key, ()))
        slide = open_slide(path, mpp)
        try:
            w, h = slide.dimensions
        finally:
            slide.close()
        if len(pts) == 0 and not regions:
            raise UsageError(f"{path}: its annotations hold no nucleus and no region: nothing to learn from")
        t = _EDGE_TOLERANCE_PX
        outside = (pts[:, 0] < -0.5 - t) | (pts[:, 0] > w - 0.5 + t) | (pts[:, 1] < -0.5 - t) | (pts[:, 1] > h - 0.5 + t)
        if outside.any():
            x, y = pts[np.argmax(outside)]
            raise UsageError(f"{path}: {int(outside.sum())} of {len(pts)} annotated points fall outside the image "
                             f"({w} × {h} px), e.g. ({x:.0f}, {y:.0f}): are they this image's, in level-0 pixels?")
        if regions:
            if sum(r.intersection(box(-0.5, -0.5, w - 0.5, h - 0.5)).area for r in regions) <= 0:
                raise UsageError(f"{path}: its annotated regions lie outside the image ({w} × {h} px)")
        out.append(LabImage(key, path, mpp, pts, regions, annotations.labels.get(key)))
    return out


def fixed_held_out(names: Sequence[str]) -> set[str]:
    """The held-out part when the user names none: every fifth image in name order (the 5th, 10th, …), and the
    last one where there are 2–4; none for a single image. Fixed by the names alone, never by a score."""
    ordered = sorted(names)
    if len(ordered) < 2:
        return set()
    if len(ordered) < 5:
        return {ordered[-1]}
    return set(ordered[4::5])


def lab_domain(name: str, images_spec: str, points_spec: str, mpp: float, held_out_spec: str | None = None,
               held_out_names: Sequence[str] | None = None) -> Domain:
    """A domain from the command line or a domains file: images, their annotations, µm/px and the held-out part
    (image files `held_out_spec`, or image names, or else `fixed_held_out`). Held-out images may be among
    `images_spec` (they are taken out of training) or elsewhere; they are annotated in the same files."""
    if mpp is None or mpp <= 0:
        raise UsageError(f"domain {name!r}: give the images' pixel size in µm/px (got {mpp})")
    files = expand(images_spec, PLAIN_IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{images_spec}: no images found")
    held_files = expand(held_out_spec, PLAIN_IMAGE_SUFFIXES) if held_out_spec else []
    if held_out_spec and not held_files:
        raise UsageError(f"{held_out_spec}: no held-out images found")
    annotations = Annotations.read(points_spec)
    images = lab_images(sorted(set(files) | set(held_files)), annotations, mpp)
    if held_files:
        held = {im.name for im in images if im.path in set(held_files)}
    elif held_out_names is not None:
        held = set(held_out_names)
        unknown = held - {im.name for im in images}
        if unknown:
            raise UsageError(f"domain {name!r}: held-out image(s) not among its images: {', '.join(sorted(unknown))}")
    else:
        held = fixed_held_out([im.name for im in images])
    train = tuple(im for im in images if im.name not in held)
    if not train:
        raise UsageError(f"domain {name!r}: every image is held out; nothing is left to train on")
    return Domain(name, train, tuple(im for im in images if im.name in held))


def builtin_domain(name: str, data_root: str | Path) -> Domain:
    """One of the annotated data sets the shipped model was trained on, with its split fixed in code."""
    if name not in datasets.DOMAINS:
        raise UsageError(f"unknown data set {name!r}; known: {', '.join(datasets.DOMAINS)}")
    root = Path(data_root)
    if not (root / datasets.DOMAINS[name][0]).is_dir():
        raise UsageError(f"{root / datasets.DOMAINS[name][0]}: data set {name!r} not found under --data {root}")
    return Domain(name, tuple(datasets.domain(name, root, "train")), tuple(datasets.domain(name, root, "held_out")), builtin=True)


def load_domains(path: str | Path, data_root: str | Path | None = None) -> list[Domain]:
    """Domains from a YAML file; relative paths are relative to the file. Each entry is a lab's images:

        domains:
          - name: lab
            images: images/          # folder, file or glob
            points: points.geojson   # file, folder or glob: CSV, QuPath GeoJSON, CellCounter or ImageScope XML, label maps
            mpp: 0.5
            held_out: [img5, img10]  # optional: image names (or held_out_images: a folder or glob)
          - dataset: monuseg         # or a built-in data set with its fixed split
            data: ../shared/data     # its root (default: --data)
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: not a readable YAML domains file ({exc})") from exc
    entries = spec.get("domains") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: expected a 'domains:' list")
    base = path.parent

    def rel(value: str) -> str:
        return str(value) if Path(value).is_absolute() else str(base / value)

    domains = []
    known = {"name", "images", "points", "mpp", "held_out", "held_out_images", "dataset", "data"}
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - known:
            extra = sorted(set(entry) - known) if isinstance(entry, dict) else []
            raise UsageError(f"{path}: domain {number + 1}: expected a mapping with keys among {', '.join(sorted(known))}"
                             + (f" (unknown: {', '.join(extra)})" if extra else ""))
        if "dataset" in entry:
            root = rel(entry["data"]) if "data" in entry else data_root
            if root is None:
                raise UsageError(f"{path}: domain {number + 1} ({entry['dataset']}): give 'data:' or --data")
            domains.append(builtin_domain(str(entry["dataset"]), root))
            continue
        missing = [k for k in ("images", "points", "mpp") if k not in entry]
        if missing:
            raise UsageError(f"{path}: domain {number + 1}: missing {', '.join(missing)}")
        domains.append(lab_domain(str(entry.get("name", f"domain{number + 1}")), rel(entry["images"]), rel(entry["points"]),
                                  float(entry["mpp"]), rel(entry["held_out_images"]) if "held_out_images" in entry else None,
                                  entry.get("held_out")))
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise UsageError(f"{path}: two domains share a name ({', '.join(names)})")
    return domains
