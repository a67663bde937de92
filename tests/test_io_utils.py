"""Atomic writes leave either the old file or the new one; JSON of numpy."""

import json
import os

import numpy as np
import pytest

from uhga_tf import io_utils


def test_json_write_replaces_whole_file_and_converts_numpy(tmp_path):
    path = tmp_path / "sub" / "results.json"
    io_utils.write_json_atomic(
        path, {"map": np.float32(0.5), "ids": np.arange(3), "p": tmp_path}
    )
    assert json.loads(path.read_text()) == {
        "map": 0.5, "ids": [0, 1, 2], "p": str(tmp_path)
    }
    assert os.listdir(path.parent) == ["results.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, x=np.ones(2))
    with pytest.raises(RuntimeError):
        with io_utils.atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, x=np.zeros(2))
            raise RuntimeError("killed mid-write")
    np.testing.assert_array_equal(np.load(path)["x"], np.ones(2))
    assert os.listdir(tmp_path) == ["a.npz"]


def test_unknown_type_is_a_type_error():
    with pytest.raises(TypeError, match="set"):
        io_utils.to_builtin({1})


def test_tf_error_line_keeps_the_op_sentence():
    message = (
        "Graph execution error:\n\nDetected at node DecodeJpeg defined at:\n"
        "  File x\n\nInvalid JPEG data or crop window. [[{{node DecodeJpeg}}]]"
        "\n\t [[StatefulPartitionedCall]]"
    )

    class Error(Exception):
        pass

    error = Error(message)
    error.message = message
    assert io_utils.tf_error_line(error) == "Invalid JPEG data or crop window."
