"""Images for the end-to-end path (`trainable_backbone=true`).

The frozen default trains the hash head on cached features; the end-to-end
path fine-tunes backbone + head on the images themselves. This module holds
what that path needs besides the model (`hash_layer.build_image_hasher`):
the checks that the data can feed it, the train images the two branches
gather from, and batched encoding of any retrieval set through the
fine-tuned network. The similarity matrix is still built from the frozen,
cached features (method.md §3).
"""

import numpy as np
import tensorflow as tf

from uhga_tf.models import backbone as backbone_lib

# Images per batch when encoding a retrieval set through the image hasher.
ENCODE_BATCH_SIZE = 256


def check_experiment(experiment):
    """Refuse a config the end-to-end path cannot run (before any work).

    Raises:
        ValueError: `trainable_backbone=true` with `dataset=features` (no
            images to fine-tune on).
    """
    if not experiment.model.trainable_backbone:
        return
    if experiment.data.dataset == "features":
        raise ValueError(
            "trainable_backbone=true fine-tunes the backbone on images, so "
            "it needs an image dataset (cifar10, fashion_mnist); received "
            "dataset='features'"
        )


def image_dataset_of(sets, dataset_name="?"):
    """Return the in-memory `ImageDataset` behind `sets`, or raise.

    Raises:
        ValueError: when `sets` has no image dataset, or its images are
            decoded lazily from files (folder, nus_wide, JPEG archives),
            which the end-to-end path does not support yet.
    """
    image_dataset = getattr(sets, "image_dataset", None)
    if image_dataset is None:
        raise ValueError(
            "trainable_backbone=true needs the images of the retrieval "
            f"sets; received sets without an image dataset "
            f"(dataset={dataset_name!r})"
        )
    if image_dataset.images is None:
        raise ValueError(
            "trainable_backbone=true supports only datasets whose images are "
            "held in memory (ImageDataset.images, e.g. cifar10 or "
            "fashion_mnist from their binary files); received "
            f"dataset={image_dataset.name!r} read lazily from "
            f"{image_dataset.source or 'files'}, not supported yet"
        )
    return image_dataset


def resolve_image_size(model_config):
    """Backbone input side S of a `ModelConfig` (0 -> the backbone default)."""
    if model_config.image_size:
        return int(model_config.image_size)
    if model_config.backbone not in backbone_lib.BACKBONES:
        raise ValueError(
            f"unknown backbone; received backbone={model_config.backbone!r}, "
            f"expected one of {sorted(backbone_lib.BACKBONES)}"
        )
    return backbone_lib.BACKBONES[model_config.backbone].default_image_size


def build_backbone(model_config):
    """Build the backbone the cached features came from, to fine-tune it.

    `backbone_weights="random"` means random initialisation (weights=None).
    """
    weights = model_config.backbone_weights
    return backbone_lib.build_backbone(
        model_config.backbone,
        weights=None if weights == "random" else weights,
        image_size=model_config.image_size or None,
    )


def train_images(sets, image_dataset):
    """uint8 [n_train, H, W, 3]: row r is train-set row r (a row of S)."""
    return image_dataset.images[np.asarray(sets.indices["train"])]


def gather_images(images, index, image_size):
    """Gather rows of a uint8 image constant and resize them in-graph.

    Args:
        images: uint8 tensor [n, H, W, 3].
        index: int [b] rows of `images`.
        image_size: S.

    Returns:
        float32 [b, S, S, 3] RGB in [0, 255], bilinearly resized (no
        antialiasing) exactly like `ImageDataset.to_tf_dataset`, so the
        train branches see what the cached features saw.
    """
    batch = tf.cast(tf.gather(images, index), tf.float32)
    if tuple(images.shape[1:3]) != (image_size, image_size):
        batch = tf.image.resize(
            batch, (image_size, image_size), method="bilinear"
        )
    return batch


class ImageEncoder:
    """Encode retrieval sets through an image hasher, batch by batch.

    `encoder(set_name, rows=None)` returns logits float32 [n, code_length]
    (the pre-tanh output, `training=False`) for
    `sets.indices[set_name][rows]`,
    read with `ImageDataset.to_tf_dataset` at the backbone's image size.
    One traced predict function serves every call, so it follows the
    hasher's current weights.
    """

    def __init__(self, hasher, sets, image_dataset, image_size,
                 batch_size=ENCODE_BATCH_SIZE):
        self.sets = sets
        self.image_dataset = image_dataset
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.code_length = int(hasher.output_shape[-1])
        self._predict = tf.function(
            lambda images: hasher(images, training=False),
            input_signature=[
                tf.TensorSpec(
                    [None, self.image_size, self.image_size, 3], tf.float32
                )
            ],
        )

    def __call__(self, set_name, rows=None):
        indices = np.asarray(self.sets.indices[set_name])
        if rows is not None:
            indices = indices[rows]
        if indices.size == 0:
            return np.zeros((0, self.code_length), np.float32)
        dataset = self.image_dataset.to_tf_dataset(
            indices, self.image_size, self.batch_size
        )
        return np.concatenate(
            [np.asarray(self._predict(batch), np.float32)
             for batch in dataset]
        )
