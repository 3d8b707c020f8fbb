"""The slide viewer's background: finding the output's slide where its summary recorded it (or,
for older outputs, by its name), and on a pyramid TIFF a whole-slide view of a slide too large
to read at the view's level from a coarser level (whole, or band by band)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from dashboard import slides

from .conftest import make_project

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


def _lookup(folder, files_root) -> slides.SlideLookup:
    return slides.locate_slide(slides.load_output(folder), files_root)


TYPE_IT = "type its path below to show it behind the nuclei."


def test_a_project_moved_whole_finds_its_slide_by_the_relative_path(tmp_path, outputs_root):
    make_project(tmp_path / "at-the-scanner", outputs_root)
    moved = (tmp_path / "at-the-scanner").rename(tmp_path / "on-the-share")  # absolute path: gone
    found = _lookup(moved / "results" / "case-1", moved)
    assert found == slides.SlideLookup(
        moved / "slides" / "case-1.png",
        "Slide found where this output recorded it: `slides/case-1.png` (same size and quick hash as recorded).",
    )


def test_an_output_folder_moved_alone_finds_its_slide_by_the_absolute_path(tmp_path, outputs_root):
    project = make_project(tmp_path, outputs_root)
    archived = project / "archive" / "2026"
    archived.mkdir(parents=True)
    folder = shutil.move(project / "results" / "case-1", archived / "case-1")
    assert _lookup(folder, project).path == project / "slides" / "case-1.png"


def test_a_moved_slide_is_said_and_found_by_name_next_to_the_output(tmp_path, outputs_root):
    project = make_project(tmp_path, outputs_root)
    folder = project / "results" / "case-1"
    (project / "elsewhere").mkdir()
    shutil.move(project / "slides" / "case-1.png", project / "elsewhere" / "case-1.png")
    lost = _lookup(folder, project)
    assert lost == slides.SlideLookup(
        None,
        "case-1.png is no longer where this output recorded it, nor next to the output folder "
        f"(moved or deleted): {TYPE_IT}",
    )
    shutil.move(project / "elsewhere" / "case-1.png", project / "results" / "case-1.png")
    assert _lookup(folder, project) == slides.SlideLookup(
        project / "results" / "case-1.png",
        "Slide found by its name next to the output folder: `results/case-1.png` "
        "(same size and quick hash as recorded).",
    )


def test_another_file_in_the_slides_place_is_not_taken_for_it(tmp_path, outputs_root):
    project = make_project(tmp_path, outputs_root)
    slide = project / "slides" / "case-1.png"
    recorded = slide.stat().st_size
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(slide)  # another scan under the same name
    output = slides.load_output(project / "results" / "case-1")
    differs = f"{slide.stat().st_size} bytes, the slide had {recorded}"
    assert slides.locate_slide(output, project) == slides.SlideLookup(
        None,
        f"`slides/case-1.png` is not the slide this output was made from ({differs}); {TYPE_IT}",
    )
    assert slides.typed_slide_mismatch(output, slide) == differs


def test_a_slide_outside_the_files_root_is_neither_read_nor_named(slide_project, monkeypatch):
    def read(*args):
        pytest.fail("read a file outside the files root")

    monkeypatch.setattr(slides, "slide_file_mismatch", read)
    files_root = slide_project / "results"
    lost = _lookup(files_root / "case-1", files_root)
    assert lost == slides.SlideLookup(
        None,
        f"case-1.png lies outside {files_root}, the only folder this dashboard shows files from: "
        f"start `cmdfed dashboard --files-root DIR` with a folder that holds it, or {TYPE_IT}",
    )
    assert "slides" not in lost.message


def test_outputs_of_older_versions_find_their_slide_by_name(outputs_root, tmp_path):
    assert _lookup(outputs_root / "case-1", outputs_root) == slides.SlideLookup(
        outputs_root / "case-1.png",
        "Slide found by its name next to the output folder: `case-1.png` "
        "(this output records no slide to check it against).",
    )
    folder = shutil.copytree(outputs_root / "case-1", tmp_path / "case-1")
    assert _lookup(folder, tmp_path) == slides.SlideLookup(
        None,
        "This output does not record where case-1.png was (an older cmdfed wrote it) and no "
        f"case-1.png lies next to its folder: {TYPE_IT}",
    )
    summary = json.loads((folder / "summary.json").read_text())
    damaged = {**summary, "slide_file": {"relative_path": 7}}
    (folder / "summary.json").write_text(json.dumps(damaged))
    assert _lookup(folder, tmp_path).message.startswith(
        "This output's record of where case-1.png was is damaged and no case-1.png lies next to"
    )
