"""CPM-15 as the package ships it: ids, resolutions, stores."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cmdfed.data import cpm15
from cmdfed.errors import CmdfedError


def test_ids_parse_and_bad_ids_are_refused():
    assert cpm15.parse_ids("01-03,9") == ["01", "02", "03", "09"]
    assert cpm15.parse_ids("test") == ["08", "09", "10"] and len(cpm15.parse_ids("all")) == 10
    for bad in ("11", "x", "3-x"):
        with pytest.raises(CmdfedError):
            cpm15.parse_ids(bad)


def test_40x_images_are_resampled_to_the_asked_resolution():
    native, labels = cpm15.load_pair("08", None)
    half, half_labels = cpm15.load_pair("08", 0.5)
    assert half.shape[:2] == half_labels.shape == (round(native.shape[0] / 2), round(native.shape[1] / 2))
    assert set(np.unique(half_labels)) <= set(np.unique(labels))  # nearest: ids kept, none invented
    same, _ = cpm15.load_pair("01", 0.5)
    assert same.shape == cpm15.load_pair("01", None)[0].shape


def test_cli_writes_a_labelled_store(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmdfed",
            "data",
            "cpm15",
            str(tmp_path / "c.zarr"),
            "--images",
            "01,02",
            "--tile",
            "128",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["labelled_fraction"] == 1.0 and info["mpp"] == 0.5 and info["nuclei"] > 100
