"""CIFAR-10 from `<data_dir>/cifar10/cifar10-jpeg.zip`, a folder, or TFDS.

`data_dir` may also point at the zip itself or at a folder with
`train/<class>/*.jpg` and `test/<class>/*.jpg`. Images are decoded with
`image_decode.decode_upright`, the decoder the exported serving signature
uses.
"""

import os
import time

import numpy as np
import tensorflow as tf
from absl import logging

from uhga_tf.data import image_decode
from uhga_tf.data import image_folder
from uhga_tf.data import tfds_source
from uhga_tf.data.image_dataset import ImageDataset

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_ZIP = "cifar10-jpeg.zip"

_DECODE_BATCH = 2048


def load_cifar10(root, source, skip_corrupt):
    """CIFAR-10 under the data root `root` (or None): files, else TFDS."""

    def find_files():
        found, tried = _find_cifar10_files(root) if root else (None, [])
        missing = (
            "CIFAR-10 files not found; looked for a zip or a folder with "
            f"train/ and test/ at {tried or 'data_dir=None'} (set "
            "data_dir or UHGA_DATA_DIR)"
        )
        return found, tried or ["data_dir=None"], missing

    return tfds_source.load_files_or_tfds(
        "cifar10", CIFAR10_CLASSES, root, source, find_files,
        lambda path: _load_cifar10_files(path, skip_corrupt),
    )


def _find_cifar10_files(root):
    """Return the cifar10 zip or folder under `root`, and the paths tried."""
    candidates = [
        root,
        os.path.join(root, "cifar10", CIFAR10_ZIP),
        os.path.join(root, CIFAR10_ZIP),
        os.path.join(root, "cifar10"),
    ]
    for path in candidates:
        if os.path.isfile(path):
            return path, candidates
        if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(
            os.path.join(path, "test")
        ):
            return path, candidates
    return None, candidates


def _load_cifar10_files(path, skip_corrupt):
    start = time.perf_counter()
    tree = image_folder.FileTree(path)
    class_names, entries = image_folder.list_class_tree(
        tree, expected_classes=CIFAR10_CLASSES, require_split=True
    )
    rels = [rel for _, _, rel in entries]
    images, keep, skipped = _decode_equal_size(tree, rels, skip_corrupt)
    entries = [e for e, k in zip(entries, keep) if k]
    logging.info(
        "Loaded %d CIFAR-10 images from %s in %.1f s.",
        len(entries),
        path,
        time.perf_counter() - start,
    )
    return ImageDataset(
        name="cifar10",
        labels=np.array([label for _, label, _ in entries], np.int64),
        class_names=class_names,
        partition=np.array([p for p, _, _ in entries], dtype=object),
        images=images,
        source=f"{tree.kind}:{path}",
        skipped=skipped,
    )


def _decode_equal_size(tree, rels, skip_corrupt):
    """Decode images of one size (`decode_upright`); uint8 [n, H, W, 3].

    Returns (images of the kept files, kept mask, skipped names).
    """
    zf = tree.open_archive()
    try:
        blobs = [tree.read(rel, zf) for rel in rels]
    finally:
        if zf is not None:
            zf.close()
    first = image_decode.decode_upright(blobs[0]).shape
    shape = (int(first[0]), int(first[1]), 3)

    def decode(data):
        return tf.ensure_shape(image_decode.decode_upright(data), shape)

    ds = (
        tf.data.Dataset.from_tensor_slices(tf.constant(blobs, tf.string))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(_DECODE_BATCH)
    )
    images = np.empty((len(blobs),) + shape, np.uint8)
    try:
        start = 0
        for batch in ds:
            images[start : start + len(batch)] = batch.numpy()
            start += len(batch)
        return images, np.ones(len(blobs), bool), []
    except tf.errors.InvalidArgumentError:
        pass
    # Slow path, only after a failure: find the offending files by name.
    return _decode_one_by_one(tree, rels, blobs, images, shape, skip_corrupt)


def _decode_one_by_one(tree, rels, blobs, images, shape, skip_corrupt):
    """`_decode_equal_size`'s result, naming (or skipping) corrupt files."""
    keep = np.ones(len(blobs), bool)
    skipped = []
    for i, data in enumerate(blobs):
        try:
            image = image_decode.decode_upright(data).numpy()
        except tf.errors.InvalidArgumentError as e:
            if not skip_corrupt:
                raise ValueError(
                    f"corrupt image {tree.location(rels[i])}: {e.message}; "
                    "pass skip_corrupt=True to skip such files"
                ) from e
            keep[i] = False
            skipped.append(tree.location(rels[i]))
            logging.warning("Skipping corrupt image %s.", skipped[-1])
            continue
        if image.shape != shape:
            raise ValueError(
                f"image {tree.location(rels[i])} has shape {image.shape}; "
                f"expected every image to have shape {shape}"
            )
        images[i] = image
    logging.warning("Skipped %d corrupt images.", len(skipped))
    return images[keep], keep, skipped
