"""Embedded gRPC model server speaking TF-Serving's own protos.

`ModelServer` serves the SavedModels that `uhga_tf.export` writes under a base
path (`<base>/<version>/`) through `tensorflow.serving.PredictionService`
(`Predict`, `GetModelMetadata`) and `tensorflow.serving.ModelService`
(`GetModelStatus`), so the same client works against it and against the real
`tensorflow_model_server` (the production path, see `serving/`).

Behaviour follows TF-Serving where it is observable by a client:

- the newest `num_versions` integer version directories are loaded; the base
  path is polled every `poll_interval_s` and a new version is loaded, warmed
  up with its `assets.extra/tf_serving_warmup_requests` and then swapped in;
  requests already running keep the version they started with;
- `model_spec.version` picks a loaded version, `model_spec.version_label` a
  label from `version_labels`; an unknown model or version is NOT_FOUND;
- inputs are checked against the SignatureDef before the graph runs: an
  unknown signature, a missing or unknown input name, a wrong dtype or shape,
  an empty batch, a batch over `max_batch_size`, bytes that are not an image,
  an image whose header states more than `max_image_pixels` (a request
  more than `max_request_pixels`), non-finite features, or an unknown
  `output_filter` name are INVALID_ARGUMENT with a message naming the
  problem (`request_checks.check_input_array`, shared by every front-end);
- a version that fails to load, for any reason, is logged, reported by
  GetModelStatus as END with its error and skipped; the poller keeps going;
- the port is bound exclusively (no SO_REUSEPORT twin servers);
- with `enable_batching`, concurrent requests for the same signature (and,
  for pixel inputs, the same image shape) are merged into one graph run of
  up to `max_batch_size` items, waiting at most `batch_timeout_ms`.

Each failed request logs one warning line; the server keeps serving.
Versions are kept by `model_manager.ModelManager`, batching is
`batcher.Batcher`; this module holds the request path shared by gRPC and
REST (`ModelServer.handle`).

From a request to its codes, three calls from the front-end's handler:

1. `ModelServer.handle`: called by the gRPC handler (`_handler`) and by
   `rest.RestApi.predict` (which first turns the JSON into the same
   `PredictRequest`); counts, logs and maps refusals to status codes;
2. `ModelServer.predict`: picks the version, runs every check
   (`_checked_input`, `request_checks`) and builds the response;
3. the SavedModel's signature function (`servable.functions[signature]`,
   through `Batcher.run` when batching is on).

The codes themselves are computed inside that signature (decode, resize,
backbone, hash head and the sign rule: `uhga_tf.saved_model.graph`);
nothing in this package computes or changes a code bit.
"""

import concurrent.futures
import dataclasses
import os
import threading
import time
from typing import Mapping

from absl import logging
import grpc
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from uhga_tf import io_utils
from uhga_tf.data import image_decode
from uhga_tf.saved_model import wire_names
from uhga_tf.serving import prometheus
from uhga_tf.serving.batcher import Batcher
from uhga_tf.serving.model_manager import ModelManager
from uhga_tf.serving import request_checks

RequestError = request_checks.RequestError

