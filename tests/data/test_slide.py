import numpy as np
import pytest
import tifffile
from PIL import Image

from cmdfed.data.slide import (
    OpenSlideReader,
    TiffReader,
    level_for_mpp,
    open_slide,
    plan_tiles,
    tile_slide,
    tissue_grid,
)
from cmdfed.data.store import SiteStore
from cmdfed.data.synth import synth_tiles
from cmdfed.errors import CmdfedError

H, W = 768, 1024


@pytest.fixture(scope="module")
def slide_pixels() -> np.ndarray:
    """White glass with synthetic H&E tissue in the left half (x < 512)."""
    image = np.full((H, W, 3), 245, np.uint8)
    tiles = list(synth_tiles(12, tile_size=128, seed=3))
    for k, tile in enumerate(tiles):
        r, c = divmod(k, 4)
        image[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128] = tile.image
    image[384:, :512] = image[:384, :512]
    return image


@pytest.fixture(scope="module")
def pyramid_tiff(slide_pixels, tmp_path_factory):
    """A tiled pyramidal TIFF (levels 1, 1/2, 1/4) with 0.5 um/px in its resolution tags."""
    path = tmp_path_factory.mktemp("slides") / "slide.tif"
    with tifffile.TiffWriter(path) as tif:
        opts = {"tile": (128, 128), "photometric": "rgb", "compression": "zlib"}
        tif.write(slide_pixels, subifds=2, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", **opts)
        for factor in (2, 4):
            tif.write(slide_pixels[::factor, ::factor], subfiletype=1, **opts)
    return path


def test_a_screen_resolution_in_a_tiff_is_not_taken_for_a_scan_resolution(slide_pixels, tmp_path):
    path = tmp_path / "exported.tif"
    tifffile.imwrite(path, slide_pixels[:256, :256], photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with TiffReader(path) as reader:
        assert np.isnan(reader.mpp)  # 72 dpi would be 353 um/px: areas off by 10^5


def test_tiff_reader_reads_levels_regions_and_mpp(pyramid_tiff, slide_pixels):
    with TiffReader(pyramid_tiff) as reader:
        assert reader.level_dimensions == [(W, H), (W // 2, H // 2), (W // 4, H // 4)]
        assert reader.mpp == pytest.approx(0.5)
        assert np.array_equal(reader.read_region(100, 50, 0, 64, 32), slide_pixels[50:82, 100:164])
        assert np.array_equal(reader.read_region(200, 100, 1, 16, 16), slide_pixels[::2, ::2][50:66, 100:116])
        edge = reader.read_region(W - 10, H - 10, 0, 32, 32)
        assert np.array_equal(edge[:10, :10], slide_pixels[-10:, -10:]) and (edge[10:] == 255).all()


def test_levels_are_read_in_their_own_pixels_and_chosen_for_a_resolution(pyramid_tiff, slide_pixels, tmp_path):
    with TiffReader(pyramid_tiff) as reader:  # levels at 0.5, 1 and 2 um/px
        assert reader.level_mpps == pytest.approx([0.5, 1.0, 2.0])
        assert np.array_equal(reader.read_level_region(25, 10, 2, 8, 8), slide_pixels[::4, ::4][10:18, 25:33])
        # the coarsest level at least as fine, within 5 %; never a coarser one
        assert [level_for_mpp(reader, mpp) for mpp in (0.5, 0.9, 0.97, 1.9, 2.0, 8.0)] == [0, 0, 1, 1, 2, 2]
        assert level_for_mpp(reader, 0.25) == 0  # finer than the slide: its finest level
        corners, grid = tissue_grid(reader, (W // 2, H // 2), 2.0, 64, 0, 0.5)  # a grid at 1 um/px
        assert grid == 8 * 6 and corners and all(x < 256 for x, _, _ in corners)
    with open_slide(pyramid_tiff, mpp=0.25) as reader:
        assert reader.level_mpps == pytest.approx([0.25, 0.5, 1.0])
    unknown = tmp_path / "unknown.tif"
    tifffile.imwrite(unknown, slide_pixels[:64, :64], photometric="rgb")
    with TiffReader(unknown) as reader, pytest.raises(CmdfedError, match="resolution of unknown.tif is unknown"):
        level_for_mpp(reader, 0.5)


def test_tile_slide_keeps_tissue_tiles_with_their_pixels(pyramid_tiff, slide_pixels, tmp_path):
    info = tile_slide(pyramid_tiff, tmp_path / "s.zarr", tile_size=128, min_tissue=0.5)
    store = SiteStore.open(tmp_path / "s.zarr")
    assert info.tiles == len(store) == 4 * 6  # 4 tissue columns x 6 rows of the 8 x 6 grid
    xs, ys = store.metadata("x"), store.metadata("y")
    assert xs.max() < 512 and set(ys.tolist()) == {0, 128, 256, 384, 512, 640}
    for i in (0, 7, 23):
        x, y = int(xs[i]), int(ys[i])
        assert np.array_equal(store.image(i), slide_pixels[y : y + 128, x : x + 128])
    assert set(store.metadata("slide_id")) == {"slide.tif"}  # a name, never a full path
    assert store.metadata("mpp")[0] == pytest.approx(0.5) and info.labelled == 0


def test_higher_level_and_overlap(pyramid_tiff, tmp_path):
    with open_slide(pyramid_tiff) as reader:
        plan = plan_tiles(reader, tile_size=64, level=1, overlap=32, min_tissue=0.5)
        assert plan.stride == 32 and plan.downsample == pytest.approx(2.0)
        assert all(x % 64 == 0 and x < 512 for x, _, _ in plan.corners)  # level-0 coordinates
    info = tile_slide(pyramid_tiff, tmp_path / "l1.zarr", tile_size=64, level=1, overlap=32, min_tissue=0.5)
    assert SiteStore.open(tmp_path / "l1.zarr").metadata("mpp")[0] == pytest.approx(1.0)
    assert info.tiles == len(plan.corners)


def test_tiles_end_flush_with_the_slide_and_only_a_slide_smaller_than_a_tile_is_padded(
    pyramid_tiff, slide_pixels, tmp_path
):
    with open_slide(pyramid_tiff) as reader:  # stride 96: neither W - 128 nor H - 128 is a multiple of it
        corners, grid = tissue_grid(reader, (W, H), 1.0, 128, 32, 0.0)
    xs, ys = {x for x, _, _ in corners}, {y for _, y, _ in corners}
    assert grid == len(corners) == len(xs) * len(ys)
    assert max(xs) + 128 == W and max(ys) + 128 == H  # the last tiles end at the slide's edges, not past them
    Image.fromarray(slide_pixels[:100, :90]).save(tmp_path / "small.png")
    info = tile_slide(tmp_path / "small.png", tmp_path / "small.zarr", tile_size=128, min_tissue=0.5, mpp=0.5)
    tile = SiteStore.open(tmp_path / "small.zarr").image(0)
    assert info.tiles == 1 and np.array_equal(tile[:100, :90], slide_pixels[:100, :90])
    assert (tile[100:] == 255).all() and (tile[:, 90:] == 255).all()  # white past the slide


def test_append_a_second_slide(pyramid_tiff, tmp_path):
    tile_slide(pyramid_tiff, tmp_path / "s.zarr", tile_size=128, min_tissue=0.5)
    info = tile_slide(pyramid_tiff, tmp_path / "s.zarr", tile_size=128, min_tissue=0.5, append=True)
    assert info.tiles == 48
    with pytest.raises(CmdfedError, match="holds 128 px tiles"):
        tile_slide(pyramid_tiff, tmp_path / "s.zarr", tile_size=64, append=True)


def test_plain_image_file(slide_pixels, tmp_path):
    Image.fromarray(slide_pixels).save(tmp_path / "tile.png")
    info = tile_slide(tmp_path / "tile.png", tmp_path / "s.zarr", tile_size=256, min_tissue=0.5, mpp=0.25)
    assert info.tiles == 2 * 3 and info.mpp == pytest.approx(0.25)


def test_unreadable_slides_give_one_clear_error(tmp_path, pyramid_tiff):
    (tmp_path / "garbage.svs").write_bytes(b"this is not a slide" * 100)
    with pytest.raises(CmdfedError, match=r"cannot read slide .*garbage.svs .*supported"):
        open_slide(tmp_path / "garbage.svs")
    with pytest.raises(CmdfedError, match="does not exist"):
        open_slide(tmp_path / "missing.svs")
    data = pyramid_tiff.read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CmdfedError, match="truncated.tif"):
        tile_slide(truncated, tmp_path / "t.zarr", tile_size=128)
    assert not (tmp_path / "t.zarr").exists()


def test_bad_options_and_empty_slides(pyramid_tiff, tmp_path):
    with pytest.raises(CmdfedError, match=r"levels 0..2; level 5 does not exist"):
        tile_slide(pyramid_tiff, tmp_path / "s.zarr", level=5)
    with pytest.raises(CmdfedError, match="overlap"):
        tile_slide(pyramid_tiff, tmp_path / "s.zarr", tile_size=64, overlap=64)
    Image.fromarray(np.full((300, 300, 3), 240, np.uint8)).save(tmp_path / "glass.png")
    with pytest.raises(CmdfedError, match="no tissue found in glass.png"):
        tile_slide(tmp_path / "glass.png", tmp_path / "g.zarr", tile_size=64)


@pytest.mark.network
def test_real_sample_slide_through_openslide(sample_files, tmp_path):
    svs = sample_files["cmu_small_region.svs"]
    with open_slide(svs) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert reader.dimensions == (2220, 2967) and reader.mpp == pytest.approx(0.499)
    info = tile_slide(svs, tmp_path / "cmu.zarr", tile_size=256)
    store = SiteStore.open(tmp_path / "cmu.zarr")
    # The crop is roughly one third tissue: some but not all of its 9 x 12 grid is kept.
    assert 20 <= info.tiles <= 80
    tissue = store.metadata("tissue_fraction")
    assert (tissue >= 0.25).all()
    assert store.image(0).std() > 10  # real texture, not glass
