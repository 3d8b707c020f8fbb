"""What the server accepts as a site's reply now that weights travel packed (``cmdfed.federation.wire``)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from cmdfed.federation.wire import WEIGHTS_KEY, Layout
from server.rounds import _malformed_reply, _unpacked_or_as_sent

LAYOUT = Layout.of({"a.weight": np.zeros((2, 3), np.float32), "a.bias": np.zeros(2, np.float32)})


def reply(arrays: dict) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord({"num-examples": 4})})  # fmt: skip


def test_a_vector_of_the_sent_layout_is_accepted_and_audited_by_tensor_name():
    content = reply({WEIGHTS_KEY: np.arange(8, dtype=np.float32)})
    assert _malformed_reply(content, LAYOUT) is None
    audited = _unpacked_or_as_sent(content, LAYOUT)
    assert list(audited) == ["a.weight", "a.bias"] and audited["a.bias"].tolist() == [6.0, 7.0]


def test_a_vector_of_another_size_or_unpacked_tensors_are_malformed_and_audited_as_sent():
    for arrays in ({WEIGHTS_KEY: np.zeros(9, np.float32)}, {"a.weight": np.zeros((2, 3), np.float32), "a.bias": np.zeros(2, np.float32)},
                   {WEIGHTS_KEY: np.zeros((2, 4), np.float32)}):  # fmt: skip
        content = reply(arrays)
        assert "one float32 vector 'weights' of 8 values" in _malformed_reply(content, LAYOUT)
        assert set(_unpacked_or_as_sent(content, LAYOUT)) == set(arrays)


def test_a_reply_whose_bytes_disagree_with_its_declared_shape_or_dtype_is_malformed_not_fatal():
    # Flower decodes an Array's data apart from the shape and dtype its header declares.
    lying = Array(dtype="float32", shape=(8,), stype="numpy.ndarray", data=Array(np.zeros(9, np.float32)).data)
    wrong_dtype = Array(np.arange(8, dtype=np.float64))
    garbage = Array(dtype="float32", shape=(8,), stype="numpy.ndarray", data=b"not an array")
    for array in (lying, wrong_dtype, garbage):
        content = RecordDict({"arrays": ArrayRecord({WEIGHTS_KEY: array}), "metrics": MetricRecord({"num-examples": 4})})
        assert "one float32 vector" in _malformed_reply(content, LAYOUT)
        assert "a.weight" not in _unpacked_or_as_sent(content, LAYOUT)
