"""Paths are cut to file names, one rule for everything a site or workstation sends out."""

from cmdfed.redaction import file_name_only, redact_paths
from cmdfed.telemetry.store import scrub_paths


def test_paths_are_cut_to_their_last_part():
    text = "store /data/hospital-7/patients/site.zarr is missing; see C:\\scans\\x.ndpi"
    assert redact_paths(text) == "store site.zarr is missing; see x.ndpi"


def test_a_colon_before_a_path_is_kept_and_a_bare_separator_is_marked():
    assert redact_paths("error:/data/p7/case.svs") == "error:case.svs"
    assert redact_paths("in / out") == "in <path> out"


def test_file_names_and_the_telemetry_store_use_the_same_rule():
    assert file_name_only("/scans/Smith_J/case7.svs/") == "case7.svs"
    text = "cannot read /scans/Smith_J/case7.svs (C:\\x\\y.ndpi)"
    assert scrub_paths(text) == redact_paths(text) == "cannot read case7.svs (y.ndpi)"
