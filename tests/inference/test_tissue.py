"""Tissue detection on thumbnails: the stained part of an image, the same mask as skimage's definition."""

import numpy as np

from cmdfed.data.synth import synth_tiles
from cmdfed.inference.tissue import tissue_mask


def stained_left_half() -> np.ndarray:
    """White glass with synthetic H&E tissue in the left half (x < 512)."""
    image = np.full((768, 1024, 3), 245, np.uint8)
    for k, tile in enumerate(synth_tiles(12, tile_size=128, seed=3)):
        r, c = divmod(k, 4)
        image[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128] = tile.image
    image[384:, :512] = image[:384, :512]
    return image


def test_tissue_mask_finds_the_stained_half():
    mask = tissue_mask(stained_left_half())
    assert mask[:, :512].mean() > 0.7 and mask[:, 512:].mean() < 0.02


def skimage_tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """The definition tissue_mask computes through OpenCV, in skimage's terms."""
    from skimage import filters, morphology
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(thumbnail)
    saturation, value = hsv[..., 1], hsv[..., 2]
    if np.ptp(saturation) < 1e-3:
        return np.zeros(saturation.shape, bool)
    mask = (saturation > max(filters.threshold_otsu(saturation), 0.05)) & (value > 0.15)
    mask = morphology.closing(mask, morphology.disk(max(1, min(mask.shape) // 200)))
    return morphology.remove_small_objects(mask, max_size=max(16, mask.size // 20000))


def test_tissue_mask_is_the_skimage_definition():
    rng = np.random.default_rng(0)
    images = [stained_left_half(), np.full((40, 60, 3), 245, np.uint8)]
    for _ in range(20):
        h, w = rng.integers(50, 500, 2)
        image = np.full((h, w, 3), 240, np.uint8)
        yy, xx = np.mgrid[:h, :w]
        for _ in range(6):  # stained blobs of every size (some removed as specks) on noisy glass
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, 60)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        noise = rng.random((h, w)) < 0.2
        image[noise] = rng.integers(0, 256, (int(noise.sum()), 3))
        images.append(image)
    for image in images:
        assert np.array_equal(tissue_mask(image), skimage_tissue_mask(image))
