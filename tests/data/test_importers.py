"""Dataset importers, each fed small files written in its dataset's real on-disk format."""

from __future__ import annotations

import inspect
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import tifffile
from PIL import Image

from cmdfed.data.importers import (
    IMPORTERS,
    import_consep,
    import_folder,
    import_lizard,
    import_monuseg,
    import_pannuke,
)
from cmdfed.data.importers.common import cut_tiles
from cmdfed.data.store import SiteStore
from cmdfed.errors import CmdfedError

RNG = np.random.default_rng(0)


def random_rgb(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def all_tiles(store_path: Path) -> list:
    store = SiteStore.open(store_path)
    return [store.tile(i) for i in range(len(store))]


def tile_at(tiles: list, slide_id: str, x: int, y: int):
    (match,) = [t for t in tiles if t.slide_id == slide_id and t.x == x and t.y == y]
    return match


def assert_sequential(instances: np.ndarray) -> None:
    ids = np.unique(instances[instances > 0])
    assert ids.tolist() == list(range(1, ids.size + 1))


def no_leftovers(folder: Path) -> list[str]:
    """Hidden siblings a staged import might have left behind."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# -- tiling ----------------------------------------------------------------------------------


def test_cut_tiles_covers_the_image_with_crops_of_it():
    image = random_rgb(100, 70)
    cuts = list(cut_tiles(image, None, None, 32, 0))
    assert [(c.y, c.x) for c in cuts] == [(y, x) for y in (0, 32, 64, 68) for x in (0, 32, 38)]
    for cut in cuts:
        np.testing.assert_array_equal(cut.image, image[cut.y : cut.y + 32, cut.x : cut.x + 32])
        assert cut.instances is None and cut.types is None


def test_cut_tiles_renumbers_instances_and_keeps_a_crossing_nucleus_in_both_tiles():
    instances = np.zeros((32, 64), np.int32)
    instances[10:15, 28:36] = 500  # crosses the edge at x = 32
    instances[20:24, 40:44] = 7
    instances[2:4, 2:4] = 9000
    types = (instances > 0).astype(np.uint8) * 3
    left, right = cut_tiles(random_rgb(32, 64), instances, types, 32, 0)
    assert_sequential(left.instances)
    assert_sequential(right.instances)
    assert np.unique(left.instances).tolist() == [0, 1, 2]
    assert np.unique(right.instances).tolist() == [0, 1, 2]
    # The crossing nucleus: 4 columns on each side, one id per tile.
    assert np.unique(left.instances[10:15, 28:32]).size == 1 and left.instances[10, 28] > 0
    assert np.unique(right.instances[10:15, 0:4]).size == 1 and right.instances[10, 0] > 0
    assert np.count_nonzero(left.instances == left.instances[10, 28]) == 5 * 4
    assert np.count_nonzero(right.instances == right.instances[10, 0]) == 5 * 4
    np.testing.assert_array_equal(right.types, types[:, 32:])


def test_small_image_is_padded_with_white_background():
    image = random_rgb(20, 40)
    instances = np.zeros((20, 40), np.int32)
    instances[15:20, 0:5] = 3
    cuts = list(cut_tiles(image, instances, None, 32, 0))
    assert [(c.x, c.y) for c in cuts] == [(0, 0), (8, 0)]
    first = cuts[0]
    np.testing.assert_array_equal(first.image[:20], image[:, :32])
    assert (first.image[20:] == 255).all()
    assert (first.instances[20:] == 0).all()
    assert np.count_nonzero(first.instances) == 25


@pytest.mark.parametrize("overlap", [-1, 32])
def test_overlap_must_leave_a_positive_stride(overlap):
    with pytest.raises(CmdfedError, match="overlap"):
        list(cut_tiles(random_rgb(64, 64), None, None, 32, overlap))


# -- PanNuke ---------------------------------------------------------------------------------

PANNUKE_TISSUES = ["Breast", "Colon", "Adrenal_gland"]


def write_pannuke_fold(root: Path, nested: bool = True, n: int = 3) -> Path:
    """A fold as released: float64 images and masks, str tissue types, nested folders."""
    fold = root / "Fold 1"
    image_dir = fold / "images" / "fold1" if nested else fold
    mask_dir = fold / "masks" / "fold1" if nested else fold
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    images = RNG.integers(0, 256, (n, 256, 256, 3)).astype(np.float64)
    masks = np.zeros((n, 256, 256, 6), np.float64)
    # Patch 0: the same id 5 in the neoplastic and inflammatory channels.
    masks[0, 10:20, 10:20, 0] = 5
    masks[0, 50:60, 50:60, 1] = 5
    masks[0, 100:110, 200:210, 4] = 2
    # Patch 1: a connective nucleus across the middle (x = 128), a dead one elsewhere.
    masks[1, 60:70, 120:136, 2] = 11
    masks[1, 200:210, 20:30, 3] = 12
    masks[..., 5] = (masks[..., :5].sum(-1) == 0).astype(np.float64)
    np.save(image_dir / "images.npy", images)
    np.save(image_dir / "types.npy", np.array(PANNUKE_TISSUES[:n]))
    np.save(mask_dir / "masks.npy", masks)
    return fold


def test_pannuke_import(tmp_path):
    fold = write_pannuke_fold(tmp_path)
    seen = []
    info = import_pannuke(fold, tmp_path / "site.zarr", progress=lambda d, t, w: seen.append((d, t)))
    assert seen[-1] == (3, 3)
    assert info.tiles == 3 and info.labelled == 3 and info.has_types
    assert info.class_names == [
        "background",
        "neoplastic",
        "inflammatory",
        "connective",
        "dead",
        "epithelial",
    ]
    assert info.mpp == 0.25 and info.sources == {"pannuke": 3} and info.name == "site"
    tiles = all_tiles(tmp_path / "site.zarr")
    assert [t.tissue for t in tiles] == PANNUKE_TISSUES
    assert [t.slide_id for t in tiles] == ["Fold 1/0", "Fold 1/1", "Fold 1/2"]
    assert all(t.x == 0 and t.y == 0 and t.mpp == pytest.approx(0.25) for t in tiles)
    np.testing.assert_array_equal(tiles[0].image, np.load(fold / "images/fold1/images.npy")[0].astype(np.uint8))
    first = tiles[0]
    # Colliding id 5 in two channels became two distinct nuclei.
    neoplastic, inflammatory = first.instances[15, 15], first.instances[55, 55]
    assert neoplastic != inflammatory and neoplastic > 0 and inflammatory > 0
    assert np.unique(first.instances).tolist() == [0, 1, 2, 3]
    assert first.types[15, 15] == 1 and first.types[55, 55] == 2 and first.types[105, 205] == 5
    assert np.count_nonzero(first.instances == neoplastic) == 100
    np.testing.assert_array_equal(first.types > 0, first.instances > 0)
    assert tiles[1].types[65, 125] == 3 and tiles[1].types[205, 25] == 4
    assert not tiles[2].instances.any()


@pytest.mark.parametrize(("tile_size", "overlap", "per_patch"), [(128, 0, 4), (128, 64, 9), (512, 0, 1)])
def test_pannuke_tile_counts(tmp_path, tile_size, overlap, per_patch):
    fold = write_pannuke_fold(tmp_path, n=2)
    info = import_pannuke(fold, tmp_path / "s.zarr", tile_size=tile_size, overlap=overlap)
    assert info.tiles == 2 * per_patch
    if tile_size == 128 and overlap == 0:
        tiles = all_tiles(tmp_path / "s.zarr")
        left, right = tile_at(tiles, "Fold 1/1", 0, 0), tile_at(tiles, "Fold 1/1", 128, 0)
        # The connective nucleus at columns 120-135 appears in both top tiles, renumbered.
        assert np.count_nonzero(left.instances) == 10 * 8 and left.types[65, 125] == 3
        assert np.count_nonzero(right.instances) == 10 * 8 and right.types[65, 0] == 3
        assert left.instances.max() == 1 and right.instances.max() == 1
    if tile_size == 512:
        (tile,) = [t for t in all_tiles(tmp_path / "s.zarr") if t.slide_id == "Fold 1/0"]
        assert tile.tissue_fraction == pytest.approx(0.25)
        assert (tile.image[256:] == 255).all()


def test_pannuke_accepts_files_side_by_side(tmp_path):
    fold = write_pannuke_fold(tmp_path, nested=False, n=2)
    assert import_pannuke(fold, tmp_path / "s.zarr").tiles == 2


def test_pannuke_text_file_as_npy(tmp_path):
    fold = write_pannuke_fold(tmp_path, n=2)
    (fold / "masks/fold1/masks.npy").write_text("not an array\n")
    with pytest.raises(CmdfedError, match=r"masks\.npy is not a NumPy \.npy file"):
        import_pannuke(fold, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_pannuke_truncated_npy(tmp_path):
    fold = write_pannuke_fold(tmp_path, n=2)
    images = fold / "images/fold1/images.npy"
    images.write_bytes(images.read_bytes()[:5000])
    with pytest.raises(CmdfedError, match=r"cannot read .*images\.npy \(mmap length .*truncated"):
        import_pannuke(fold, tmp_path / "s.zarr")


def test_pannuke_arrays_of_different_folds(tmp_path):
    fold = write_pannuke_fold(tmp_path, n=2)
    np.save(fold / "images/fold1/types.npy", np.array(["Breast"]))
    with pytest.raises(CmdfedError, match="names 1 tissues for 2 images"):
        import_pannuke(fold, tmp_path / "s.zarr")


def test_pannuke_parent_of_several_folds(tmp_path):
    write_pannuke_fold(tmp_path / "PanNuke" / "a", n=2)
    write_pannuke_fold(tmp_path / "PanNuke" / "b", n=2)
    with pytest.raises(CmdfedError, match="2 files named images.npy.*pass one fold folder"):
        import_pannuke(tmp_path / "PanNuke", tmp_path / "s.zarr")


def test_pannuke_missing_folder(tmp_path):
    with pytest.raises(CmdfedError, match=r"Fold 9 does not exist"):
        import_pannuke(tmp_path / "Fold 9", tmp_path / "s.zarr")


# -- CoNSeP ----------------------------------------------------------------------------------


def write_consep_split(root: Path, name: str = "train_1", height: int = 64, width: int = 96) -> Path:
    """A split as released: RGBA PNGs and v5 .mat labels with all four keys."""
    split = root / "CoNSeP" / "Train"
    (split / "Images").mkdir(parents=True, exist_ok=True)
    (split / "Labels").mkdir(exist_ok=True)
    (split / "Overlay").mkdir(exist_ok=True)
    rgba = np.dstack([random_rgb(height, width), np.full((height, width), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(split / "Images" / f"{name}.png")
    inst_map = np.zeros((height, width))
    type_map = np.zeros((height, width), np.int32)
    nuclei = {
        1: ((5, 10, 5, 10), 4),
        2: ((20, 30, 28, 36), 6),
        3: ((40, 45, 70, 75), 2),
        4: ((50, 55, 5, 9), 3),
    }
    for nucleus, ((y0, y1, x0, x1), cls) in nuclei.items():
        inst_map[y0:y1, x0:x1] = nucleus
        type_map[y0:y1, x0:x1] = cls
    scipy.io.savemat(
        split / "Labels" / f"{name}.mat",
        {
            "inst_map": inst_map,
            "type_map": type_map,
            "inst_type": np.array([[c] for _, c in nuclei.values()], np.float64),
            "inst_centroid": np.array([[(x0 + x1) / 2, (y0 + y1) / 2] for (y0, y1, x0, x1), _ in nuclei.values()]),
        },
    )
    return split


def test_consep_import_merges_classes(tmp_path):
    split = write_consep_split(tmp_path)
    info = import_consep(split, tmp_path / "c.zarr", tile_size=32)
    assert info.tiles == 2 * 3 and info.class_names == [
        "background",
        "other",
        "inflammatory",
        "epithelial",
        "spindle-shaped",
    ]
    tiles = all_tiles(tmp_path / "c.zarr")
    assert {(t.x, t.y) for t in tiles} == {(x, y) for x in (0, 32, 64) for y in (0, 32)}
    assert all(t.source == "consep" and t.slide_id == "train_1" and t.tissue == "Colon" for t in tiles)
    assert all(t.mpp == pytest.approx(0.25) for t in tiles)
    rgba = np.asarray(Image.open(split / "Images/train_1.png"))
    top_left = tile_at(tiles, "train_1", 0, 0)
    np.testing.assert_array_equal(top_left.image, rgba[:32, :32, :3])
    assert top_left.types[7, 7] == 3  # dysplastic/malignant epithelial -> epithelial
    # Muscle -> spindle-shaped, on both sides of the tile edge the nucleus crosses.
    assert top_left.types[25, 30] == 4
    assert tile_at(tiles, "train_1", 32, 0).types[25, 2] == 4
    assert tile_at(tiles, "train_1", 64, 32).types[10, 8] == 2  # inflammatory stays
    assert tile_at(tiles, "train_1", 0, 32).types[20, 6] == 3  # healthy epithelial -> epithelial
    for tile in tiles:
        assert_sequential(tile.instances)


def test_consep_import_keeps_original_classes(tmp_path):
    split = write_consep_split(tmp_path)
    info = import_consep(split, tmp_path / "c.zarr", tile_size=32, merge_classes=False)
    assert len(info.class_names) == 8
    tiles = all_tiles(tmp_path / "c.zarr")
    assert tile_at(tiles, "train_1", 0, 0).types[7, 7] == 4
    assert info.class_names[4] == "dysplastic/malignant epithelial"
    assert tile_at(tiles, "train_1", 0, 0).types[25, 30] == 6


def test_consep_root_with_splits_is_refused(tmp_path):
    write_consep_split(tmp_path)
    with pytest.raises(CmdfedError, match="splits Train; import each"):
        import_consep(tmp_path / "CoNSeP", tmp_path / "c.zarr")


def test_consep_missing_labels_folder(tmp_path):
    split = write_consep_split(tmp_path)
    for f in (split / "Labels").iterdir():
        f.unlink()
    (split / "Labels").rmdir()
    with pytest.raises(CmdfedError, match="has no Labels/"):
        import_consep(split, tmp_path / "c.zarr")


def test_consep_mat_without_type_map(tmp_path):
    split = write_consep_split(tmp_path)
    scipy.io.savemat(split / "Labels/train_1.mat", {"inst_map": np.zeros((64, 96))})
    with pytest.raises(CmdfedError, match=r"train_1\.mat has no variable 'type_map' \(it holds: inst_map\)"):
        import_consep(split, tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists() and not no_leftovers(tmp_path)


def test_consep_text_file_as_mat(tmp_path):
    split = write_consep_split(tmp_path)
    (split / "Labels/train_1.mat").write_text("inst_map = 1\n")
    with pytest.raises(CmdfedError, match=r"train_1\.mat is not a readable MATLAB \.mat file"):
        import_consep(split, tmp_path / "c.zarr")


def test_consep_truncated_mat(tmp_path):
    split = write_consep_split(tmp_path)
    mat = split / "Labels/train_1.mat"
    mat.write_bytes(mat.read_bytes()[:1000])
    with pytest.raises(CmdfedError, match=r"train_1\.mat is not a readable MATLAB \.mat file"):
        import_consep(split, tmp_path / "c.zarr")


def test_consep_label_shape_mismatch(tmp_path):
    split = write_consep_split(tmp_path)
    scipy.io.savemat(
        split / "Labels/train_1.mat",
        {"inst_map": np.zeros((60, 96)), "type_map": np.zeros((60, 96))},
    )
    with pytest.raises(CmdfedError, match=r"train_1\.mat is 96x60 px but its image .*train_1\.png is 96x64"):
        import_consep(split, tmp_path / "c.zarr")


def test_consep_unreadable_image(tmp_path):
    split = write_consep_split(tmp_path)
    (split / "Images/train_1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(CmdfedError, match=r"cannot read image .*train_1\.png"):
        import_consep(split, tmp_path / "c.zarr")


def test_consep_truncated_image(tmp_path):
    split = write_consep_split(tmp_path)
    png = split / "Images/train_1.png"
    png.write_bytes(png.read_bytes()[:-2000])
    with pytest.raises(CmdfedError, match=r"cannot read image .*train_1\.png"):
        import_consep(split, tmp_path / "c.zarr")


# -- MoNuSeg ---------------------------------------------------------------------------------

MONUSEG_NAME = "TCGA-A7-A13E-01Z-00-DX1"


def circle(cx: float, cy: float, radius: float, n: int = 40) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)


def polygon_area(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def aperio_xml(polygons: list[np.ndarray]) -> str:
    regions = "".join(
        f'<Region Id="{i}" Type="0" Zoom="0.5" Selected="0" ImageLocation="" ImageFocus="-1" '
        'Length="44.5" Area="152.4" LengthMicrons="11.2" AreaMicrons="9.7" Text="" '
        f'NegativeROA="0" InputRegionId="0" Analyze="0" DisplayId="{i}">\n'
        "<Attributes/>\n<Vertices>\n"
        + "".join(f'<Vertex X="{x:.6f}" Y="{y:.6f}" Z="0"/>\n' for x, y in vertices)
        + "</Vertices>\n</Region>\n"
        for i, vertices in enumerate(polygons, start=1)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Annotations MicronsPerPixel="0.252100">\n'
        '<Annotation Id="1" Name="" ReadOnly="0" NameReadOnly="0" LineColorReadOnly="0" '
        'Incremental="0" Type="4" LineColor="65280" Visible="1" Selected="1" MarkupImagePath="" '
        'MacroName="">\n'
        '<Attributes>\n<Attribute Name="Description" Id="0" Value=""/>\n</Attributes>\n'
        "<Regions>\n<RegionAttributeHeaders>\n"
        '<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>\n'
        "</RegionAttributeHeaders>\n" + regions + "</Regions>\n<Plots/>\n</Annotation>\n</Annotations>\n"
    )


MONUSEG_POLYGONS = [circle(30.3, 40.7, 12.0), circle(80.5, 60.2, 9.0), circle(88.0, 60.2, 6.0)]


def write_monuseg(root: Path, polygons: list[np.ndarray] = MONUSEG_POLYGONS) -> Path:
    """The training release: RGB .tif in 'Tissue Images', ImageScope .xml in 'Annotations'."""
    folder = root / "MoNuSeg 2018 Training Data"
    (folder / "Tissue Images").mkdir(parents=True)
    (folder / "Annotations").mkdir()
    tifffile.imwrite(folder / "Tissue Images" / f"{MONUSEG_NAME}.tif", random_rgb(100, 120), photometric="rgb")
    (folder / "Annotations" / f"{MONUSEG_NAME}.xml").write_text(aperio_xml(polygons))
    return folder


def test_monuseg_import_rasterises_polygons(tmp_path):
    folder = write_monuseg(tmp_path)
    info = import_monuseg(folder, tmp_path / "m.zarr", tile_size=128)
    assert info.tiles == 1 and not info.has_types and info.class_names == ["background", "nucleus"]
    assert info.mpp == 0.25
    (tile,) = all_tiles(tmp_path / "m.zarr")
    assert (tile.slide_id, tile.source, tile.x, tile.y) == (MONUSEG_NAME, "monuseg", 0, 0)
    assert tile.mpp == pytest.approx(0.2521)  # from the XML's MicronsPerPixel
    np.testing.assert_array_equal(
        tile.image[:100, :120], tifffile.imread(folder / "Tissue Images" / f"{MONUSEG_NAME}.tif")
    )
    assert tile.instances[41, 30] == 1
    assert np.count_nonzero(tile.instances == 1) == pytest.approx(polygon_area(MONUSEG_POLYGONS[0]), rel=0.05)
    # The third circle overlaps the second and, being later, overwrites it there.
    assert tile.instances[60, 88] == 3 and tile.instances[60, 76] == 2
    assert np.count_nonzero(tile.instances == 3) == pytest.approx(polygon_area(MONUSEG_POLYGONS[2]), rel=0.08)
    assert np.count_nonzero(tile.instances == 2) < polygon_area(MONUSEG_POLYGONS[1])
    assert tile.tissue_fraction == pytest.approx(100 * 120 / 128**2)


def test_monuseg_tiles_split_a_polygon(tmp_path):
    folder = write_monuseg(tmp_path)
    info = import_monuseg(folder, tmp_path / "m.zarr", tile_size=64)
    assert info.tiles == 4  # rows at 0 and 36, columns at 0 and 56
    tiles = all_tiles(tmp_path / "m.zarr")
    assert {(t.x, t.y) for t in tiles} == {(0, 0), (56, 0), (0, 36), (56, 36)}
    # The first circle (rows 29-52) is in both the top-left and the bottom-left tile.
    top, bottom = tile_at(tiles, MONUSEG_NAME, 0, 0), tile_at(tiles, MONUSEG_NAME, 0, 36)
    assert top.instances[41, 30] > 0 and bottom.instances[41 - 36, 30] > 0
    for tile in tiles:
        assert_sequential(tile.instances)


def test_monuseg_test_release_layout_side_by_side(tmp_path):
    folder = tmp_path / "MoNuSegTestData"
    folder.mkdir()
    tifffile.imwrite(folder / f"{MONUSEG_NAME}.tif", random_rgb(64, 64), photometric="rgb")
    (folder / f"{MONUSEG_NAME}.xml").write_text(aperio_xml([circle(30, 30, 5)]))
    assert import_monuseg(folder, tmp_path / "m.zarr", tile_size=64).nuclei == 1


def test_monuseg_bad_xml(tmp_path):
    folder = write_monuseg(tmp_path)
    (folder / "Annotations" / f"{MONUSEG_NAME}.xml").write_text("<Annotations><Annotation>")
    with pytest.raises(CmdfedError, match=rf"{MONUSEG_NAME}\.xml is not a readable XML file"):
        import_monuseg(folder, tmp_path / "m.zarr")


def test_monuseg_annotation_of_another_image(tmp_path):
    folder = write_monuseg(tmp_path, polygons=[circle(500, 700, 10)])
    with pytest.raises(CmdfedError, match=r"polygon 1 lies wholly outside its image .*120x100 px"):
        import_monuseg(folder, tmp_path / "m.zarr")


def test_monuseg_image_without_annotation(tmp_path):
    folder = write_monuseg(tmp_path)
    tifffile.imwrite(folder / "Tissue Images" / "TCGA-XX.tif", random_rgb(10, 10), photometric="rgb")
    with pytest.raises(CmdfedError, match=r"unpaired files .*TCGA-XX\.tif \(no annotation \.xml file\)"):
        import_monuseg(folder, tmp_path / "m.zarr")


def test_monuseg_unreadable_tif(tmp_path):
    folder = write_monuseg(tmp_path)
    (folder / "Tissue Images" / f"{MONUSEG_NAME}.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(CmdfedError, match=rf"cannot read image .*{MONUSEG_NAME}\.tif"):
        import_monuseg(folder, tmp_path / "m.zarr")


# -- Lizard ----------------------------------------------------------------------------------


def write_lizard(root: Path, download_layout: bool = True) -> Path:
    """Lizard as unzipped (or tidied into images/ + labels/), with the real .mat keys."""
    folder = root / "Lizard"
    image_dir = folder / "lizard_images1" / "Lizard_Images1" if download_layout else folder / "images"
    label_dir = folder / "lizard_labels" / "Lizard_Labels" / "Labels" if download_layout else folder / "labels"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    Image.fromarray(random_rgb(40, 70)).save(image_dir / "consep_1.png")
    inst_map = np.zeros((40, 70), np.int32)
    boxes = {3: (2, 8, 2, 8), 9: (10, 20, 28, 40), 4: (30, 36, 60, 66)}
    for nucleus, (y1, y2, x1, x2) in boxes.items():
        inst_map[y1:y2, x1:x2] = nucleus
    ids = np.array([[9], [3], [4]], np.int32)  # not in map order: the lookup must use 'id'
    classes = np.array([[6], [1], [5]], np.int32)
    scipy.io.savemat(
        label_dir / "consep_1.mat",
        {
            "inst_map": inst_map,
            "id": ids,
            "class": classes,
            "bbox": np.array([boxes[int(i)] for i in ids[:, 0]], np.int32),
            "centroid": np.array([[(b[2] + b[3]) / 2, (b[0] + b[1]) / 2] for b in (boxes[int(i)] for i in ids[:, 0])]),
        },
    )
    return folder


@pytest.mark.parametrize("download_layout", [True, False])
def test_lizard_import_types_from_ids(tmp_path, download_layout):
    folder = write_lizard(tmp_path, download_layout)
    info = import_lizard(folder, tmp_path / "l.zarr", tile_size=32)
    assert info.tiles == 2 * 3 and info.mpp == 0.5
    assert info.class_names[1:] == [
        "neutrophil",
        "epithelial",
        "lymphocyte",
        "plasma",
        "eosinophil",
        "connective",
    ]
    tiles = all_tiles(tmp_path / "l.zarr")
    assert all(t.source == "lizard" and t.tissue == "Colon" and t.mpp == pytest.approx(0.5) for t in tiles)
    assert {(t.x, t.y) for t in tiles} == {(x, y) for x in (0, 32, 38) for y in (0, 8)}
    top_left = tile_at(tiles, "consep_1", 0, 0)
    assert top_left.types[5, 5] == 1  # nucleus 3: neutrophil
    assert top_left.types[15, 30] == 6  # nucleus 9: connective, cut at x = 32
    assert tile_at(tiles, "consep_1", 32, 0).types[15, 2] == 6
    assert tile_at(tiles, "consep_1", 38, 8).types[30 - 8, 62 - 38] == 5  # nucleus 4: eosinophil
    for tile in tiles:
        np.testing.assert_array_equal(tile.types > 0, tile.instances > 0)


def test_lizard_nucleus_without_class(tmp_path):
    folder = write_lizard(tmp_path)
    mat = next(folder.rglob("*.mat"))
    content = scipy.io.loadmat(mat)
    content["id"], content["class"] = content["id"][:2], content["class"][:2]
    scipy.io.savemat(mat, {k: v for k, v in content.items() if not k.startswith("__")})
    with pytest.raises(CmdfedError, match=r"consep_1\.mat: nuclei 4 of inst_map are missing from 'id'"):
        import_lizard(folder, tmp_path / "l.zarr")


def test_lizard_mat_without_class(tmp_path):
    folder = write_lizard(tmp_path)
    mat = next(folder.rglob("*.mat"))
    scipy.io.savemat(mat, {"inst_map": np.zeros((40, 70), np.int32), "id": np.zeros((0, 1))})
    with pytest.raises(CmdfedError, match=r"consep_1\.mat has no variable 'class'.*Lizard label file"):
        import_lizard(folder, tmp_path / "l.zarr")


def test_lizard_matlab_v73_file(tmp_path):
    folder = write_lizard(tmp_path)
    mat = next(folder.rglob("*.mat"))
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    mat.write_bytes(header.ljust(116, b" ") + b"\x00" * 8 + struct.pack("<H", 0x0200) + b"IM" + b"\x00" * 384)
    with pytest.raises(CmdfedError, match=r"consep_1\.mat is a MATLAB v7\.3 \(HDF5\) file.*'-v7'"):
        import_lizard(folder, tmp_path / "l.zarr")


# -- folder ----------------------------------------------------------------------------------


def write_folder_pair(
    folder: Path, name: str, height: int, width: int, *, tiff: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """An image and its uint16 instance mask; TIFF images are written planar (RGB planes first)."""
    folder.mkdir(exist_ok=True)
    image = random_rgb(height, width)
    instances = np.zeros((height, width), np.uint16)
    instances[4:12, 4:12] = 300  # beyond 8 bits: needs the 16-bit mask
    instances[20:28, 28:36] = 1000
    if tiff:
        planes = np.moveaxis(image, -1, 0)
        tifffile.imwrite(folder / f"{name}.tif", planes, photometric="rgb", planarconfig="separate")
        tifffile.imwrite(folder / f"{name}_inst.tif", instances)
    else:
        Image.fromarray(image).save(folder / f"{name}.png")
        Image.fromarray(instances).save(folder / f"{name}_inst.png")
    return image, instances


def test_folder_import_png_and_tiff_pairs(tmp_path):
    folder = tmp_path / "site"
    write_folder_pair(folder, "a", 64, 64)
    b_image, _ = write_folder_pair(folder, "b", 40, 70, tiff=True)
    info = import_folder(folder, tmp_path / "f.zarr", tile_size=32, mpp=0.5, tissue="Brain")
    assert info.tiles == 4 + 6 and info.labelled == 10 and not info.has_types
    assert info.sources == {"site": 10} and info.mpp == 0.5
    tiles = all_tiles(tmp_path / "f.zarr")
    assert {t.slide_id for t in tiles} == {"a", "b"} and all(t.tissue == "Brain" for t in tiles)
    a = tile_at(tiles, "a", 0, 0)
    assert np.count_nonzero(a.instances == a.instances[5, 5]) == 64 and a.instances[5, 5] == 1
    # Nucleus 1000 spans x 28-35: both top tiles of 'a' hold part of it.
    assert tile_at(tiles, "a", 0, 0).instances[21, 29] > 0 and tile_at(tiles, "a", 32, 0).instances[21, 1] > 0
    # In 'b' (70 px wide) the last column of tiles starts at 38, past that nucleus (x 28-35).
    assert tile_at(tiles, "b", 32, 8).instances[20 - 8, 33 - 32] > 0
    assert not tile_at(tiles, "b", 38, 8).instances.any()
    np.testing.assert_array_equal(tile_at(tiles, "b", 38, 8).image, b_image[8:40, 38:70])
    for tile in tiles:
        assert_sequential(tile.instances)


def test_folder_types_need_class_names(tmp_path):
    folder = tmp_path / "site"
    _, instances = write_folder_pair(folder, "a", 32, 32)
    Image.fromarray(np.where(instances == 300, 2, np.where(instances > 0, 1, 0)).astype(np.uint8)).save(
        folder / "a_types.png"
    )
    with pytest.raises(CmdfedError, match="pass class_names"):
        import_folder(folder, tmp_path / "f.zarr", tile_size=32)
    info = import_folder(folder, tmp_path / "f.zarr", tile_size=32, class_names=["background", "tumour", "immune"])
    assert info.has_types
    (tile,) = all_tiles(tmp_path / "f.zarr")
    assert tile.types[5, 5] == 2 and tile.types[22, 30] == 1
    with pytest.raises(CmdfedError, match="holds class 2 but only 1 classes are named"):
        import_folder(folder, tmp_path / "g.zarr", tile_size=32, class_names=["background", "nucleus"])


def test_folder_unlabelled_images(tmp_path):
    folder = tmp_path / "site"
    write_folder_pair(folder, "a", 32, 32)
    Image.fromarray(random_rgb(32, 32)).save(folder / "b.png")
    with pytest.raises(CmdfedError, match=r"images without an instance mask .*: b\.png; .*allow_unlabelled"):
        import_folder(folder, tmp_path / "f.zarr", tile_size=32)
    info = import_folder(folder, tmp_path / "f.zarr", tile_size=32, allow_unlabelled=True)
    assert info.tiles == 2 and info.labelled == 1
    store = SiteStore.open(tmp_path / "f.zarr")
    assert store.metadata("labelled").tolist() == [True, False]
    assert np.isnan(store.tile(1).mpp)


def test_folder_custom_suffix(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    Image.fromarray(random_rgb(32, 32)).save(folder / "x.png")
    Image.fromarray(np.ones((32, 32), np.uint8)).save(folder / "x_label.png")
    assert import_folder(folder, tmp_path / "f.zarr", tile_size=32, inst_suffix="_label").nuclei == 1


def test_folder_shape_mismatch(tmp_path):
    folder = tmp_path / "site"
    write_folder_pair(folder, "a", 32, 32)
    Image.fromarray(np.zeros((30, 32), np.uint16)).save(folder / "a_inst.png")
    with pytest.raises(CmdfedError, match=r"a_inst\.png is 32x30 px but its image .*a\.png is 32x32"):
        import_folder(folder, tmp_path / "f.zarr", tile_size=32)


def test_folder_unreadable_image(tmp_path):
    folder = tmp_path / "site"
    write_folder_pair(folder, "a", 32, 32)
    (folder / "a.png").write_text("this is not a png")
    with pytest.raises(CmdfedError, match=r"cannot read image .*a\.png"):
        import_folder(folder, tmp_path / "f.zarr", tile_size=32)


def test_folder_orphan_mask(tmp_path):
    folder = tmp_path / "site"
    write_folder_pair(folder, "a", 32, 32)
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(folder / "c_inst.png")
    with pytest.raises(CmdfedError, match=r"masks without an image .*c_inst\.png"):
        import_folder(folder, tmp_path / "f.zarr", tile_size=32)


def test_folder_missing(tmp_path):
    with pytest.raises(CmdfedError, match="nowhere does not exist"):
        import_folder(tmp_path / "nowhere", tmp_path / "f.zarr")


# -- writing the store -------------------------------------------------------------------------


def test_interrupted_import_leaves_no_store(tmp_path):
    folder = tmp_path / "site"
    for name in ("a", "b", "c"):
        write_folder_pair(folder, name, 32, 32)

    def interrupt(done, total, what):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_folder(folder, tmp_path / "f.zarr", tile_size=32, progress=interrupt)
    assert not (tmp_path / "f.zarr").exists()
    assert not no_leftovers(tmp_path)


def test_existing_target_is_refused_unless_overwrite(tmp_path):
    folder = tmp_path / "site"
    write_folder_pair(folder, "a", 64, 64)
    import_folder(folder, tmp_path / "f.zarr", tile_size=64)
    with pytest.raises(CmdfedError, match="already exists; .*--overwrite"):
        import_folder(folder, tmp_path / "f.zarr", tile_size=32)
    info = import_folder(folder, tmp_path / "f.zarr", tile_size=32, overwrite=True)
    assert info.tiles == 4 and SiteStore.open(tmp_path / "f.zarr").tile_size == 32
    assert not no_leftovers(tmp_path)


def test_failed_overwrite_keeps_the_old_store(tmp_path):
    folder = tmp_path / "site"
    write_folder_pair(folder, "a", 64, 64)
    import_folder(folder, tmp_path / "f.zarr", tile_size=64)
    (folder / "a_inst.png").write_text("broken")
    with pytest.raises(CmdfedError):
        import_folder(folder, tmp_path / "f.zarr", tile_size=32, overwrite=True)
    assert SiteStore.open(tmp_path / "f.zarr").tile_size == 64


def test_overwrite_never_replaces_something_that_is_not_a_store(tmp_path):
    folder = tmp_path / "site"
    write_folder_pair(folder, "a", 32, 32)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    for target in (precious, folder):
        with pytest.raises(CmdfedError, match="not a cmdfed site store; refusing to replace it"):
            import_folder(folder, target, tile_size=32, overwrite=True)
    assert (precious / "thesis.txt").exists() and (folder / "a.png").exists()


def test_registry_names_every_importer_with_the_common_signature():
    assert set(IMPORTERS) == {"pannuke", "consep", "monuseg", "lizard", "folder"}
    for function in IMPORTERS.values():
        parameters = inspect.signature(function).parameters
        assert list(parameters)[:2] == ["source_path", "store_path"]
        for option, default in (
            ("tile_size", 256),
            ("overlap", 0),
            ("overwrite", False),
            ("progress", None),
        ):
            assert parameters[option].default == default
            assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY
