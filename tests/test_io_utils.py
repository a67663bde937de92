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


def test_atomic_directory_renames_a_new_folder_into_place(tmp_path):
    target = tmp_path / "sub" / "index"
    with io_utils.atomic_directory(target) as tmp:
        assert os.path.basename(tmp).startswith(".index.tmp-")
        (tmp_path / "sub" / os.path.basename(tmp) / "a.bin").write_bytes(b"1")
        assert not target.exists()  # nothing visible before success
    assert sorted(os.listdir(tmp_path / "sub")) == ["index"]
    assert (target / "a.bin").read_bytes() == b"1"
    # The mode a plain mkdir gives, not mkdtemp's 0700.
    assert os.stat(target).st_mode & 0o777 == 0o777 & ~io_utils.umask()


def test_atomic_directory_failure_leaves_the_old_folder(tmp_path):
    target = tmp_path / "split"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with (pytest.raises(RuntimeError),
          io_utils.atomic_directory(target, prefix=".tmp-split-") as tmp):
        (tmp_path / os.path.basename(tmp) / "new.txt").write_text("new")
        raise RuntimeError("killed mid-write")
    # An existing folder is refused, not replaced, without merge.
    with pytest.raises(OSError), io_utils.atomic_directory(target) as tmp:
        (tmp_path / os.path.basename(tmp) / "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["split"]
    assert os.listdir(target) == ["old.txt"]


def test_atomic_directory_merge_replaces_files_and_keeps_others(tmp_path):
    target = tmp_path / "index"
    target.mkdir()
    (target / "index.bin").write_bytes(b"old")
    (target / ".lock").write_bytes(b"")
    with io_utils.atomic_directory(target, merge=True) as tmp:
        (tmp_path / os.path.basename(tmp) / "index.bin").write_bytes(b"new")
    assert sorted(os.listdir(target)) == [".lock", "index.bin"]
    assert (target / "index.bin").read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["index"]


def test_failed_write_names_the_target_not_the_temporary_file(tmp_path):
    """A write() refused for space names no file; the message names the
    path the caller asked for (the temporary one is gone)."""
    import errno

    path = tmp_path / "config.json"
    with pytest.raises(OSError) as info:
        with io_utils.atomic_path(path):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(path)
    assert os.listdir(tmp_path) == []


def test_tf_file_error_maps_tf_temporary_names_back():
    """TF's own "<path>; <strerror>" with its temporary names: the
    checkpoint prefix and the file it was writing."""
    import errno

    import tensorflow as tf

    error = tf.errors.ResourceExhaustedError(
        None, None,
        "{{function_node __wrapped__SaveV2_dtypes_24_device_/job:localhost/"
        "replica:0/task:0/device:CPU:0}} /w/run/checkpoints/ckpt-6_temp/"
        "part-00000-of-00001.data-00000-of-00001.tempstate1696; No space "
        "left on device [Op:SaveV2]")
    assert io_utils.tf_file_error(error) == (
        errno.ENOSPC, "No space left on device", "/w/run/checkpoints/ckpt-6")
    big = tf.errors.OutOfRangeError(None, None, "/w/my_temp/x; File too large")
    assert io_utils.tf_file_error(big) == (
        errno.EFBIG, "File too large", "/w/my_temp/x")
    # Not a file error: an iterator's end, a shape mismatch.
    assert io_utils.tf_file_error(
        tf.errors.OutOfRangeError(None, None, "End of sequence")) is None
    assert io_utils.tf_file_error(ValueError("x; File too large")) is None


def test_failed_tf_write_in_a_folder_names_the_target(tmp_path):
    """A TF file error inside atomic_directory's temporary folder becomes
    an OSError naming the target folder, with the TF error as its cause."""
    import errno

    import tensorflow as tf

    target = tmp_path / "1"
    with pytest.raises(OSError) as info:
        with io_utils.atomic_directory(target, prefix=".tmp-1-") as temp:
            raise tf.errors.ResourceExhaustedError(
                None, None,
                f"{temp}/variables/variables_temp/part-00000-of-00001.data-"
                "00000-of-00001.tempstate12; No space left on device")
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target)
    assert isinstance(info.value.__cause__, tf.errors.ResourceExhaustedError)
    assert os.listdir(tmp_path) == []