DEFAULT_SIGNATURE = wire_names.SIGNATURE_IMAGE_BYTES


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Settings of the embedded server.

    Attributes:
        model_base_path: directory holding integer version subdirectories.
        model_name: the one model name this server answers to.
        host: interface to bind; loopback unless asked otherwise.
        port: gRPC port; 0 picks a free one (see `ModelServer.port`).
        poll_interval_s: seconds between scans of `model_base_path`.
        num_versions: how many of the newest versions stay loaded.
        version_labels: label -> version, for `model_spec.version_label`.
        enable_batching: merge concurrent requests into one graph run.
        max_batch_size: largest batch a request (or a merged run) may hold.
        batch_timeout_ms: longest wait for more requests to merge.
        num_threads: gRPC worker threads.
        max_image_pixels: largest width x height of one encoded image,
            read from its header before decoding.
        max_request_pixels: largest total of pixels in one request.
    """

    model_base_path: str
    model_name: str = wire_names.DEFAULT_MODEL_NAME
    host: str = "127.0.0.1"
    port: int = 8500
    poll_interval_s: float = 2.0
    num_versions: int = 1
    version_labels: Mapping[str, int] = dataclasses.field(
        default_factory=dict
    )
    enable_batching: bool = False
    max_batch_size: int = 64
    batch_timeout_ms: float = 2.0
    num_threads: int = 16
    max_image_pixels: int = request_checks.DEFAULT_MAX_IMAGE_PIXELS
    max_request_pixels: int = request_checks.DEFAULT_MAX_REQUEST_PIXELS

    def __post_init__(self):
        self.limits()  # validates the pixel limits
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(
                f"port must be in [0, 65535]; received port={self.port}"
            )
        if self.poll_interval_s <= 0:
            raise ValueError(
                "poll_interval_s must be > 0; received "
                f"poll_interval_s={self.poll_interval_s}"
            )
        for name in ("num_versions", "max_batch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name} must be >= 1; received "
                    f"{name}={getattr(self, name)}"
                )
        if self.batch_timeout_ms < 0:
            raise ValueError(
                "batch_timeout_ms must be >= 0; received "
                f"batch_timeout_ms={self.batch_timeout_ms}"
            )
        for label, version in self.version_labels.items():
            if not label or not isinstance(version, int) or version < 1:
                raise ValueError(
                    "version_labels must map non-empty labels to positive "
                    f"versions; received {label!r}={version!r}"
                )

    def limits(self):
        """The `RequestLimits` every front-end applies."""
        return request_checks.RequestLimits(
            max_image_pixels=self.max_image_pixels,
            max_request_pixels=self.max_request_pixels,
        )


def _dtype_name(enum):
    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return f"dtype enum {enum}"


class ModelServer:
    """The embedded server: a ModelManager, a poller and a gRPC server.

    Example:
        server = ModelServer(ServerConfig("models/uhga", port=0))
        port = server.start()
        ...
        server.stop()
    """

    def __init__(self, config):
        self.config = config
        if not os.path.isdir(config.model_base_path):
            raise FileNotFoundError(
                f"model_base_path {config.model_base_path} is not a directory"
            )
        self.manager = ModelManager(
            config.model_base_path,
            num_versions=config.num_versions,
            version_labels=config.version_labels,
        )
        self.manager.warmup = self._warmup
        self._limits = config.limits()
        self.metrics = prometheus.ServingMetrics(
            config.model_name,
            self.manager.versions,
            self.manager.signature_names,
            config.version_labels,
        )
        self._batcher = None
        self._grpc = None
        self._stop = threading.Event()
        self._poller = None
        self.port = None

    # Lifecycle -----------------------------------------------------------

    def start(self):
        """Load the newest version(s), bind, start polling; return the port."""
        self.manager.poll()
        if not self.manager.versions():
            logging.warning(
                "No servable version under %s yet; polling every %.1f s",
                self.config.model_base_path,
                self.config.poll_interval_s,
            )
        if self.config.enable_batching:
            self._batcher = Batcher(
                self.config.max_batch_size, self.config.batch_timeout_ms
            )
        limit = request_checks.MAX_MESSAGE_BYTES
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ]
        # gRPC turns SO_REUSEPORT on by default, which lets a second server
        # bind a port that is already serving: bind exclusively instead.
        options.append(("grpc.so_reuseport", 0))
        self._grpc = grpc.server(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=self.config.num_threads,
                thread_name_prefix="uhga-grpc",
            ),
            options=options,
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionServicer(self), self._grpc
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            _ModelServicer(self), self._grpc
        )
        address = f"{self.config.host}:{self.config.port}"
        taken = (
            f"cannot bind {address} (--port={self.config.port}): expected a "
            "free port; another process is listening there"
        )
        try:
            port = self._grpc.add_insecure_port(address)
        except RuntimeError as e:
            raise ValueError(taken) from e
        if not port:
            raise ValueError(taken)
        self.port = port
        self._grpc.start()
        self._poller = threading.Thread(
            target=self._poll_loop, name="uhga-poller", daemon=True
        )
        self._poller.start()
        logging.info(
            "Serving model %r from %s on %s:%d (versions %s)",
            self.config.model_name,
            self.config.model_base_path,
            self.config.host,
            port,
            self.manager.versions(),
        )
        return port

    def stop(self, grace_s=5.0):
        """Stop accepting requests, let running ones finish, stop threads."""
        self._stop.set()
        if self._grpc is not None:
            self._grpc.stop(grace_s).wait()
        if self._poller is not None:
            self._poller.join(timeout=grace_s)
        if self._batcher is not None:
            self._batcher.stop()
        logging.info("Server stopped")

    def wait(self):
        """Block until `stop` is called (from another thread or a signal)."""
        while not self._stop.wait(0.5):
            pass

    def _poll_loop(self):
        while not self._stop.wait(self.config.poll_interval_s):
            try:
                self.manager.poll()
            except Exception:  # noqa: BLE001 - the poller must never die
                logging.exception("Polling %s failed", self.manager.base_path)

    def _warmup(self, servable):
        requests = servable.warmup_requests()
        for request in requests:
            self.predict(request, servable=servable)
        if requests:
            logging.info(
                "Warmed up version %d with %d requests",
                servable.version,
                len(requests),
            )

    # Requests ------------------------------------------------------------

    def predict(self, request, servable=None):
        """Answer a PredictRequest or raise RequestError.

        The codes come from the SavedModel's signature function, called
        here (through the Batcher when batching is on); `servable` is given
        only by the warm-up, for a version not yet swapped in.
        """
        if servable is None:
            servable = self.manager.get(
                request.model_spec, self.config.model_name
            )
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        output_filter = list(request.output_filter)
        input_name, array = self._checked_input(
            servable, signature, request, output_filter
        )
        try:
            if self._batcher is not None:
                outputs = self._batcher.run(
                    servable, signature, input_name, array
                )
            else:
                outputs = servable.functions[signature](
                    **{input_name: tf.constant(array)}
                )
                outputs = {k: v.numpy() for k, v in outputs.items()}
        except tf.errors.InvalidArgumentError as e:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                self._locate_error(
                    servable.signature_defs[signature], input_name, array, e
                ),
            ) from e
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.config.model_name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        for key in output_filter or list(outputs):
            response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key]))
        return response

    def _checked_input(self, servable, signature, request, output_filter):
        """Check signature, output_filter and inputs; return (name, array)."""
        if signature not in servable.signature_defs:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Serving signature key {signature!r} not found; available: "
                f"{sorted(servable.signature_defs)}",
            )
        signature_def = servable.signature_defs[signature]
        for name in output_filter:
            if name not in signature_def.outputs:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output_filter name {name!r} is not an output of "
                    f"signature {signature!r}; outputs: "
                    f"{sorted(signature_def.outputs)}",
                )
        inputs = self._validate_inputs(signature, signature_def, request)
        (input_name, array), = inputs.items()
        return input_name, array

    def _validate_inputs(self, signature, signature_def, request):
        expected = signature_def.inputs
        given = set(request.inputs)
        unknown = sorted(given - set(expected))
        if unknown:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input names {unknown} are not inputs of signature "
                f"{signature!r}; expected {sorted(expected)}",
            )
        missing = sorted(set(expected) - given)
        if missing:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"signature {signature!r} needs inputs {missing}",
            )
        arrays = {
            name: self._input_array(signature, name, info, request.inputs[name])
            for name, info in expected.items()
        }
        if len(arrays) != 1:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"signature {signature!r} has {len(arrays)} inputs; this "
                "server runs single-input signatures",
            )
        return arrays

    def _input_array(self, signature, name, info, proto):
        """Check one input's dtype, shape and contents; return its array."""
        if proto.dtype != info.dtype:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r} of signature {signature!r} must be "
                f"{_dtype_name(info.dtype)}; received "
                f"{_dtype_name(proto.dtype)}",
            )
        shape = [d.size for d in proto.tensor_shape.dim]
        want = [d.size for d in info.tensor_shape.dim]
        mismatch = any(w >= 0 and s != w for s, w in zip(shape, want))
        if (
            proto.tensor_shape.unknown_rank
            or len(shape) != len(want)
            or mismatch
        ):
            pretty = [None if w < 0 else w for w in want]
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r} of signature {signature!r} must have "
                f"shape {pretty}; received {shape}",
            )
        if any(s <= 0 for s in shape[1:]):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r} has an empty dimension: shape {shape}",
            )
        batch = shape[0]
        if batch == 0:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r} is an empty batch (shape {shape})",
            )
        if batch > self.config.max_batch_size:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r} holds a batch of {batch}, over "
                f"max_batch_size={self.config.max_batch_size}",
            )
        request_checks.check_declared_shape(name, shape, self._limits)
        try:
            array = tf.make_ndarray(proto)
        except (ValueError, TypeError) as e:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r} is not a valid TensorProto of shape "
                f"{shape}: {e}",
            ) from e
        if list(array.shape) != shape:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r} declares shape {shape} but holds "
                f"{array.size} values",
            )
        request_checks.check_input_array(name, array, self._limits)
        return array

    @staticmethod
    def _locate_error(signature_def, input_name, array, error):
        """Name the offending image of a failed decode when possible."""
        summary = io_utils.tf_error_line(error)
        info = signature_def.inputs[input_name]
        if info.dtype != tf.string.as_datatype_enum or len(array) < 2:
            if info.dtype == tf.string.as_datatype_enum:
                return f"{input_name}[0]: {summary}"
            return summary
        for i, encoded in enumerate(array):
            try:
                image_decode.decode_upright(encoded)
            except tf.errors.InvalidArgumentError as e:
                return f"{input_name}[{i}]: {io_utils.tf_error_line(e)}"
        return summary

    def handle(self, api, method, fn, request, fill=None):
        """Answer one request of either API; log a refusal once, count all.

        The one request path of gRPC and REST: the same handlers, the same
        validation, the same messages and status codes.

        Args:
            api: "grpc" or "rest" (a metrics label).
            method: "Predict", "GetModelMetadata" or "GetModelStatus".
            fn: its handler (`predict`, `model_metadata`, `model_status`).
            request: the request proto (`model_spec` at least set).
            fill: optional callable(request) completing it (REST parses its
                JSON body here, so parse errors are logged and counted
                like any other refusal).

        Raises:
            RequestError: the refusal, with its gRPC status code; TF op
                errors and any unexpected exception become INTERNAL.
        """
        start = time.perf_counter()
        response, version, status = None, None, "OK"
        try:
            if fill is not None:
                fill(request)
            response = fn(request)
            if "model_spec" in response.DESCRIPTOR.fields_by_name:
                version = response.model_spec.version.value
            return response
        except RequestError as e:
            status = e.code.name
            logging.warning("%s %s: %s", method, e.code.name, e.message)
            raise
        except tf.errors.OpError as e:
            status = grpc.StatusCode.INTERNAL.name
            message = io_utils.tf_error_line(e)
            logging.error("%s INTERNAL: %s", method, message)
            raise RequestError(grpc.StatusCode.INTERNAL, message) from e
        except Exception as e:  # noqa: BLE001 - every request is answered
            # A bug, not a refusal: the client gets one line, the log the
            # traceback, and Prometheus counts it as INTERNAL.
            status = grpc.StatusCode.INTERNAL.name
            message = f"internal error: {type(e).__name__}: {e}"
            logging.exception("%s INTERNAL: %s", method, message)
            raise RequestError(grpc.StatusCode.INTERNAL, message) from e
        finally:
            self.metrics.observe(
                api,
                method,
                request.model_spec,
                version,
                status,
                time.perf_counter() - start,
            )

    def model_metadata(self, request):
        """Answer a GetModelMetadataRequest or raise RequestError."""
        servable = self.manager.get(request.model_spec, self.config.model_name)
        fields = list(request.metadata_field)
        unsupported = [f for f in fields if f != "signature_def"]
        if not fields or unsupported:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "metadata_field must be ['signature_def']; received "
                f"{fields}",
            )
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.config.model_name
        response.model_spec.version.value = servable.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def model_status(self, request):
        """Answer a GetModelStatusRequest or raise RequestError."""
        spec = request.model_spec
        if spec.name != self.config.model_name:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"Could not find any versions of model {spec.name!r}",
            )
        versions = self.manager.versions()
        choice = spec.WhichOneof("version_choice")
        if choice is not None:
            versions = [self.manager.get(spec, self.config.model_name).version]
        elif not versions and not self.manager.failed():
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"Could not find any versions of model {spec.name!r}",
            )
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in versions:
            status = response.model_version_status.add()
            status.version = version
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        if choice is None:
            # As TF-Serving: a version that failed to load is END with its
            # error in `status`.
            for version, message in sorted(self.manager.failed().items()):
                status = response.model_version_status.add()
                status.version = version
                status.state = get_model_status_pb2.ModelVersionStatus.END
                status.status.error_code = grpc.StatusCode.UNKNOWN.value[0]
                status.status.error_message = message
        return response


def _handler(server, method, fn):
    """Wrap a request handler for gRPC: abort with the refusal's status."""

    def handle(request, context):
        try:
            return server.handle("grpc", method, fn, request)
        except RequestError as e:
            context.abort(e.code, e.message)

    return handle


class _PredictionServicer(
    prediction_service_pb2_grpc.PredictionServiceServicer
):
    def __init__(self, server):
        self.Predict = _handler(server, "Predict", server.predict)
        self.GetModelMetadata = _handler(
            server, "GetModelMetadata", server.model_metadata
        )


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server):
        self.GetModelStatus = _handler(
            server, "GetModelStatus", server.model_status
        )
