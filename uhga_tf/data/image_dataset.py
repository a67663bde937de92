"""`ImageDataset`, what every image loader returns, and its tf.data pipeline.

Images are either decoded arrays (sources whose images share one size) or
per-image paths, files or members of a zip, that `to_tf_dataset` reads and
decodes lazily.
"""

import dataclasses
import zipfile

import numpy as np
import tensorflow as tf

from uhga_tf.data import image_decode

PARTITIONS = ("train", "test")
# The label of every image of an unlabelled collection (a user's photos):
# splits that read classes refuse it, and no MAP is computed on it.
UNLABELLED = -1


def is_unlabelled(labels):
    """True for the labels of an unlabelled collection (all `UNLABELLED`)."""
    labels = np.asarray(labels)
    return bool(labels.ndim == 1 and len(labels)
                and np.all(labels == UNLABELLED))


@dataclasses.dataclass
class ImageDataset:
    """Images with labels and the source's official train/test partition.

    Attributes:
        name: one of `datasets.IMAGE_DATASETS`.
        labels: int64 [N] class ids (single-label) or uint8 [N, C] multi-hot;
            `UNLABELLED` everywhere for an unlabelled collection.
        class_names: C names; label `i` is `class_names[i]`; empty for an
            unlabelled collection.
        partition: object [N] of "train" / "test", the source's official
            split ("train" everywhere for sources without one).
        images: uint8 [N, H, W, 3] RGB when all images share one size, or
            None for lazily decoded datasets.
        paths: N file paths (or zip members of `archive`) for lazily decoded
            datasets, else None.
        source: human-readable origin, e.g. "zip:/data/cifar10-jpeg.zip".
        skipped: files dropped at load time by `skip_corrupt=True`.
        archive: the zip that holds `paths`, or None when they are files.
        image_sizes: int64 [N, 2] (height, width) of lazily decoded images,
            read from their headers at load time, or None.
    """

    name: str
    labels: np.ndarray
    class_names: list
    partition: np.ndarray
    images: np.ndarray | None = None
    paths: list | None = None
    source: str = ""
    skipped: list = dataclasses.field(default_factory=list)
    archive: str | None = None
    image_sizes: np.ndarray | None = None

    def __post_init__(self):
        if (self.images is None) == (self.paths is None):
            raise ValueError(
                "ImageDataset needs exactly one of images or paths; received "
                f"images={'set' if self.images is not None else None}, "
                f"paths={'set' if self.paths is not None else None}"
            )
        n = len(self.labels)
        sizes = {
            "labels": n,
            "partition": len(self.partition),
            "images" if self.images is not None else "paths": len(
                self.images if self.images is not None else self.paths
            ),
        }
        if self.image_sizes is not None:
            sizes["image_sizes"] = len(self.image_sizes)
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"ImageDataset fields must have one length; received {sizes}"
            )
        if self.images is not None and (
            self.images.dtype != np.uint8
            or self.images.ndim != 4
            or self.images.shape[-1] != 3
        ):
            raise ValueError(
                "images must be uint8 [N, H, W, 3]; received "
                f"dtype={self.images.dtype}, shape={self.images.shape}"
            )

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def is_multi_label(self) -> bool:
        return self.labels.ndim == 2

    @property
    def labelled(self) -> bool:
        return not is_unlabelled(self.labels)

    def to_tf_dataset(self, indices, image_size, batch_size):
        """Return batches of float32 [b, s, s, 3] RGB images in [0, 255].

        Images come in `indices` order, unshuffled; the last batch may be
        partial. With an int `image_size` every image is bilinearly resized
        (antialiased where it shrinks, `image_decode.resize_square`; no
        rounding) to image_size x image_size; with
        `image_size=None` the native size is kept, which requires all
        selected images to share one size. Grayscale becomes 3 channels.
        `paths` datasets are read and decoded lazily, in parallel.
        """
        indices = _check_indices(indices, self.num_examples)
        _check_batch_options(image_size, batch_size)
        if self.images is not None:
            return _array_batches(self.images, indices, image_size,
                                  batch_size)
        native = self._native_size(indices) if image_size is None else None
        encoded = _encoded_images(
            [self.paths[i] for i in indices], self.archive
        )
        return _decoded_batches(encoded, image_size, native, batch_size)

    def _native_size(self, indices):
        if self.image_sizes is None:
            raise ValueError(
                f"image_size=None needs known image sizes; dataset "
                f"{self.name!r} has none, pass an int image_size"
            )
        sizes = np.unique(self.image_sizes[indices], axis=0)
        if len(sizes) > 1:
            raise ValueError(
                "image_size=None keeps the native size, which requires equal "
                f"sizes; received {len(sizes)} sizes (height, width) such as "
                f"{[tuple(int(v) for v in s) for s in sizes[:3]]}: pass an "
                "int image_size"
            )
        if len(sizes) == 0:
            return (None, None)
        return tuple(int(v) for v in sizes[0])


def _check_indices(indices, n):
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (
        indices.size == 0 or np.issubdtype(indices.dtype, np.integer)
    ):
        raise ValueError(
            "indices must be a 1-D integer array; received "
            f"dtype={indices.dtype}, shape={indices.shape}"
        )
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(
            f"indices must lie in [0, {n}); received min={indices.min()}, "
            f"max={indices.max()}"
        )
    return indices


def _check_batch_options(image_size, batch_size):
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive int; received "
            f"batch_size={batch_size!r}"
        )
    if image_size is not None and (
        not isinstance(image_size, (int, np.integer)) or image_size < 1
    ):
        raise ValueError(
            "image_size must be a positive int or None; received "
            f"image_size={image_size!r}"
        )


def _array_batches(images, indices, image_size, batch_size):
    """Batches gathered from decoded images, resized when sizes differ."""
    constant = tf.constant(images)
    target = None
    if image_size is not None and tuple(images.shape[1:3]) != (
        image_size,
        image_size,
    ):
        target = (int(image_size), int(image_size))

    def gather(batch_indices):
        batch = tf.cast(tf.gather(constant, batch_indices), tf.float32)
        if target is not None:
            batch = image_decode.resize_square(batch, target[0])
        return batch

    ds = tf.data.Dataset.from_tensor_slices(indices)
    ds = ds.batch(int(batch_size)).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE
    )
    return ds.prefetch(tf.data.AUTOTUNE)


def _encoded_images(paths, archive):
    """tf.data of the encoded bytes of files, or of members of `archive`."""
    if archive is None:
        return tf.data.Dataset.from_tensor_slices(
            tf.constant(paths, dtype=tf.string)
        ).map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE)

    def read_members():
        with zipfile.ZipFile(archive) as zf:
            for member in paths:
                yield zf.read(member)

    return tf.data.Dataset.from_generator(
        read_members,
        output_signature=tf.TensorSpec([], tf.string),
    )


def _decoded_batches(encoded, image_size, native, batch_size):
    """Decode (and resize to image_size, or keep `native`) then batch."""

    def decode(data):
        image = tf.cast(image_decode.decode_upright(data), tf.float32)
        if image_size is None:
            return tf.ensure_shape(image, (native[0], native[1], 3))
        return image_decode.resize_square(image[tf.newaxis], image_size)[0]

    ds = encoded.map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    if image_size is not None:
        ds = ds.map(
            lambda x: tf.ensure_shape(x, (image_size, image_size, 3))
        )
    return ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)
