"""MoNuSeg: 1000x1000 px H&E crops of TCGA slides (40x) with nuclei outlined as polygons.

Source: Kumar et al., "A Multi-Organ Nucleus Segmentation Challenge", IEEE TMI 2020, and the
challenge download (https://monuseg.grand-challenge.org/Data/).

Layout: ``<name>.tif`` RGB images and ``<name>.xml`` annotations, paired by name and found
at any depth, which covers both releases::

    MoNuSeg 2018 Training Data/Tissue Images/<name>.tif  +  .../Annotations/<name>.xml
    MoNuSegTestData/<name>.tif + <name>.xml                  (side by side)

Annotations are Aperio ImageScope XML: every ``Region`` under
``Annotations/Annotation/Regions`` is one nucleus, outlined by its
``Vertices/Vertex`` elements' ``X`` and ``Y`` attributes (float pixel coordinates at full
resolution). The root's ``MicronsPerPixel`` attribute, when present, is the tiles' mpp;
otherwise the ``mpp`` option (0.25, the 40x scan) is used.

Each polygon is filled with ``skimage.draw.polygon`` (pixels whose centres lie inside) and
given the next instance id in file order; where polygons overlap, the later one overwrites
the earlier. Regions with fewer than three vertices outline nothing and are skipped.
MoNuSeg labels nuclei without classes, so the store has no type maps.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import numpy as np
from skimage.draw import polygon

from cmdfed.data.importers.common import (
    ImportPlan,
    SourceImage,
    pair_by_stem,
    run_import,
)
from cmdfed.data.store import StoreInfo
from cmdfed.errors import CmdfedError
from cmdfed.images import read_rgb
from cmdfed.progress import Progress

CLASS_NAMES = ["background", "nucleus"]
MPP = 0.25


def read_annotation(path: Path) -> tuple[list[np.ndarray], float | None]:
    """An ImageScope XML file's polygons as (n, 2) arrays of (x, y), and its MicronsPerPixel."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as exc:
        raise CmdfedError(f"{path} is not a readable XML file ({exc}); re-download the annotations") from exc
    if root.tag != "Annotations":
        raise CmdfedError(f"{path} has root <{root.tag}>, not <Annotations>; is it an Aperio ImageScope XML file?")
    polygons = []
    for number, region in enumerate(root.iterfind("Annotation/Regions/Region"), start=1):
        try:
            vertices = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iterfind("Vertices/Vertex")]
        except (KeyError, ValueError) as exc:
            raise CmdfedError(f"{path}: region {number} has a vertex without numeric X and Y ({exc})") from exc
        if len(vertices) >= 3:
            polygons.append(np.array(vertices))
    mpp_text = root.get("MicronsPerPixel")
    try:
        mpp = float(mpp_text) if mpp_text else None
    except ValueError:
        mpp = None
    return polygons, mpp if mpp and mpp > 0 else None


def check_polygons_fit(polygons: list[np.ndarray], shape: tuple[int, int], xml_file: Path, image_file: Path) -> None:
    """Every polygon must touch the image; one wholly outside means the files are mispaired.

    Nuclei at the border may have vertices a little outside, so only whole polygons count.
    """
    height, width = shape
    for number, vertices in enumerate(polygons, start=1):
        x, y = vertices[:, 0], vertices[:, 1]
        inside = (x >= 0) & (x <= width) & (y >= 0) & (y <= height)
        if not inside.any():
            raise CmdfedError(
                f"{xml_file}: polygon {number} lies wholly outside its image {image_file} "
                f"({width}x{height} px); pair each annotation file with its own image"
            )


def rasterise(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """An instance map, polygon i filled with id i + 1; later polygons overwrite earlier ones."""
    instances = np.zeros(shape, np.int32)
    for instance_id, vertices in enumerate(polygons, start=1):
        rows, cols = polygon(vertices[:, 1], vertices[:, 0], shape=shape)
        instances[rows, cols] = instance_id
    return instances


def import_monuseg(
    source_path: str | Path,
    store_path: str | Path,
    *,
    tile_size: int = 256,
    overlap: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    mpp: float = MPP,
) -> StoreInfo:
    """Import a MoNuSeg folder (.tif images + ImageScope .xml) into a new site store."""

    def plan(root: Path) -> ImportPlan:
        images = [p for p in root.rglob("*") if p.suffix.lower() in (".tif", ".tiff")]
        pairs = pair_by_stem(images, root.rglob("*.xml"), root, "annotation .xml file")
        return ImportPlan(
            items=pairs,
            read=lambda pair: read_pair(*pair, mpp),
            source="monuseg",
            class_names=CLASS_NAMES,
            has_types=False,
            mpp=mpp,
        )

    return run_import(
        source_path,
        store_path,
        plan,
        what="MoNuSeg folder holding the .tif images and .xml annotations",
        tile_size=tile_size,
        overlap=overlap,
        overwrite=overwrite,
        progress=progress,
    )


def read_pair(image_file: Path, xml_file: Path, default_mpp: float) -> SourceImage:
    """An image and its rasterised annotation; the annotation's resolution, when it states one,
    wins over ``default_mpp``."""
    image = read_rgb(image_file)
    polygons, xml_mpp = read_annotation(xml_file)
    check_polygons_fit(polygons, image.shape[:2], xml_file, image_file)
    instances = rasterise(polygons, image.shape[:2])
    return SourceImage(image, instances, None, image_file.stem, "", xml_mpp or default_mpp)
