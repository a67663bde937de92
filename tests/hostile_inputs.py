"""Small hostile inputs that try to get past the decode guard (issue 18).

Each builder returns real bytes a decoder accepts; their headers lie or
cannot be read, so only a guard that counts what the decoder will produce
refuses them. Shared by the bad-input catalogue and `benchmarks/serving.py`.
"""

import io
import struct

import numpy as np
from PIL import Image


def jpeg_with_junk_before_sof(width, height, junk=b"\x00\x00"):
    """A JPEG with `junk` just before its SOF marker (libjpeg skips it)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(
        buffer, "JPEG", quality=50
    )
    data = buffer.getvalue()
    sof = data.index(b"\xff\xc0")
    return data[:sof] + junk + data[sof:]


def jpeg_with_junk_before_dqt(width, height):
    """The same trick one marker earlier: junk before the first DQT."""
    data = jpeg_with_junk_before_sof(width, height, junk=b"")
    dqt = data.index(b"\xff\xdb")
    return data[:dqt] + b"\x00" + data[dqt:]


def gif_frame_over_canvas(canvas, frame):
    """A GIF whose 1-frame rectangle `frame` (w, h) exceeds its canvas.

    giflib reads the frame at its own size before TensorFlow clips it to
    the canvas, so the canvas in the header understates the cost.
    """
    width, height = frame
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint8), "L").save(
        buffer, "GIF"
    )
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", *canvas)
    return bytes(data)


def animated_gif(width, height, frames):
    """An animated GIF of `frames` distinct frames of width x height."""
    images = [
        Image.fromarray(np.full((height, width, 3), 30 * i % 256, np.uint8))
        for i in range(frames)
    ]
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def truncated_bmp_header():
    """The first 20 bytes of a BMP: the size fields are cut off."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, "BMP")
    return buffer.getvalue()[:20]


def one_bit_bmp(width=16, height=16):
    """A 1-bit BMP: PIL opens it, tf.io.decode_image refuses it."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "BMP")
    return buffer.getvalue()


def over_declared_request(shape, model="uhga"):
    """An `encode_images` PredictRequest declaring `shape`, holding 1 value.

    `tf.make_ndarray` repeats that value to fill the declared shape.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "encode_images"
    proto = request.inputs["images"]
    proto.dtype = tf.uint8.as_datatype_enum
    for size in shape:
        proto.tensor_shape.dim.add().size = size
    proto.int_val.append(7)
    return request


def nested_json(depth, key="instances"):
    """A request body whose `key` is `depth` nested lists of 0."""
    return ('{"%s": ' % key + "[" * depth + "0" + "]" * depth + "}").encode()
