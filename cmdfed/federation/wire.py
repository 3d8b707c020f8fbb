"""Weights on the wire: a message carries one flat float32 vector, not one array per tensor.

Flower 1.42 moves a message as a tree of objects, one per ``Array`` and per 5 MB chunk of
it, and each object is pushed to and pulled from the SuperLink by a request of its own
(``flwr.supercore.inflatable``). A CMD state dict has about 200 tensors, so sending it tensor
by tensor costs some 400 requests per message on each hop (ServerApp -> SuperLink ->
SuperNode and back); as one vector it costs a handful (the 8 MB of the tiny preset's
pretraining weights are two chunks). The strategies average elementwise (FedAvg, FedProx,
FedAdam/FedYogi moments) or clip by the norm of the whole update (Flower's DP wrapper), so
they give the same result on the vector as on the tensors.

The layout (tensor names and shapes, in order) travels beside the vector as plain values
of the message's config, so a site unpacks exactly what was packed and packs its reply in
that same layout; the server unpacks a reply with the layout it sent, never with one the
site claims, so a reply of the wrong size is malformed, never misread.

No Flower here: ``server`` and ``client`` put the vector in an ``ArrayRecord`` and the
layout values in a ``ConfigRecord``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from cmdfed.errors import CmdfedError

WEIGHTS_KEY = "weights"  # the vector's key in an ArrayRecord
LAYOUT_PREFIX = "layout-"  # the sent vector's layout values in a message's config record
# The model config (JSON) the server sends in every message's config record: a run started from a
# checkpoint (``init``) has its architecture, which the sites cannot read from the checkpoint themselves.
ARCHITECTURE_KEY = "architecture"
# A site's store resolution (um/px) in a training reply's metrics, beside num-examples: the one piece
# of store metadata a site sends, so round checkpoints can record the resolution the model trained at.
RESOLUTION_KEY = "mpp"
# The stain reference (JSON, ``cmdfed.inference.stain``) the server sends with an evaluation: the init
# checkpoint's, so sites score what inference will see; absent when the run has none.
STAIN_REFERENCE_KEY = "stain-reference"


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the tensors a flat vector holds, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, weights: Mapping[str, ArrayLike]) -> Layout:
        return cls(tuple(weights), tuple(tuple(int(d) for d in np.shape(v)) for v in weights.values()))

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def pack(self, weights: Mapping[str, ArrayLike]) -> np.ndarray:
        """The tensors, in layout order, as one float32 vector."""
        if set(weights) != set(self.names):
            missing, unexpected = sorted(set(self.names) - set(weights)), sorted(set(weights) - set(self.names))
            raise CmdfedError(
                f"weights do not match the layout: {len(missing)} missing (e.g. {', '.join(missing[:2]) or '-'}), "
                f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2]) or '-'})"
            )
        parts = []
        for name, shape in zip(self.names, self.shapes):
            value = _numpy(weights[name])
            if value.shape != shape:
                raise CmdfedError(f"{name} has shape {value.shape}, the layout says {shape}")
            parts.append(value.astype(np.float32, copy=False).reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def unpack(self, vector: ArrayLike) -> dict[str, np.ndarray]:
        """The named tensors of a vector this layout packed (views into it)."""
        vector = np.asarray(vector)
        if vector.ndim != 1 or vector.size != self.size:
            raise CmdfedError(f"expected a flat vector of {self.size} values, got shape {vector.shape}")
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            stop = start + math.prod(shape)
            out[name] = vector[start:stop].reshape(shape)
            start = stop
        return out

    def to_values(self, prefix: str) -> dict[str, list[str] | list[int]]:
        """The layout as config values (lists of str and int), keys starting with ``prefix``."""
        return {
            f"{prefix}names": list(self.names),
            f"{prefix}ndims": [len(s) for s in self.shapes],
            f"{prefix}dims": [d for s in self.shapes for d in s],
        }

    @classmethod
    def from_values(cls, values: Mapping[str, object], prefix: str) -> Layout:
        """What :meth:`to_values` wrote; one clear error if it is not there or inconsistent."""
        try:
            names = [str(n) for n in values[f"{prefix}names"]]
            ndims = [int(n) for n in values[f"{prefix}ndims"]]
            dims = [int(d) for d in values[f"{prefix}dims"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CmdfedError(
                f"the message has no valid weight layout ({prefix}names/ndims/dims): {exc}; "
                "are the server and this site running the same cmdfed version?"
            ) from exc
        if len(ndims) != len(names) or sum(ndims) != len(dims) or min(ndims, default=0) < 0 or min(dims, default=0) < 0:
            raise CmdfedError(f"the message's weight layout ({prefix}names/ndims/dims) is inconsistent")
        shapes, start = [], 0
        for n in ndims:
            shapes.append(tuple(dims[start : start + n]))
            start += n
        return cls(tuple(names), tuple(shapes))


def _numpy(value: ArrayLike) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)
