"""One interface over whole-slide files and plain images: OpenSlide first, tiffslide next, Pillow last.

OpenSlide reads most vendor formats (SVS, NDPI, MRXS, DICOM…); tiffslide opens TIFF flavours OpenSlide
refuses (OME-TIFF); plain PNG/JPEG/TIFF images go through Pillow. Every reader returns RGB uint8 with
transparent areas composited onto white, so the rest of the pipeline never sees which reader was used.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SlideError, problem
from PIL import Image

__all__ = ["PLAIN_IMAGE_SUFFIXES", "Slide", "SlideError", "cached_slide", "open_slide"]

PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass
class Slide:
    """An opened slide. `level_dimensions` are (width, height) per pyramid level, level 0 first."""

    path: Path
    reader: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None
    mpp_source: str
    vendor: str
    properties: dict[str, str] = field(repr=False, default_factory=dict)
    _handle: object = field(repr=False, default=None)
    #: JPEG data stored as YCbCr but labelled RGB (seen in DICOM converted from SVS): convert after reading.
    ycbcr_labelled_rgb: bool = False
    _lock: threading.Lock = field(repr=False, default_factory=threading.Lock)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def require_mpp(self) -> float:
        if self.mpp is None:
            if self.mpp_source.startswith("ignored"):
                raise SlideError(f"{self.path}: no usable pixel size stored in the file ({self.mpp_source}); give it with --mpp")
            raise SlideError(f"{self.path}: no pixel size (µm/px) stored in the file; give it with --mpp")
        return self.mpp

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level still at least as fine as `target_mpp`: read there, then downsample."""
        level0_mpp = self.require_mpp()
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if level0_mpp * ds <= target_mpp * 1.001:
                best = level if ds >= self.level_downsamples[best] else best
        return best

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 of a rectangle in `level` pixels; parts outside the slide are white."""
        out = np.full((height, width, 3), 255, np.uint8)
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, lw), min(y + height, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_inside(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _read_inside(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self.reader == "image":
            return self._handle[y : y + height, x : x + width]  # type: ignore[index]
        ds = self.level_downsamples[level]
        location = (int(round(x * ds)), int(round(y * ds)))
        if self.reader == "tiffslide":
            with self._lock:  # tifffile handles are not safe for concurrent reads
                region = self._handle.read_region(location, level, (width, height), as_array=True)  # type: ignore[attr-defined]
        else:
            region = np.asarray(self._read_openslide(location, level, (width, height)))
        rgb = _to_rgb(region)
        if self.ycbcr_labelled_rgb:
            rgb = np.asarray(Image.fromarray(rgb, mode="YCbCr").convert("RGB"))
        return rgb

    def _read_openslide(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        """OpenSlide's read_region, retried once on a freshly opened handle after an error.

        OpenSlide errors are sticky: after one failed read (a corrupt tile) every later read through that
        handle fails too, which would turn one bad tile into a failed rest of the slide. The retry uses a
        handle of its own, so a failure there is this region's own (it is raised); a success replaces the
        broken shared handle for every later read.
        """
        import openslide  # lazy: loads the OpenSlide C library; only files OpenSlide reads need it

        handle = self._handle
        try:
            return handle.read_region(location, level, size)  # type: ignore[attr-defined]
        except openslide.OpenSlideError:
            fresh = openslide.OpenSlide(str(self.path))
            region = fresh.read_region(location, level, size)
            with self._lock:
                if self._handle is handle:  # not already replaced by another reading thread
                    self._handle = fresh
            return region

    def close(self) -> None:
        if hasattr(self._handle, "close"):
            self._handle.close()  # type: ignore[union-attr]

    def __enter__(self) -> "Slide":
        """`with wsiproc.open_slide(path) as slide:` closes the file handle when the block ends, as openslide's does."""
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _to_rgb(region: np.ndarray) -> np.ndarray:
    """RGB uint8 from gray, RGB or RGBA (premultiplied alpha composited onto white, as OpenSlide delivers)."""
    region = np.asarray(region)
    if region.dtype != np.uint8:
        region = np.clip(region, 0, 255).astype(np.uint8)
    if region.ndim == 2:
        return np.repeat(region[..., None], 3, axis=2)
    if region.shape[2] == 4:
        rgb = region[..., :3].astype(np.uint16)
        alpha = region[..., 3:4].astype(np.uint16)
        return (rgb + (255 - alpha)).clip(0, 255).astype(np.uint8)
    if region.shape[2] == 1:
        return np.repeat(region, 3, axis=2)
    return region[..., :3]


#: Stored pixel sizes a microscope scanner can produce. Image tools write a default resolution of 72 dpi,
#: which reads as 352.8 µm/px and would have a run upsample a 300-px image to 200,000 px at 0.5 µm/px.
PLAUSIBLE_STORED_MPP = (0.01, 20.0)


