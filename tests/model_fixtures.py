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
