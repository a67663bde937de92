"""PredictionService client for uhga_tf SavedModels.

Works against `uhga_tf.serving.server` and the real `tensorflow_model_server`
alike: every call names the signature, sets an `output_filter` and a
deadline, and goes over one cached channel per server address (or the
`channel` passed in).

Example:
    codes, packed_codes = encode_images("localhost:8500", [jpeg_bytes])
"""

import threading

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from uhga_tf import codes as codes_lib
from uhga_tf.saved_model import wire_names
from uhga_tf.serving.request_checks import MAX_MESSAGE_BYTES

_channels = {}
_channels_lock = threading.Lock()


def get_channel(server):
    """Return the process-wide insecure channel to `server` ("host:port")."""
    if not server or ":" not in server:
        raise ValueError(
            f"server must be 'host:port'; received server={server!r}"
        )
    with _channels_lock:
        channel = _channels.get(server)
        if channel is None:
            channel = grpc.insecure_channel(
                server,
                options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ],
            )
            _channels[server] = channel
        return channel


def close_channels():
    """Close every cached channel (tests and short-lived tools)."""
    with _channels_lock:
        for channel in _channels.values():
            channel.close()
        _channels.clear()


def _check_timeout(timeout):
    if timeout is None or not timeout > 0:
        raise ValueError(f"timeout must be > 0 s; received timeout={timeout}")


def _for_model(request, model_name, version):
    """Set `request.model_spec` to `model_name` (and `version` if given)."""
    request.model_spec.name = model_name
    if version is not None:
        request.model_spec.version.value = int(version)
    return request


def make_predict_request(
    inputs,
    model_name=wire_names.DEFAULT_MODEL_NAME,
    signature_name=wire_names.SIGNATURE_IMAGE_BYTES,
    version=None,
    output_filter=wire_names.OUTPUT_KEYS,
):
    """Build a PredictRequest from {input_name: np.ndarray}."""
    request = _for_model(predict_pb2.PredictRequest(), model_name, version)
    request.model_spec.signature_name = signature_name
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    return request


def predict(
    server,
    inputs,
    model_name=wire_names.DEFAULT_MODEL_NAME,
    signature_name=wire_names.SIGNATURE_IMAGE_BYTES,
    timeout=10.0,
    channel=None,
    version=None,
    output_filter=wire_names.OUTPUT_KEYS,
):
    """Send one Predict call; return {output_name: np.ndarray}.

    Raises:
        grpc.RpcError: with the server's status code and message.
    """
    _check_timeout(timeout)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        channel or get_channel(server)
    )
    request = make_predict_request(
        inputs, model_name, signature_name, version, output_filter
    )
    response = stub.Predict(request, timeout=timeout)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def _encode(server, inputs, model_name, signature_name, timeout, channel):
    """One Predict call for codes; return (codes, packed_codes), checked."""
    outputs = predict(
        server,
        inputs,
        model_name=model_name,
        signature_name=signature_name,
        timeout=timeout,
        channel=channel,
    )
    return _codes_from(outputs)


def _codes_from(outputs):
    codes = outputs[wire_names.OUTPUT_CODES].astype(np.int8, copy=False)
    packed_codes = outputs[wire_names.OUTPUT_PACKED_CODES].astype(
        np.uint8, copy=False
    )
    if not np.array_equal(
        codes_lib.unpack_codes(packed_codes, codes.shape[1]), codes
    ):
        raise ValueError("server returned packed_codes that differ from codes")
    return codes, packed_codes


def encode_images(
    server,
    image_bytes_list,
    model_name=wire_names.DEFAULT_MODEL_NAME,
    signature_name=wire_names.SIGNATURE_IMAGE_BYTES,
    timeout=10.0,
    channel=None,
):
    """Encode JPEG/PNG bytes on the server.

    Args:
        server: "host:port" of the gRPC endpoint (ignored if `channel`).
        image_bytes_list: encoded images (bytes), one request for all.
        signature_name: a signature whose input is `image_bytes`.
        timeout: per-call deadline in seconds.
        channel: an open grpc.Channel to use instead of the cached one.

    Returns:
        (codes int8 [n, code_length] in {-1, +1},
         packed_codes uint8 [n, ceil(code_length / 8)], np.packbits order).
    """
    image_bytes_list = [bytes(b) for b in image_bytes_list]
    if not image_bytes_list:
        raise ValueError("image_bytes_list must hold at least one image")
    batch = np.array(image_bytes_list, dtype=object)
    return _encode(
        server,
        {wire_names.INPUT_IMAGE_BYTES: batch},
        model_name,
        signature_name,
        timeout,
        channel,
    )


def encode_uint8_images(
    server,
    images,
    model_name=wire_names.DEFAULT_MODEL_NAME,
    signature_name=wire_names.SIGNATURE_IMAGES,
    timeout=10.0,
    channel=None,
):
    """Encode uint8 [n, h, w, 3] RGB pixels (resized on the server).

    Returns:
        (codes int8 [n, code_length], packed_codes uint8 [n, bytes]).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            "images must be uint8 [n, h, w, 3]; received "
            f"{images.dtype} {images.shape}"
        )
    return _encode(
        server,
        {wire_names.INPUT_IMAGES: images},
        model_name,
        signature_name,
        timeout,
        channel,
    )


def encode_features(
    server,
    features,
    model_name=wire_names.DEFAULT_MODEL_NAME,
    signature_name=wire_names.SIGNATURE_FEATURES,
    timeout=10.0,
    channel=None,
):
    """Encode float32 backbone features [n, feature_dim] on the server."""
    features = np.asarray(features, dtype=np.float32)
    return _encode(
        server,
        {wire_names.INPUT_FEATURES: features},
        model_name,
        signature_name,
        timeout,
        channel,
    )


def get_model_metadata(
    server,
    model_name=wire_names.DEFAULT_MODEL_NAME,
    timeout=10.0,
    channel=None,
    version=None,
):
    """Return (version, {signature: {"inputs": .., "outputs": ..}}).

    Each input/output maps its name to (dtype name, shape with None for
    unknown dimensions).
    """
    _check_timeout(timeout)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        channel or get_channel(server)
    )
    request = _for_model(
        get_model_metadata_pb2.GetModelMetadataRequest(), model_name, version
    )
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=timeout)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)

    def describe(infos):
        return {
            name: (
                tf.dtypes.as_dtype(info.dtype).name,
                [None if d.size < 0 else d.size for d in info.tensor_shape.dim],
            )
            for name, info in infos.items()
        }

    signatures = {
        key: {
            "inputs": describe(value.inputs),
            "outputs": describe(value.outputs),
            "method_name": value.method_name,
        }
        for key, value in signature_map.signature_def.items()
    }
    return response.model_spec.version.value, signatures


def get_model_status(
    server,
    model_name=wire_names.DEFAULT_MODEL_NAME,
    timeout=10.0,
    channel=None,
    version=None,
):
    """Return {version: state name} (e.g. {3: "AVAILABLE"})."""
    _check_timeout(timeout)
    stub = model_service_pb2_grpc.ModelServiceStub(
        channel or get_channel(server)
    )
    request = _for_model(
        get_model_status_pb2.GetModelStatusRequest(), model_name, version
    )
    response = stub.GetModelStatus(request, timeout=timeout)
    state_name = get_model_status_pb2.ModelVersionStatus.State.Name
    return {
        status.version: state_name(status.state)
        for status in response.model_version_status
    }
