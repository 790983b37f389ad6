"""The predictor: shapes, value range, and what happens when a batch does not fit the GPU's memory."""
from __future__ import annotations

import numpy as np
import pytest


def test_confidence_maps_have_the_tiles_shape_and_lie_in_0_1(predictor) -> None:
    tiles = np.random.default_rng(0).integers(0, 256, (2, 96, 128, 3), dtype=np.uint8)
    conf = predictor(tiles)
    assert conf.shape == (2, 96, 128) and conf.dtype == np.float32
    assert np.isfinite(conf).all() and conf.min() >= 0 and conf.max() <= 1
    with pytest.raises(ValueError, match="expected"):
        predictor(tiles[0])


def test_an_out_of_memory_batch_is_split_instead_of_failing(shipped_model) -> None:
    import tensorflow as tf

    from wsiproc.detection.inference import Predictor

    predictor = Predictor(shipped_model)
    real_forward = predictor._forward
    sizes = []

    def forward_that_fits_two(x):  # stands in for a GPU that holds two tiles at a time
        sizes.append(len(x))
        if len(x) > 2:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return real_forward(x)

    predictor._forward = forward_that_fits_two
    tiles = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    conf = predictor(tiles)
    assert conf.shape == (5, 64, 64) and predictor.max_batch == 2
    assert sizes[:3] == [5, 2, 2] and sum(s for s in sizes if s <= 2) == 5
    whole = np.concatenate([np.asarray(real_forward(tiles[i : i + 1])) for i in range(5)])
    np.testing.assert_allclose(conf, whole[..., 0] if whole.ndim == 4 else whole, atol=1e-5)  # confidence (and classes)
