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

from uhga_tf.data import image_decode
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


def gather_images(images, index, image_size, seed=None):
    """Gather rows of a uint8 image constant and resize them in-graph.

    Args:
        images: uint8 tensor [n, H, W, 3].
        index: int [b] rows of `images`.
        image_size: S.
        seed: None, or int [2]: augment the rows (`augment_images`) at
            their own size before resizing.

    Returns:
        float32 [b, S, S, 3] RGB in [0, 255], resized
        (`image_decode.resize_square`) exactly like
        `ImageDataset.to_tf_dataset`, so the train branches see what the
        cached features saw.
    """
    batch = tf.cast(tf.gather(images, index), tf.float32)
    if seed is not None:
        batch = augment_images(batch, seed)
    if tuple(images.shape[1:3]) != (image_size, image_size):
        batch = image_decode.resize_square(batch, image_size)
    return batch


def augment_images(images, seed):
    """Augmented copies of float32 [b, H, W, 3] images in [0, 255].

    `image_augmentation`: per image, a crop of the image reflect-padded by
    H // 8 (and W // 8) pixels, a horizontal flip with probability 1/2,
    then contrast x U(0.8, 1.2) about its mean and brightness + U(-20, 20).
    Stateless: one ``seed`` (int [2]) gives one set of copies, so a resumed
    run sees the views the uninterrupted run saw.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    batch = tf.shape(images)[0]
    pads = (images.shape[1] // 8, images.shape[2] // 8)
    offsets = tf.stack([
        tf.random.stateless_uniform(
            [batch], seeds[0] + i, 0, 2 * pad + 1, dtype=tf.int32)
        for i, pad in enumerate(pads)], axis=1)
    flips = tf.random.stateless_uniform([batch], seeds[1]) < 0.5
    contrast = tf.random.stateless_uniform([batch], seeds[2], 0.8, 1.2)
    brightness = tf.random.stateless_uniform([batch], seeds[3], -20.0, 20.0)
    return jitter(crop_and_flip(images, pads, offsets, flips), contrast,
                  brightness)


def crop_and_flip(images, pads, offsets, flips):
    """[b, H, W, 3] windows at ``offsets`` (int [b, 2], rows and columns
    into the image reflect-padded by ``pads``), flipped where ``flips``."""
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pads[0]] * 2, [pads[1]] * 2, [0, 0]],
                    mode="REFLECT")
    rows = offsets[:, :1] + tf.range(height)[None, :]
    cols = offsets[:, 1:] + tf.range(width)[None, :]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    return tf.where(flips[:, None, None, None], tf.reverse(out, [2]), out)


def jitter(images, contrast, brightness):
    """Per image: (x - mean) * contrast + mean + brightness, in [0, 255]."""
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    out = ((images - mean) * contrast[:, None, None, None] + mean
           + brightness[:, None, None, None])
    return tf.clip_by_value(out, 0.0, 255.0)


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
