"""The slide viewer's background on a pyramid TIFF: a whole-slide view of a slide too large to
read at the view's level comes from a coarser level (whole, or band by band)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from dashboard import slides

WIDTH, HEIGHT = 2048, 1536  # level 0; levels at downsamples 1, 4, 16
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _level(downsample: int) -> np.ndarray:
    """Top half red on the left and blue on the right, bottom half green."""
    w, h = WIDTH // downsample, HEIGHT // downsample
    image = np.zeros((h, w, 3), np.uint8)
    image[: h // 2, : w // 2] = RED
    image[: h // 2, w // 2 :] = BLUE
    image[h // 2 :] = GREEN
    return image


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "big.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(_level(1), subifds=2, tile=(256, 256), photometric="rgb")
        tif.write(_level(4), subfiletype=1, tile=(256, 256), photometric="rgb")
        tif.write(_level(16), subfiletype=1, tile=(64, 64), photometric="rgb")
    return path


@pytest.fixture
def output(tmp_path):
    return slides.SlideOutput(tmp_path, {"dimensions": [WIDTH, HEIGHT]}, [])


def _colours(image) -> tuple:
    """Top-left, top-right and bottom-middle of the view."""
    w, h = image.size
    return image.getpixel((w // 8, h // 4)), image.getpixel((7 * w // 8, h // 4)), image.getpixel((w // 2, 3 * h // 4))


def test_the_view_level_when_it_fits(output, pyramid):
    image, note = slides.render(output, slide_path=pyramid)
    assert note == "over big.tif (level 0)" and image.size == (1024, 768)
    assert _colours(image) == (RED, BLUE, GREEN)


def test_a_coarser_level_when_the_view_level_is_too_large(output, pyramid, monkeypatch):
    # level 0 (3.1 Mpx) and level 1 (197 kpx) are over the limit; level 2 (12 kpx) is not
    monkeypatch.setattr(slides, "MAX_READ_PIXELS", 100_000)
    image, note = slides.render(output, slide_path=pyramid)
    assert note == "over big.tif (level 2)" and image.size == (1024, 768)
    assert _colours(image) == (RED, BLUE, GREEN)


def test_the_coarsest_level_in_bands_when_even_it_is_too_large(output, pyramid, monkeypatch):
    monkeypatch.setattr(slides, "MAX_READ_PIXELS", 4_000)  # level 2 is 12 kpx: read in 4 bands
    reads = []
    real_read_view = slides._read_view

    def counting(reader, *args):
        real_read = reader.read_region
        reader.read_region = lambda *a: reads.append(a[-2] * a[-1]) or real_read(*a)
        return real_read_view(reader, *args)

    monkeypatch.setattr(slides, "_read_view", counting)
    image, note = slides.render(output, slide_path=pyramid)
    assert note == "over big.tif (level 2)" and image.size == (1024, 768)
    assert len(reads) == 4 and max(reads) <= 4_000
    assert _colours(image) == (RED, BLUE, GREEN)
    # the bands meet where they should: the red/green edge is at the view's middle row
    assert image.getpixel((100, 383 - 4)) == RED and image.getpixel((100, 384 + 4)) == GREEN


def test_a_view_too_large_even_in_bands_says_zoom_in(output, pyramid, monkeypatch):
    monkeypatch.setattr(slides, "MAX_READ_PIXELS", 500)
    _image, note = slides.render(output, slide_path=pyramid)
    assert note.startswith("slide unreadable (the slide's coarsest level (2)") and "zoom in further" in note
    zoomed, note = slides.render(output, (0, 0, 256, 256), pyramid, side=64)
    assert note == "over big.tif (level 2)" and zoomed.getpixel((10, 10)) == RED
