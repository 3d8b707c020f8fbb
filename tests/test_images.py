from pathlib import Path

import numpy as np
import pytest

from cmdfed.errors import CmdfedError
from cmdfed.images import to_rgb_uint8


def test_rgb_conversion():
    grey = np.array([[0, 128, 255]], np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(grey, Path("g.png"))[0, 1], [128, 128, 128])
    rgba = np.zeros((1, 1, 4), np.uint8)
    rgba[0, 0] = [10, 20, 30, 0]
    np.testing.assert_array_equal(to_rgb_uint8(rgba, Path("a.png"))[0, 0], [10, 20, 30])
    deep = np.array([[[0, 128 * 257, 65535]]], np.uint16)
    np.testing.assert_array_equal(to_rgb_uint8(deep, Path("d.tif"))[0, 0], [0, 128, 255])
    unit = np.array([[[0.0, 0.5, 1.0]]])
    np.testing.assert_array_equal(to_rgb_uint8(unit, Path("f.npy"))[0, 0], [0, 128, 255])
    with pytest.raises(CmdfedError, match="x.tif"):
        to_rgb_uint8(np.zeros((4, 4, 5), np.uint8), Path("x.tif"))