def _stored_mpp(props: dict[str, str], *keys: str) -> tuple[float | None, str]:
    """(µm/px, source) from metadata; a value no scanner produces is ignored, saying so."""
    mpp = _float_prop(props, *keys)
    if mpp is None:
        return None, "none"
    if not PLAUSIBLE_STORED_MPP[0] <= mpp <= PLAUSIBLE_STORED_MPP[1]:
        return None, f"ignored: {mpp:.4g} µm/px stored, a print resolution rather than a microscope's pixel size"
    return mpp, "metadata"


def _float_prop(props: dict[str, str], *keys: str) -> float | None:
    for key in keys:
        try:
            value = float(props[key])
        except (KeyError, TypeError, ValueError):
            continue
        if value > 0:
            return value
    return None


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open `path` with the first reader that accepts it; `mpp` overrides the stored pixel size."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory, not a slide file")
    if mpp is not None and not (0 < mpp < 100):
        raise SlideError(f"{path}: --mpp {mpp} is not a plausible pixel size in µm/px")
    errors = []
    for opener in (_open_openslide, _open_tiffslide, _open_image):
        try:
            slide = opener(path)
            if slide is not None:
                _probe(slide)
        except Exception as exc:  # each reader signals refusal differently
            errors.append(f"{opener.__name__[6:]}: {problem(exc)}")
            continue
        if slide is None:
            continue
        if mpp is not None:
            slide.mpp, slide.mpp_source = float(mpp), "--mpp"
        return slide
    detail = "; ".join(errors) if errors else "unsupported file type"
    raise SlideError(f"{path}: cannot be read as a slide or image ({detail})")


def _probe(slide: Slide) -> None:
    """Decode a few pixels now: some readers open lazily and would only fail in the middle of a run."""
    level = slide.level_count - 1
    w, h = slide.level_dimensions[level]
    slide.read_level(level, 0, 0, min(w, 16), min(h, 16))


def _open_openslide(path: Path) -> Slide | None:
    import openslide  # lazy: loads the OpenSlide C library; only files OpenSlide reads need it

    if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"}:
        return None
    handle = openslide.OpenSlide(str(path))
    props = dict(handle.properties)
    mpp, mpp_source = _stored_mpp(props, openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)
    return Slide(
        path, "openslide", [tuple(d) for d in handle.level_dimensions], [float(d) for d in handle.level_downsamples],
        mpp, mpp_source, props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"), props, handle,
        ycbcr_labelled_rgb=_dicom_jfif_labelled_rgb(path, props),
    )


def _dicom_jfif_labelled_rgb(path: Path, props: dict[str, str]) -> bool:
    """True for DICOM whose baseline-JPEG frames carry a JFIF header (hence YCbCr) but claim RGB.

    DICOM made by copying Aperio tiles is a common case; OpenSlide trusts the label and returns raw YCbCr.
    """
    if props.get("dicom.PhotometricInterpretation") != "RGB" or props.get("dicom.TransferSyntaxUID") != "1.2.840.10008.1.2.4.50":
        return False
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    start = head.find(b"\xff\xd8\xff")
    return start >= 0 and head[start + 3 : start + 4] == b"\xe0" and head[start + 6 : start + 10] == b"JFIF"


def _open_tiffslide(path: Path) -> Slide | None:
    import tiffslide  # lazy: only TIFF flavours OpenSlide refuses need it

    if path.suffix.lower() not in {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf"}:
        return None
    handle = tiffslide.TiffSlide(str(path))
    props = {k: str(v) for k, v in handle.properties.items()}
    mpp, mpp_source = _stored_mpp(props, "tiffslide.mpp-x", "tiffslide.mpp-y")
    return Slide(
        path, "tiffslide", [tuple(d) for d in handle.level_dimensions], [float(d) for d in handle.level_downsamples],
        mpp, mpp_source, props.get("tiffslide.vendor") or "generic-tiff", props, handle,
    )


def _open_image(path: Path) -> Slide | None:
    if path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
        return None
    with Image.open(path) as img:
        img.load()
        rgb = _to_rgb(np.asarray(img.convert("RGBA") if img.mode in ("LA", "PA", "P", "RGBA") else img.convert("RGB")))
    h, w = rgb.shape[:2]
    return Slide(path, "image", [(w, h)], [1.0], None, "none", "plain-image", {}, rgb)


@functools.lru_cache(maxsize=16)
def cached_slide(path: str, mpp: float | None) -> Slide:
    """One open handle per (file, mpp) per process: what dask tasks in worker processes read through."""
    return open_slide(path, mpp)
