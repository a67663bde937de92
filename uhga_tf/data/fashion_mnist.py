"""Fashion-MNIST from its four idx files, or TFDS.

The files of Debian's `dataset-fashion-mnist` package
(`/usr/share/datasets/fashion-mnist/`) or `<data_dir>/fashion_mnist/`,
gzipped or not.
"""

import gzip
import os
import struct

import numpy as np
from absl import logging

from uhga_tf.data import tfds_source
from uhga_tf.data.image_dataset import ImageDataset

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


def load_fashion_mnist(root, source):
    """Fashion-MNIST under the data root `root` (or None) or the system
    folder: idx files, else TFDS."""
    dirs = []
    if root:
        dirs += [os.path.join(root, "fashion_mnist"), root]
    dirs.append(FASHION_MNIST_SYSTEM_DIR)

    def find_files():
        found = next(
            (
                d for d in dirs
                if _open_maybe_gz(os.path.join(d, "train-images-idx3-ubyte"))[0]
            ),
            None,
        )
        missing = (
            "Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...) "
            f"not found in {dirs}"
        )
        return found, dirs, missing

    return tfds_source.load_files_or_tfds(
        "fashion_mnist", FASHION_MNIST_CLASSES, root, source, find_files,
        _load_fashion_mnist_idx,
    )


def _open_maybe_gz(path):
    for candidate in (path + ".gz", path):
        if os.path.isfile(candidate):
            if candidate.endswith(".gz"):
                with gzip.open(candidate, "rb") as f:
                    return f.read(), candidate
            with open(candidate, "rb") as f:
                return f.read(), candidate
    return None, path


def read_idx(data, ndim, where=""):
    """Parse an idx (ubyte) array: magic 0x0800 | ndim, then big-endian dims."""
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{where}: too short for an idx header")
    magic = struct.unpack(">I", data[:4])[0]
    expected = 0x0800 | ndim
    if magic != expected:
        raise ValueError(
            f"{where}: idx magic number {magic:#010x}; expected "
            f"{expected:#010x} (unsigned byte, {ndim} dims)"
        )
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(
            f"{where}: idx body holds {body.size} bytes; expected "
            f"{int(np.prod(dims))} for dims {dims}"
        )
    return body.reshape(dims)


def _load_fashion_mnist_idx(directory):
    images, labels, partition = [], [], []
    for part, prefix, count in (
        ("train", "train", 60000),
        ("test", "t10k", 10000),
    ):
        x, y = _read_part(directory, part, prefix, count)
        images.append(np.repeat(x[..., None], 3, axis=-1))
        labels.append(y.astype(np.int64))
        partition.append(np.full(count, part, dtype=object))
    logging.info("Loaded Fashion-MNIST idx files from %s.", directory)
    return ImageDataset(
        name="fashion_mnist",
        labels=np.concatenate(labels),
        class_names=list(FASHION_MNIST_CLASSES),
        partition=np.concatenate(partition),
        images=np.concatenate(images),
        source=f"idx:{directory}",
    )


def _read_part(directory, part, prefix, count):
    """Images uint8 [count, 28, 28] and labels [count] of one part."""
    arrays = []
    for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
        data, path = _open_maybe_gz(
            os.path.join(directory, f"{prefix}-{kind}-ubyte")
        )
        if data is None:
            raise FileNotFoundError(f"Fashion-MNIST file not found: {path}")
        arrays.append(read_idx(data, ndim, path))
    x, y = arrays
    if x.shape != (count, 28, 28) or y.shape != (count,):
        raise ValueError(
            f"Fashion-MNIST {part} in {directory}: images {x.shape} and "
            f"labels {y.shape}; expected ({count}, 28, 28) and ({count},)"
        )
    if y.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"Fashion-MNIST {part} labels must lie in [0, 10); received "
            f"max={y.max()}"
        )
    return x, y
