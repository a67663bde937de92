"""The serving graph: image bytes or pixels in, binary codes out.

The exported graph holds the whole encoder: decode (JPEG/PNG/GIF/BMP,
upright by the EXIF orientation), bilinear resize to the backbone's `image_size`, the backbone (its
normalisation is inside it), the hash head and the sign rule of
`uhga_tf.codes.binarize` (`>= 0 -> +1`, in-graph as `codes_tf`).
`build_archive` names the three signatures of `wire_names`;
`encode_in_process` is the eager reference the export check compares with.
"""

import re

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from uhga_tf import codes as codes_lib
from uhga_tf import codes_tf
from uhga_tf.data import image_decode
from uhga_tf.saved_model import wire_names


def preprocess_images(images, image_size):
    """Resize images to the backbone input (`image_decode.resize_square`:
    bilinear, antialiased when shrinking), as training's pipeline does.

    Args:
        images: uint8 or float [n, h, w, 3] RGB in [0, 255]; any h, w.
        image_size: side of the square backbone input, in pixels.

    Returns:
        float32 [n, image_size, image_size, 3] in [0, 255].
    """
    return image_decode.resize_square(images, image_size)


def decode_image_bytes(image_bytes, image_size):
    """Decode a batch of encoded images and resize each to `image_size`.

    Args:
        image_bytes: string [n]; JPEG, PNG, GIF (first frame) or BMP.
        image_size: side of the square backbone input, in pixels.

    Returns:
        float32 [n, image_size, image_size, 3] RGB in [0, 255]; grey and
        RGBA inputs are converted to 3 channels, and a JPEG is turned
        upright by its EXIF orientation (`image_decode`), as in training.
    """

    def decode_one(encoded):
        image = image_decode.decode_upright(encoded)
        return preprocess_images(image[tf.newaxis], image_size)[0]

    return tf.map_fn(
        decode_one,
        image_bytes,
        fn_output_signature=tf.TensorSpec(
            [image_size, image_size, 3], tf.float32
        ),
    )



def encode_in_process(backbone, hasher, images, image_size):
    """Encode uint8 images eagerly, as the `encode_images` signature does.

    The reference that tests and the export check compare the SavedModel
    against: preprocessing, backbone, hasher, then `codes.binarize`.

    Returns:
        (codes int8 [n, code_length] in {-1, +1}, logits float32
        [n, code_length]) where `logits` is the hasher's pre-activation z
        (not the relaxed codes tanh(s * z)); codes = binarize(logits).
    """
    pixels = preprocess_images(images, image_size)
    features = backbone(pixels, training=False)
    logits = np.asarray(hasher(features, training=False), np.float32)
    return codes_lib.binarize(logits), logits


def probe_dims(backbone, hasher, image_size):
    """Return (feature_dim, code_length) by running each model once."""
    features = backbone(
        tf.zeros([1, image_size, image_size, 3], tf.float32), training=False
    )
    if len(features.shape) != 2:
        raise ValueError(
            "backbone must map [n, image_size, image_size, 3] to features "
            f"[n, feature_dim]; received output shape {features.shape}"
        )
    logits = hasher(features, training=False)
    if len(logits.shape) != 2:
        raise ValueError(
            "hasher must map features [n, feature_dim] to [n, code_length]; "
            f"received output shape {logits.shape}"
        )
    return int(features.shape[-1]), int(logits.shape[-1])



# TF's rule for the root scope names the SavedModel writer gives variables.
_SCOPE_RE = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$")


def exportable(model):
    """Return `model`, or a clone whose layer names TF can save.

    tf.saved_model rejects variables whose names start with "_" (layer names
    copied from torch state-dict keys such as "_blocks.0._bn0"). The clone
    strips the leading underscores and carries the same weights.
    """
    bad = [
        layer.name
        for layer in model._flatten_layers(include_self=False)
        if layer.weights and not _SCOPE_RE.match(layer.name)
    ]
    if not bad:
        return model
    logging.warning(
        "Renaming %d layers of %s for the SavedModel (e.g. %s -> %s)",
        len(bad),
        model.name,
        bad[0],
        bad[0].lstrip("_"),
    )

    def clone_layer(layer):
        config = layer.get_config()
        if not _SCOPE_RE.match(config.get("name", "x")):
            config["name"] = config["name"].lstrip("_") or "layer"
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


def build_archive(backbone, hasher, image_size, feature_dim):
    """Build a `keras.export.ExportArchive` with the three signatures."""
    archive = keras.export.ExportArchive()
    archive.track(backbone)
    archive.track(hasher)

    def from_features(features):
        codes = codes_tf.binarize_tf(hasher(features, training=False))
        return {
            wire_names.OUTPUT_CODES: codes,
            wire_names.OUTPUT_PACKED_CODES: codes_tf.pack_codes_tf(codes),
        }

    def from_pixels(pixels):
        return from_features(backbone(pixels, training=False))

    def serving_default(image_bytes):
        return from_pixels(decode_image_bytes(image_bytes, image_size))

    def encode_images(images):
        return from_pixels(preprocess_images(images, image_size))

    def encode_features(features):
        return from_features(features)

    archive.add_endpoint(
        wire_names.SIGNATURE_IMAGE_BYTES,
        serving_default,
        input_signature=[
            tf.TensorSpec(
                [None], tf.string, name=wire_names.INPUT_IMAGE_BYTES
            )
        ],
    )
    archive.add_endpoint(
        wire_names.SIGNATURE_IMAGES,
        encode_images,
        input_signature=[
            tf.TensorSpec(
                [None, None, None, 3],
                tf.uint8,
                name=wire_names.INPUT_IMAGES,
            )
        ],
    )
    archive.add_endpoint(
        wire_names.SIGNATURE_FEATURES,
        encode_features,
        input_signature=[
            tf.TensorSpec(
                [None, feature_dim],
                tf.float32,
                name=wire_names.INPUT_FEATURES,
            )
        ],
    )
    return archive
