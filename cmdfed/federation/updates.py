"""Screening what sites send before it is averaged.

A single bad update (a diverged site, a bug, a malicious node) would poison the average, so
the server checks every update against the global weights it sent before aggregation:
exactly the sent keys, the same shapes, floating point, all finite, and an update norm
``||w_site - w_global||`` no more than ``norm_limit`` times the median of the *other*
sites' norms (the others, not all: with two sites the median of both would follow the
outlier halfway). A rejected update is logged and dropped; the round goes on with the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

ArrayLike = np.ndarray


def screen_updates(
    reference: Mapping[str, ArrayLike],
    updates: Mapping[str, Mapping[str, ArrayLike]],
    norm_limit: float,
) -> tuple[list[str], dict[str, str]]:
    """(accepted site names, {rejected site: reason}) for site updates of ``reference``."""
    rejected: dict[str, str] = {}
    norms: dict[str, float] = {}
    for site, weights in updates.items():
        reason = _malformed(reference, weights)
        if reason:
            rejected[site] = reason
        else:
            norms[site] = update_norm(reference, weights)
    for site, norm in norms.items():
        others = [n for s, n in norms.items() if s != site]
        median = float(np.median(others)) if others else 0.0
        if median > 0 and norm > norm_limit * median:
            rejected[site] = (
                f"update norm {norm:.4g} is more than {norm_limit:g} x the other sites' median {median:.4g}"
            )
    accepted = [site for site in updates if site not in rejected]
    return accepted, rejected


def update_norm(reference: Mapping[str, ArrayLike], weights: Mapping[str, ArrayLike]) -> float:
    total = sum(
        float(np.sum((np.asarray(weights[k], np.float64) - np.asarray(v, np.float64)) ** 2))
        for k, v in reference.items()
    )
    return float(np.sqrt(total))


def _malformed(reference: Mapping[str, ArrayLike], weights: Mapping[str, ArrayLike]) -> str | None:
    missing = sorted(set(reference) - set(weights))
    unexpected = sorted(set(weights) - set(reference))
    if missing or unexpected:
        return (
            f"wrong keys: {len(missing)} missing (e.g. {', '.join(missing[:2]) or '-'}), {len(unexpected)} unexpected "
            f"(e.g. {', '.join(unexpected[:2]) or '-'})"
        )
    for key, expected in reference.items():
        value = np.asarray(weights[key])
        if value.shape != np.shape(expected):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(np.shape(expected))}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"{key} has dtype {value.dtype}, expected floating point"
        if not np.isfinite(value).all():
            return f"{key} holds NaN or infinite values"
    return None
