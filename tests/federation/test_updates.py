"""Screening of received updates."""

import numpy as np
import pytest

from cmdfed.federation.updates import screen_updates

REFERENCE = {"a": np.zeros((3, 2), np.float32), "b": np.zeros(4, np.float32)}


def nudged(scale: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: v + scale * rng.standard_normal(v.shape).astype(np.float32) for k, v in REFERENCE.items()}


def test_well_formed_updates_of_similar_size_are_accepted():
    updates = {f"site-{i}": nudged(0.1, i) for i in range(3)}
    accepted, rejected = screen_updates(REFERENCE, updates, norm_limit=10.0)
    assert accepted == ["site-0", "site-1", "site-2"] and rejected == {}


@pytest.mark.parametrize(
    "broken, reason",
    [
        ({"a": np.full((3, 2), np.nan, np.float32), "b": np.zeros(4, np.float32)}, "NaN or infinite"),
        ({"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}, "shape"),
        ({"a": np.zeros((3, 2), np.float32)}, "wrong keys: 1 missing"),
        ({**REFERENCE, "image": np.zeros((64, 64, 3), np.float32)}, "1 unexpected"),
        ({"a": np.zeros((3, 2), np.int64), "b": np.zeros(4, np.float32)}, "floating point"),
    ],
)
def test_malformed_updates_are_rejected_and_the_others_kept(broken, reason):
    accepted, rejected = screen_updates(REFERENCE, {"good": nudged(0.1, 0), "bad": broken}, norm_limit=10.0)
    assert accepted == ["good"] and reason in rejected["bad"]


def test_an_update_far_above_the_others_median_norm_is_rejected():
    updates = {"site-0": nudged(0.1, 0), "site-1": nudged(0.1, 1), "huge": nudged(100.0, 2)}
    accepted, rejected = screen_updates(REFERENCE, updates, norm_limit=10.0)
    assert accepted == ["site-0", "site-1"] and "median" in rejected["huge"]


def test_with_two_sites_the_outlier_is_still_caught():
    accepted, rejected = screen_updates(REFERENCE, {"ok": nudged(0.1, 0), "huge": nudged(100.0, 1)}, norm_limit=10.0)
    assert accepted == ["ok"] and set(rejected) == {"huge"}
