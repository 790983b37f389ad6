"""The seam rules without a network: a synthetic confidence map cut into tiles gives the untiled nuclei.

As stardist's `big.py` tests do: what makes tiled output equal untiled output is the halo covering the
post-processing's reach and each nucleus being owned by exactly one tile (`stitch.owned`), not the model.
"""
from __future__ import annotations

import numpy as np
import pytest

from wsiproc.detection.postprocess import Components, Postprocess
from wsiproc.detection.stitch import keep_core, owned
from wsiproc.detection.tiling import TileGrid


def _blobs(h: int, w: int, n: int, seed: int) -> np.ndarray:
    """Gaussian nuclei of σ 3–5 px, many touching, at random sub-pixel positions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    conf = np.zeros((h, w), np.float32)
    for cy, cx, s in zip(rng.uniform(0, h, n), rng.uniform(0, w, n), rng.uniform(3, 5, n)):
        conf = np.maximum(conf, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)))
    return conf


# Peaks need only the halo to cover their reach, however crowded the nuclei; components must also be smaller than
# the halo (a chain of touching nuclei wider than it is cut differently by two tiles: what `peaks` fixes), so
# they get a sparser map.
@pytest.mark.parametrize("method, n_blobs", [("peaks", 160), ("components", 35)])
@pytest.mark.parametrize("tile_px", [48, 64, 100])
def test_tiles_with_their_halo_find_exactly_the_untiled_nuclei(method: str, n_blobs: int, tile_px: int) -> None:
    conf = _blobs(230, 190, n_blobs, seed=tile_px)
    post = Postprocess(method, 0.5, min_distance_px=2, sigma_px=1.0)
    halo = 16
    assert halo >= post.reach_px
    padded = np.pad(conf, 256)  # outside the image the map is 0, as glass is for the network

    def nuclei(tile_px: int) -> tuple[np.ndarray, np.ndarray]:
        grid = TileGrid(230, 190, tile_px, halo, multiple_px=4)
        parts = []
        for r in range(grid.rows):
            for c in range(grid.cols):
                y0, x0 = 256 + r * tile_px - halo, 256 + c * tile_px - halo  # the tile with its halo
                parts.append(keep_core(post(padded[y0 : y0 + grid.block_px, x0 : x0 + grid.block_px]), grid, r, c))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    whole_y, whole_x = nuclei(232)  # one tile holds the whole image: the reference without seams
    y, x = nuclei(tile_px)
    assert len(whole_y) > 25 and len(y) == len(whole_y)
    np.testing.assert_allclose(np.sort(y), np.sort(whole_y), atol=1e-6)
    np.testing.assert_allclose(np.sort(x), np.sort(whole_x), atol=1e-6)


def test_a_centroid_on_a_core_boundary_belongs_to_exactly_one_tile() -> None:
    # Pixel i spans [i − 0.5, i + 0.5): the boundary between cores 0–64 and 64–128 is at 63.5.
    y = np.array([10.0, 10.0, 10.0, 10.0])
    x = np.array([63.49, 63.5, 63.51, 127.5])
    left, right = owned(y, x, (0, 0, 64, 64)), owned(y, x, (0, 64, 64, 128))
    assert left.tolist() == [True, False, False, False]
    assert right.tolist() == [False, True, True, False]
    assert not (left & right).any()


def test_components_report_their_own_area() -> None:
    conf = np.zeros((20, 20), np.float32)
    conf[5:8, 5:9] = 0.9
    found = Postprocess("components", 0.5)(conf)
    assert isinstance(found, Components) and len(found) == 1
    assert (found.y[0], found.x[0], found.area_px[0]) == (6.0, 6.5, 12.0)
