"""Tiny seeded backbone + hasher pairs for export and serving tests."""

import keras

IMAGE_SIZE = 32
FEATURE_DIM = 16


def tiny_models(code_length, seed=0):
    """A two-conv backbone (images -> FEATURE_DIM) and a Dense hasher."""
    keras.utils.set_random_seed(seed)
    backbone = keras.Sequential(
        [
            keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
            keras.layers.Rescaling(1 / 127.5, offset=-1.0),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Conv2D(FEATURE_DIM, 3),
            keras.layers.GlobalAveragePooling2D(),
        ],
        name="tiny_backbone",
    )
    hasher = keras.Sequential(
        [keras.Input((FEATURE_DIM,)), keras.layers.Dense(code_length)],
        name="tiny_hasher",
    )
    return backbone, hasher


def sample_images(sizes, seed=0):
    """Seeded (pixels, encoded bytes) per (h, w): PNG at even, JPEG at odd i.

    Smooth gradients plus noise, so codes vary between images.
    """
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    pixels, encoded = [], []
    for i, (h, w) in enumerate(sizes):
        base = rng.integers(0, 256, size=(1, 1, 3))
        ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(-1, 1, 3)
        noise = rng.normal(0, 40, size=(h, w, 3))
        image = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
        pixels.append(image)
        if i % 2:
            encoded.append(tf.io.encode_jpeg(image, quality=95).numpy())
        else:
            encoded.append(tf.io.encode_png(image).numpy())
    return pixels, encoded


def export_tiny(export_dir, code_length, seed=0):
    """Export `tiny_models` as version 1 under `export_dir`; its path."""
    from uhga_tf import saved_model

    return saved_model.export_saved_model(
        *tiny_models(code_length, seed=seed), str(export_dir),
        image_size=IMAGE_SIZE,
    )
