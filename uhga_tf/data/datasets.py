"""Dataset sources (class folders, zips, idx files, NUS-WIDE, TFDS) -> tf.data.

`load_dataset` is the one entry point; every source lives in its own module
and returns an `ImageDataset` (`image_dataset.py`): labels, class names, the
source's official partition and either the decoded images (datasets whose
images share one size) or per-image paths that `ImageDataset.to_tf_dataset`
decodes lazily.

Sources:

- `cifar10` (`cifar10.py`): `<data_dir>/cifar10/cifar10-jpeg.zip` (or
  `data_dir` pointing at the zip itself, or a folder with
  `train/<class>/*.jpg` and `test/<class>/*.jpg`), decoded with
  `image_decode.decode_upright`, the decoder the exported serving signature
  uses.
  `source="tfds"` reads TFDS instead (`tfds_source.py`).
- `fashion_mnist` (`fashion_mnist.py`): the four idx files of Debian's
  `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/`) or
  `<data_dir>/fashion_mnist/`.
- `folder` (`image_folder.py`): a user's class-per-folder images,
  `<data_dir>/<class>/*`, or with `train/` and `test/` sub-folders, which
  then set `partition`; or an unlabelled collection (`folder_labels`).
- `nus_wide` (`nus_wide.py`): NUS-WIDE-21 (protocol.md §1.2) from the
  standard NUS-WIDE files.

Example order is the official train part, then the test part; inside a part,
classes in class order and files in natural name order ("img2" < "img10").
The folder rules shared by the cifar10 zip/folder and `folder` (hidden
entries, stray files, empty classes, corrupt images and `skip_corrupt`) are
described in `image_folder.py`.
"""

import os

from uhga_tf import config
from uhga_tf.data.cifar10 import CIFAR10_CLASSES, CIFAR10_ZIP, load_cifar10
from uhga_tf.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_SYSTEM_DIR,
    load_fashion_mnist,
    read_idx,
)
from uhga_tf.data.image_dataset import PARTITIONS, ImageDataset
from uhga_tf.data.image_folder import FOLDER_EXTENSIONS, load_folder
from uhga_tf.data.nus_wide import NUS_WIDE_NUM_CONCEPTS, load_nus_wide

# The datasets with images (config.DATASETS less `features`, a cache of
# features with no images behind it).
IMAGE_DATASETS = tuple(d for d in config.DATASETS if d != "features")
SOURCES = config.DATA_SOURCES

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_ZIP",
    "IMAGE_DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_SYSTEM_DIR",
    "FOLDER_EXTENSIONS",
    "ImageDataset",
    "NUS_WIDE_NUM_CONCEPTS",
    "PARTITIONS",
    "SOURCES",
    "load_dataset",
    "load_folder",
    "load_nus_wide",
    "read_idx",
    "resolve_data_dir",
]


def resolve_data_dir(data_dir) -> str:
    """Return `data_dir`, else $UHGA_DATA_DIR; raise if neither is set."""
    path = data_dir or os.environ.get("UHGA_DATA_DIR")
    if not path:
        raise ValueError(
            "no data directory: pass data_dir or set the UHGA_DATA_DIR "
            "environment variable; received data_dir=None and "
            "UHGA_DATA_DIR unset"
        )
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"data directory not found: {path}")
    return path


def _optional_data_dir(data_dir):
    """`data_dir`, else $UHGA_DATA_DIR, made absolute; None if neither."""
    root = data_dir or os.environ.get("UHGA_DATA_DIR")
    if root:
        root = os.path.abspath(os.path.expanduser(str(root)))
    return root


def load_dataset(
    name,
    data_dir=None,
    source="auto",
    skip_corrupt=False,
    *,
    num_concepts=None,
    folder_labels="auto",
) -> ImageDataset:
    """Load dataset `name` (one of `IMAGE_DATASETS`).

    Args:
        name: "cifar10", "fashion_mnist", "folder" or "nus_wide".
        data_dir: data root (default $UHGA_DATA_DIR); for "folder" the class
            folder root itself (or a zip of it). Optional for fashion_mnist,
            whose Debian system files are used when found.
        source: "files" (zip/folder/idx files), "tfds" (tfds.load, may
            download) or "auto" (files if found, else an already prepared
            TFDS copy; never downloads). Only cifar10 and fashion_mnist
            have a TFDS source.
        skip_corrupt: drop undecodable images (logged, listed in
            `skipped`) instead of raising.
        num_concepts: nus_wide only: concepts kept (default 21).
        folder_labels: folder only: "folders", "none" (an unlabelled
            collection) or "auto" (`image_folder`'s docstring).
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(
            f"unknown dataset; received name={name!r}, expected one of "
            f"{IMAGE_DATASETS}"
        )
    if source not in SOURCES:
        raise ValueError(
            f"unknown source; received source={source!r}, expected one of "
            f"{SOURCES}"
        )
    if num_concepts is not None and name != "nus_wide":
        raise ValueError(
            "num_concepts applies to nus_wide only; received "
            f"num_concepts={num_concepts} with name={name!r}"
        )
    if name == "cifar10":
        return load_cifar10(_optional_data_dir(data_dir), source, skip_corrupt)
    if name == "fashion_mnist":
        return load_fashion_mnist(_optional_data_dir(data_dir), source)
    if source == "tfds":
        raise ValueError(
            f"dataset {name!r} has no TFDS source; received source='tfds', "
            "expected 'auto' or 'files'"
        )
    if name == "folder":
        return load_folder(resolve_data_dir(data_dir), skip_corrupt,
                           folder_labels=folder_labels)
    return load_nus_wide(
        resolve_data_dir(data_dir),
        num_concepts=(
            NUS_WIDE_NUM_CONCEPTS if num_concepts is None else num_concepts
        ),
        skip_corrupt=skip_corrupt,
    )
