"""TensorFlow Datasets as a source of cifar10 and fashion_mnist."""

import os

import numpy as np

from uhga_tf.data.image_dataset import PARTITIONS, ImageDataset


def load_files_or_tfds(name, class_names, root, source, find_files,
                       load_files):
    """The source's own files, else TFDS (`source` of `load_dataset`).

    Args:
        name: the TFDS name, also the dataset name.
        class_names: names of the TFDS label ids.
        root: the data root or None; TFDS data lives in `root`/tfds.
        source: "files", "tfds" or "auto" (files if found, else a prepared
            TFDS copy; only "tfds" downloads).
        find_files: () -> (found or None, where it looked for the TFDS error
            message, the FileNotFoundError message for source="files").
        load_files: found -> ImageDataset.
    """
    tried = None
    if source != "tfds":
        found, tried, missing = find_files()
        if found is not None:
            return load_files(found)
        if source == "files":
            raise FileNotFoundError(missing)
    return load_tfds(
        name, class_names, root, download=(source == "tfds"), tried=tried
    )


def load_tfds(name, class_names, root, download, tried=None):
    """Load train then test of TFDS `name` as uint8 RGB arrays."""
    import tensorflow_datasets as tfds

    tfds_dir = os.path.join(root, "tfds") if root else None
    builder = tfds.builder(name, data_dir=tfds_dir)
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"{name} not found: no files at {tried} and no prepared TFDS "
                f"copy in {tfds_dir or '~/tensorflow_datasets'}; provide the "
                "files or pass source='tfds' to download it with TFDS"
            )
        builder.download_and_prepare()
    images, labels, partition = [], [], []
    for part in PARTITIONS:
        x, y = tfds.as_numpy(
            builder.as_dataset(split=part, batch_size=-1, as_supervised=True)
        )
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        images.append(x.astype(np.uint8))
        labels.append(y.astype(np.int64))
        partition.append(np.full(len(y), part, dtype=object))
    return ImageDataset(
        name=name,
        labels=np.concatenate(labels),
        class_names=list(class_names),
        partition=np.concatenate(partition),
        images=np.concatenate(images),
        source=f"tfds:{tfds_dir or '~/tensorflow_datasets'}/{name}",
    )
