"""Reading real slides: every format in ../shared/data/slides through one interface."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsiproc.io.slide import SlideError, open_slide
from wsiproc.detection.tiling import SlideSampler, TileGrid, halo_tiles, slide_array


@pytest.mark.parametrize(
    "name, reader, size, mpp",
    [
        ("CMU-1-Small-Region.svs", "openslide", (2220, 2967), 0.499),
        ("OS-1-detail.ome.tif", "tiffslide", (1101, 1101), 0.2271),
        ("test3-DAPI-2-(387).ndpi", "openslide", (3968, 4864), 0.2282),
        ("dicom-cmu1/level-0-frames-0-30.dcm", "openslide", (2220, 2967), 0.499),
        ("monusac/A9K0_1.svs", "openslide", (1307, 1153), 0.1945),
    ],
)
def test_real_slides_open_with_the_expected_reader_size_and_pixel_size(slides: Path, name, reader, size, mpp) -> None:
    slide = open_slide(slides / name)
    assert slide.reader == reader
    assert slide.dimensions == size
    assert slide.mpp == pytest.approx(mpp, abs=1e-3)
    region = slide.read_level(0, 100, 200, 64, 32)
    assert region.shape == (32, 64, 3) and region.dtype == np.uint8


def test_dicom_converted_from_svs_reads_the_same_colours_as_the_svs(slides: Path) -> None:
    svs = open_slide(slides / "CMU-1-Small-Region.svs").read_level(0, 800, 1200, 256, 256).astype(float)
    dcm = open_slide(slides / "dicom-cmu1" / "level-0-frames-0-30.dcm").read_level(0, 800, 1200, 256, 256).astype(float)
    assert np.abs(svs.mean(axis=(0, 1)) - dcm.mean(axis=(0, 1))).max() < 8  # JPEG re-encoding aside, same colours


def test_outside_the_slide_reads_as_white(slides: Path) -> None:
    slide = open_slide(slides / "CMU-1-Small-Region.svs")
    region = slide.read_level(0, 2200, -10, 40, 20)
    assert (region[:10] == 255).all() and (region[:, 20:] == 255).all()


def test_mpp_option_overrides_and_missing_mpp_is_a_one_line_error(slides: Path) -> None:
    path = slides / "tcga-cr-7395-01a-01-ts1.svs"
    slide = open_slide(path)
    assert slide.mpp is None
    with pytest.raises(SlideError, match=r"tcga-cr-7395-01a-01-ts1\.svs: no pixel size"):
        slide.require_mpp()
    assert open_slide(path, mpp=0.25).mpp == 0.25


@pytest.mark.parametrize("name, problem", [("openslide-fixtures/unopenable.tiff", "cannot be read"), ("nope.svs", "file not found"), ("monusac", "is a directory")])
def test_unusable_inputs_name_the_file_and_the_problem(slides: Path, name: str, problem: str) -> None:
    with pytest.raises(SlideError) as err:
        open_slide(slides / name)
    message = str(err.value)
    assert message.startswith(str(slides / name)) and problem in message and "\n" not in message


def test_plain_image_needs_mpp_and_reads_like_a_slide(shared_data: Path) -> None:
    path = next((shared_data / "monuseg-train" / "images").glob("*.tif"))
    slide = open_slide(path, mpp=0.25)
    assert slide.reader in {"tiffslide", "image", "openslide"} and slide.dimensions == (1000, 1000)
    png = open_slide(shared_data / "crc-dev" / "images" / "img1.png", mpp=0.55)
    assert png.reader == "image" and png.dimensions == (500, 500)


def test_slide_array_is_lazy_at_half_micron_and_agrees_with_halo_tiles(slides: Path) -> None:
    slide = open_slide(slides / "OS-1-detail.ome.tif")
    sampler = SlideSampler.for_slide(slide, 0.5)
    arr = slide_array(sampler, chunk_px=128)
    assert arr.shape == (500, 500, 3)  # 1101 px × 0.2271 µm / 0.5 µm
    grid = TileGrid(500, 500, tile_px=128, halo_px=32)
    tiles = halo_tiles(sampler, grid)
    assert tiles.numblocks[:2] == (4, 4) and tiles.chunksize[:2] == (192, 192)
    whole = arr.compute()
    block = tiles.blocks[1, 2].compute()
    # Tile (1, 2) with halo covers rows 96..288 and columns 224..416: the same pixels as the whole array
    # (resampling from another crop origin may round a few values the other way: at most 1 grey level).
    diff = np.abs(block.astype(int) - whole[96:288, 224:416].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001
    corner = tiles.blocks[0, 0].compute()
    assert (corner[:30] == 255).all() and (corner[:, :30] == 255).all()  # outside the slide: white halo


def test_a_slide_closes_its_file_at_the_end_of_a_with_block(slides: Path) -> None:
    with open_slide(slides / "CMU-1-Small-Region.svs") as slide:
        assert slide.read_level(0, 0, 0, 8, 8).shape == (8, 8, 3)
        handle = slide._handle
    with pytest.raises(Exception, match="closed"):  # OpenSlide refuses to read through a closed handle
        handle.read_region((0, 0), 0, (8, 8))
