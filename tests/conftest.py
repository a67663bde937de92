"""Shared pytest setup: two logical CPU devices and the --run_slow switch."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# MirroredStrategy tests need two replicas on a CPU-only machine; logical
# devices can only be configured before TensorFlow runs its first op.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )
except RuntimeError:
    pass


def pytest_addoption(parser):
    parser.addoption(
        "--run_slow", action="store_true", help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run_slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run_slow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def shared_data_dir():
    """Path of ../shared/data (or UHGA_DATA_DIR), or None when absent."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [
        os.environ.get("UHGA_DATA_DIR"),
        os.path.join(here, "..", "..", "shared", "data"),
    ]
    for path in candidates:
        if path and os.path.isdir(path):
            return os.path.abspath(path)
    return None
