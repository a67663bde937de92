"""TF-Serving warm-up records (`assets.extra/tf_serving_warmup_requests`).

One `PredictionLog` per image, each a `serving_default` request with a
one-image `image_bytes`; TF-Serving replays them before it serves a version,
and `uhga_tf.serving.server` does the same.
"""

import numpy as np
import tensorflow as tf

from uhga_tf.data import image_header
from uhga_tf.saved_model import wire_names


def synthetic_warmup_images(num_images=3, seed=0):
    """Return a few seeded encoded test images (PNG and JPEG, mixed sizes).

    Used for warm-up records when no real images are given.
    """
    rng = np.random.default_rng(seed)
    encoded = []
    for i in range(num_images):
        height, width = 48 + 16 * i, 64 - 8 * i
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        if i % 2:
            encoded.append(tf.io.encode_jpeg(pixels, quality=90).numpy())
        else:
            encoded.append(tf.io.encode_png(pixels).numpy())
    return encoded


def write_warmup_requests(
    path, image_bytes_list, model_name=wire_names.DEFAULT_MODEL_NAME
):
    """Write TF-Serving warm-up records: one PredictionLog per image.

    Each record is a `PredictionLog` whose `predict_log.request` is a
    `PredictRequest` for `serving_default` with a one-image `image_bytes`.
    """
    # Imported here so that encoding images never needs the serving protos.
    from tensorflow_serving.apis import model_pb2
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_log_pb2

    with tf.io.TFRecordWriter(path) as writer:
        for encoded in image_bytes_list:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(
                    name=model_name,
                    signature_name=wire_names.SIGNATURE_IMAGE_BYTES,
                )
            )
            request.inputs[wire_names.INPUT_IMAGE_BYTES].CopyFrom(
                tf.make_tensor_proto([encoded], dtype=tf.string)
            )
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def read_warmup_requests(path):
    """Parse a warm-up file back into a list of `PredictRequest` protos."""
    from tensorflow_serving.apis import prediction_log_pb2

    requests = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        requests.append(log.predict_log.request)
    return requests


def check_warmup_images(warmup_images):
    """Refuse warm-up images the server would refuse (ValueError).

    The decode guard every request path runs (`image_header.check_decodable`:
    JPEG, PNG, GIF, BMP or WebP within the default pixel limit), and the default
    per-request pixel limit over all of them.
    """
    total = 0
    for i, encoded in enumerate(warmup_images):
        try:
            total += image_header.check_decodable(
                bytes(encoded),
                image_header.DEFAULT_MAX_IMAGE_PIXELS,
                f"warmup_images[{i}]",
            )
        except image_header.ImageRefused as e:
            raise ValueError(f"{e}; expected what the server accepts") from e
    limit = image_header.DEFAULT_MAX_REQUEST_PIXELS
    if total > limit:
        raise ValueError(
            f"warmup_images hold {total} pixels, over max_request_pixels="
            f"{limit}"
        )
