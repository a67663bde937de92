"""Checks every front-end (gRPC, REST) runs on request inputs before the graph.

`check_input_array` is the one shared request path for the contents of an
input tensor: encoded images must pass the decode guard
(`image_header.check_decodable`: a header that states a size within the
pixel limits, every GIF frame counted, so a decompression bomb is refused
before any pixel is decoded and never reaches the batcher), declared
shapes must fit the limits before the tensor is materialised, pixel
tensors must fit the per-request limit, and float features must be finite.
"""

import dataclasses

import grpc
import numpy as np

from uhga_tf.data import image_header

DEFAULT_MAX_IMAGE_PIXELS = image_header.DEFAULT_MAX_IMAGE_PIXELS
DEFAULT_MAX_REQUEST_PIXELS = image_header.DEFAULT_MAX_REQUEST_PIXELS
# Largest gRPC message the server and our client accept (each side sets it).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class RequestError(Exception):
    """A request the server refuses, with its gRPC status code."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """Limits on what one request may make the server decode.

    Attributes:
        max_image_pixels: largest width x height of one image.
        max_request_pixels: largest sum of width x height over a request.
    """

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS

    def __post_init__(self):
        for name in ("max_image_pixels", "max_request_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (
                value < 1
            ):
                raise ValueError(
                    f"{name} must be a positive integer; received "
                    f"{name}={value!r}"
                )


def invalid_argument(message):
    """A RequestError with gRPC's INVALID_ARGUMENT (HTTP 400 over REST)."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_encoded_image(encoded, where, limits):
    """Check one encoded image from its header; return its pixel count.

    Raises:
        RequestError: INVALID_ARGUMENT when `image_header.check_decodable`
            refuses it (not an image, size unreadable, over the limit).
    """
    try:
        return image_header.check_decodable(
            encoded, limits.max_image_pixels, where
        )
    except image_header.ImageRefused as e:
        raise invalid_argument(str(e)) from e


def check_declared_shape(name, shape, limits):
    """Check a tensor's declared shape before it is materialised.

    A TensorProto may declare a huge shape and carry one value, which
    `tf.make_ndarray` repeats to fill it: the pixel limits must hold for
    the declared shape, not for the bytes on the wire.

    Raises:
        RequestError: INVALID_ARGUMENT naming the shape and the limit.
    """
    if len(shape) == 4:
        _check_pixel_shape(name, shape, limits)
    elements = 1
    for size in shape:
        elements *= max(int(size), 0)
    if elements > 3 * limits.max_request_pixels:
        raise invalid_argument(
            f"{name} declares shape {list(shape)} ({elements} values), "
            f"over 3 x max_request_pixels={limits.max_request_pixels}"
        )


def _check_pixel_shape(name, shape, limits):
    per_image = int(shape[1]) * int(shape[2])
    if per_image > limits.max_image_pixels:
        raise invalid_argument(
            f"{name} holds {shape[1]}x{shape[2]} images "
            f"({per_image} pixels), over max_image_pixels="
            f"{limits.max_image_pixels}"
        )
    total = per_image * int(shape[0])
    if total > limits.max_request_pixels:
        raise invalid_argument(
            f"{name} holds {total} pixels, over max_request_pixels="
            f"{limits.max_request_pixels}"
        )


def check_input_array(name, array, limits):
    """Check the contents of one input tensor before the graph runs.

    Args:
        name: the input's name (for messages).
        array: the input as a NumPy array (object/bytes for image_bytes,
            uint8 [n, h, w, 3] for pixels, float for features).
        limits: `RequestLimits`.

    Raises:
        RequestError: INVALID_ARGUMENT naming the item and the limit.
    """
    if array.dtype.kind in ("O", "S"):
        total = 0
        for i, encoded in enumerate(array.reshape(-1)):
            total += check_encoded_image(encoded, f"{name}[{i}]", limits)
            if total > limits.max_request_pixels:
                raise invalid_argument(
                    f"{name} holds over {total} pixels in its first {i + 1} "
                    f"images, over max_request_pixels="
                    f"{limits.max_request_pixels}"
                )
        return
    if array.dtype.kind in ("u", "i") and array.ndim == 4:
        _check_pixel_shape(name, array.shape, limits)
        return
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            row = int(np.argwhere(~finite)[0][0])
            raise invalid_argument(
                f"{name}[{row}] holds NaN or infinite values; expected "
                "finite features"
            )
