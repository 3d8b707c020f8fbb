"""The summary's record of where a slide was: a path relative to the output folder and an
absolute one, and a quick hash that tells the slide from another file put in its place."""

from __future__ import annotations

import hashlib
import os

from cmdfed.slide_outputs import (
    QUICK_HASH_PART,
    quick_sha256,
    slide_file_mismatch,
    slide_file_record,
)


def test_the_record_leads_back_to_the_slide_from_the_output_folder(tmp_path, monkeypatch):
    (tmp_path / "scans").mkdir()
    slide = tmp_path / "scans" / "case-7.tif"
    slide.write_bytes(b"II*\x00" + bytes(range(256)) * 40)
    (tmp_path / "results" / "case-7").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    record = slide_file_record("scans/case-7.tif", "results/case-7")  # as typed on the command line
    assert record == {
        "absolute_path": str(slide),
        "relative_path": "../../scans/case-7.tif",
        "bytes": slide.stat().st_size,
        "quick_sha256": hashlib.sha256(slide.read_bytes()).hexdigest(),  # a small file is hashed whole
    }
    assert os.path.samefile(tmp_path / "results" / "case-7" / record["relative_path"], slide)
    assert slide_file_mismatch(slide, record) is None


def test_another_file_in_the_slides_place_is_told_apart(tmp_path):
    slide = tmp_path / "case-7.svs"
    content = bytearray(os.urandom(3 * QUICK_HASH_PART))
    slide.write_bytes(content)
    record = slide_file_record(slide, tmp_path / "out")

    slide.write_bytes(content[:-1])
    assert slide_file_mismatch(slide, record) == f"{len(content) - 1} bytes, the slide had {len(content)}"
    for changed in (0, len(content) - 1):  # the header and the end (a TIFF's tile index) are hashed
        other = bytearray(content)
        other[changed] ^= 0xFF
        slide.write_bytes(other)
        assert slide_file_mismatch(slide, record) == "same size, different content"
    slide.write_bytes(content)
    assert quick_sha256(slide) == record["quick_sha256"] and slide_file_mismatch(slide, record) is None
