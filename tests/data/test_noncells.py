"""The quality gate's test images (core.data.noncells)."""

from __future__ import annotations

import numpy as np

from core.data import noncells
from tests.helpers import decoded_cells as _cells


def test_the_generator_is_seeded_and_makes_images_of_any_size(cells_dir):
    a = noncells.non_cells(smear_folder=None, cells=_cells(cells_dir)[:4], seed=3)
    b = noncells.non_cells(smear_folder=None, cells=_cells(cells_dir)[:4], seed=3)
    assert set(a) == set(noncells.KINDS)
    for kind in a:
        assert [n for n, _ in a[kind]] == [n for n, _ in b[kind]]
        for (_, x), (_, y) in zip(a[kind], b[kind]):
            assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[-1] == 3
            assert np.array_equal(x, y)
    sizes = {img.shape[:2] for _, img in a["noise"]}
    assert len(sizes) > 5
