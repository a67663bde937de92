"""TF-Serving's REST API and Prometheus metrics for the embedded server.

`RestServer` answers, on its own port (TF-Serving uses 8501):

- `POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict` with
  `{"instances": [...]}` (row format) or `{"inputs": ...}` (columnar), an
  optional `signature_name`, binary values as `{"b64": "..."}`; answers
  `{"predictions": ...}` or `{"outputs": ...}` like TF-Serving. This server
  also honours an optional `output_filter` list (TF-Serving's REST has none);
- `GET /v1/models/<name>[/versions/<v>|/labels/<l>]`: the version status;
- `GET /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata`: the
  SignatureDefs;
- `GET /monitoring/prometheus/metrics`: `uhga_tf.serving.prometheus`.

Every request becomes the same proto a gRPC client sends and goes through
`ModelServer.handle`, so validation, limits, messages and status codes are
those of the gRPC API; only the JSON decoding is REST's own (as in
TF-Serving, JSON numbers take the signature's dtype). Errors are
`{"error": "<message>"}` with TF-Serving's HTTP code for the gRPC status.

The HTTP layer is `uhga_tf.serving.http_server` (the standard library's
threaded server with keep-alive, a connection cap that idle or trickling
clients cannot hold, a total read deadline per request and refusal of
ambiguous framing); `benchmarks/serving.py` measures it against gRPC and
under slow-client attack. Any unexpected error is a one-line 500.
"""

import base64
import binascii
import json
import re

from absl import logging
from google.protobuf import json_format
import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import predict_pb2

from uhga_tf.serving import http_server
from uhga_tf.serving import request_checks
from uhga_tf.serving.request_checks import invalid_argument
from uhga_tf.serving import server as server_lib

# A JSON body may carry a base64 gRPC-sized message, plus JSON overhead.
MAX_BODY_BYTES = request_checks.MAX_MESSAGE_BYTES * 4 // 3 + 1024 * 1024
# Tensors have a handful of dimensions; deeper JSON is an attack on the
# recursive decoders (Python's json and ours), refused before it recurses.
MAX_JSON_DEPTH = 32
INT64_MAX = 2**63 - 1
METRICS_PATH = "/monitoring/prometheus/metrics"

# TF-Serving's mapping (model_servers/http_server.cc, ToHTTPStatusCode).
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<rest>/metadata|:predict|:classify|:regress)?$"
)
_STATE = get_model_status_pb2.ModelVersionStatus.State
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _error_code_name(value):
    return _CODE_NAMES.get(value, str(value))


def http_status(code):
    """Return TF-Serving's HTTP status for a grpc.StatusCode."""
    return _HTTP_STATUS.get(code, 500)


def _too_deep(document):
    """True if `document` nests lists/objects deeper than MAX_JSON_DEPTH.

    Iterative and linear, so the recursive decoders that follow never see
    such a document (json.loads itself stops at Python's recursion limit).
    """
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend(
            (child, depth + 1)
            for child in children
            if isinstance(child, (list, dict))
        )
    return False


def _is_b64(value):
    return isinstance(value, dict) and set(value) == {"b64"}


def _is_b64_list(value):
    return (
        isinstance(value, list)
        and bool(value)
        and all(_is_b64(v) for v in value)
    )


def _decode_leaves(value, path):
    """Nested JSON lists -> nested lists with `{"b64": s}` turned to bytes."""
    if isinstance(value, list):
        return [_decode_leaves(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if _is_b64(value):
        text = value["b64"]
        if not isinstance(text, str):
            raise invalid_argument(f"{path}: 'b64' must hold a string")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise invalid_argument(f"{path}: invalid base64: {e}") from e
    if isinstance(value, dict):
        raise invalid_argument(
            f"{path}: objects other than {{\"b64\": ...}} are not tensor "
            f"values; received keys {sorted(value)}"
        )
    return value


def _leaves(value):
    if isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _tensor_proto(value, dtype, name):
    """JSON value (b64 already decoded) -> TensorProto of the input's dtype.

    Bytes or strings make a string tensor whatever the signature wants, so
    the shared validation names the dtype mismatch as it does for gRPC.
    """
    leaves = list(_leaves(value))
    textual = [v for v in leaves if isinstance(v, (bytes, str))]
    if textual and len(textual) != len(leaves):
        raise invalid_argument(f"input {name!r} mixes strings and numbers")
    try:
        if textual or (not leaves and dtype == tf.string):
            encoded = _map_leaves(
                value, lambda v: v.encode() if isinstance(v, str) else v
            )
            shape = _shape_of(encoded, name)
            array = np.array(encoded, dtype=object).reshape(shape)
            return tf.make_tensor_proto(array, dtype=tf.string)
        array = np.asarray(value)
    except ValueError as e:
        raise invalid_argument(
            f"input {name!r} is not a rectangular array: {e}"
        ) from e
    if array.dtype == object:
        raise invalid_argument(
            f"input {name!r} is not a rectangular numeric array"
        )
    if dtype == tf.string:
        raise invalid_argument(
            f"input {name!r} must be strings or {{\"b64\": ...}} values; "
            f"received numbers"
        )
    if dtype.is_integer:
        if array.size and array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or np.any(
                array != np.round(array)
            ):
                raise invalid_argument(
                    f"input {name!r} must be {dtype.name}; received "
                    "non-integer JSON numbers"
                )
        if array.size and (
            array.min() < dtype.min or array.max() > dtype.max
        ):
            raise invalid_argument(
                f"input {name!r} must be {dtype.name} in [{dtype.min}, "
                f"{dtype.max}]; received values in [{array.min()}, "
                f"{array.max()}]"
            )
    elif dtype == tf.bool and array.size and array.dtype != np.bool_:
        raise invalid_argument(f"input {name!r} must be true/false values")
    return tf.make_tensor_proto(array.astype(dtype.as_numpy_dtype))


def _map_leaves(value, fn):
    if isinstance(value, list):
        return [_map_leaves(v, fn) for v in value]
    return fn(value)


def _shape_of(value, name):
    shape, level = [], value
    while isinstance(level, list):
        shape.append(len(level))
        if not level:
            break
        level = level[0]
    _check_rectangular(value, shape, name)
    return shape


def _check_rectangular(value, shape, name):
    if not shape:
        if isinstance(value, list):
            raise ValueError(f"input {name!r} is not rectangular")
        return
    if not isinstance(value, list) or len(value) != shape[0]:
        raise ValueError(
            f"input {name!r} is not rectangular (expected shape {shape})"
        )
    for v in value:
        _check_rectangular(v, shape[1:], name)


def _json_value(array):
    """np.ndarray -> JSON-ready lists; bytes as {"b64": ...} (TF-Serving)."""
    if array.dtype == object or array.dtype.kind == "S":
        return _map_leaves(
            array.tolist(),
            lambda v: {"b64": base64.b64encode(v).decode("ascii")},
        )
    return array.tolist()


class RestApi:
    """Turns REST calls into `ModelServer.handle` calls and back to JSON."""

    def __init__(self, model_server):
        self.server = model_server
        self.model_name = model_server.config.model_name

    def _model_spec(self, spec, match):
        spec.name = match["name"]
        if match["version"] is not None:
            version = http_server.parse_int(match["version"], INT64_MAX)
            if version is None:
                raise invalid_argument(
                    f"version must be an integer in [0, {INT64_MAX}]; "
                    f"received {match['version']!r}"
                )
            spec.version.value = version
        elif match["label"] is not None:
            spec.version_label = match["label"]

    def predict(self, match, body):
        """Return the JSON answer of a :predict call (RequestError if not)."""
        request = predict_pb2.PredictRequest()
        state = {}

        def fill(request):
            self._model_spec(request.model_spec, match)
            document = self._parse(body)
            signature = document.get("signature_name")
            if signature is not None and not isinstance(signature, str):
                raise invalid_argument("signature_name must be a string")
            request.model_spec.signature_name = (
                signature or server_lib.DEFAULT_SIGNATURE
            )
            output_filter = document.get("output_filter", [])
            if not isinstance(output_filter, list) or not all(
                isinstance(n, str) for n in output_filter
            ):
                raise invalid_argument("output_filter must be a list of names")
            request.output_filter.extend(output_filter)
            state["row"] = self._fill_inputs(request, document)

        response = self.server.handle(
            "rest", "Predict", self.server.predict, request, fill
        )
        outputs = {
            key: tf.make_ndarray(value)
            for key, value in response.outputs.items()
        }
        names = list(request.output_filter) or sorted(outputs)
        if state["row"]:
            if len(names) == 1:
                return {
                    "predictions": _json_value(outputs[names[0]])
                }
            columns = {n: _json_value(outputs[n]) for n in names}
            rows = len(next(iter(columns.values())))
            return {
                "predictions": [
                    {n: columns[n][i] for n in names} for i in range(rows)
                ]
            }
        if len(names) == 1:
            return {"outputs": _json_value(outputs[names[0]])}
        return {"outputs": {n: _json_value(outputs[n]) for n in names}}

    @staticmethod
    def _parse(body):
        too_deep = (
            f"JSON Parse error: nested deeper than {MAX_JSON_DEPTH} levels"
        )
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise invalid_argument(f"JSON Parse error: {e}") from e
        except RecursionError as e:
            raise invalid_argument(too_deep) from e
        if not isinstance(document, dict):
            raise invalid_argument("the request body must be a JSON object")
        if _too_deep(document):
            raise invalid_argument(too_deep)
        return document

    def _signature_inputs(self, request):
        """{input name: tf.DType} of the requested signature, if known.

        Unknown models, versions or signatures return None: the shared path
        then refuses the request with the same status as for gRPC.
        """
        try:
            servable = self.server.manager.get(
                request.model_spec, self.model_name
            )
        except server_lib.RequestError:
            return None
        signature_def = servable.signature_defs.get(
            request.model_spec.signature_name
        )
        if signature_def is None:
            return None
        return {
            name: tf.dtypes.as_dtype(info.dtype)
            for name, info in signature_def.inputs.items()
        }

    def _fill_inputs(self, request, document):
        """Fill request.inputs; return True for the row format."""
        has_rows, has_columns = "instances" in document, "inputs" in document
        if has_rows == has_columns:
            raise invalid_argument(
                "the request body must hold exactly one of 'instances' "
                "(row format) and 'inputs' (columnar format)"
            )
        expected = self._signature_inputs(request)
        if has_rows:
            instances = document["instances"]
            if not isinstance(instances, list):
                raise invalid_argument("'instances' must be a list")
            named = bool(instances) and all(
                isinstance(i, dict) and not _is_b64(i) for i in instances
            )
            if named:
                keys = set(instances[0])
                for i, instance in enumerate(instances):
                    if set(instance) != keys:
                        raise invalid_argument(
                            f"instances[{i}] has keys {sorted(instance)}; "
                            f"instances[0] has {sorted(keys)}"
                        )
                values = {k: [inst[k] for inst in instances] for k in keys}
            else:
                values = {None: instances}
        else:
            inputs = document["inputs"]
            if isinstance(inputs, dict) and not _is_b64(inputs):
                values = dict(inputs)
            else:
                values = {None: inputs}
        if None in values:
            if expected is not None and len(expected) != 1:
                raise invalid_argument(
                    f"signature {request.model_spec.signature_name!r} has "
                    f"inputs {sorted(expected)}; name them"
                )
            # An unknown signature is refused by the shared path anyway.
            name = next(iter(expected)) if expected else "inputs"
            values = {name: values[None]}
        for name, value in values.items():
            dtype = (expected or {}).get(name, tf.string)
            if _is_b64_list(value):
                # The common case, a batch of encoded images: one pass.
                blobs = [
                    _decode_leaves(v, f"{name}[{i}]")
                    for i, v in enumerate(value)
                ]
                proto = tf.make_tensor_proto(
                    np.array(blobs, dtype=object), dtype=tf.string
                )
            else:
                decoded = _decode_leaves(value, name)
                proto = _tensor_proto(decoded, dtype, name)
            request.inputs[name].CopyFrom(proto)
        return has_rows

    def status(self, match):
        request = get_model_status_pb2.GetModelStatusRequest()
        response = self.server.handle(
            "rest",
            "GetModelStatus",
            self.server.model_status,
            request,
            lambda r: self._model_spec(r.model_spec, match),
        )
        # The same states and errors as gRPC's GetModelStatus (TF-Serving's
        # REST prints the enum names).
        return {
            "model_version_status": [
                {
                    "version": str(status.version),
                    "state": _STATE.Name(status.state),
                    "status": {
                        "error_code": _error_code_name(
                            status.status.error_code
                        ),
                        "error_message": status.status.error_message,
                    },
                }
                for status in response.model_version_status
            ]
        }

    def metadata(self, match):
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.metadata_field.append("signature_def")
        response = self.server.handle(
            "rest",
            "GetModelMetadata",
            self.server.model_metadata,
            request,
            lambda r: self._model_spec(r.model_spec, match),
        )
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {
            "model_spec": {
                "name": response.model_spec.name,
                "signature_name": "",
                "version": str(response.model_spec.version.value),
            },
            "metadata": {
                "signature_def": json_format.MessageToDict(
                    signature_map, preserving_proto_field_name=True
                )
            },
        }


class _Handler(http_server.BoundedHandler):
    server_version = "uhga_tf"
    api = None  # RestApi, set by RestServer
    metrics = None  # ServingMetrics

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        logging.vlog(1, "REST %s", format % args)

    def _send(self, code, body, content_type="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code, message):
        self._send(code, {"error": message})

    def _answer(self, call, *args):
        try:
            self._send(200, call(*args))
        except server_lib.RequestError as e:
            self._error(http_status(e.code), e.message)

    def _guarded(self, method):
        """Run do_<method>; any unexpected error is a one-line 500."""
        try:
            method()
        except Exception as e:  # noqa: BLE001 - every request is answered
            logging.exception("REST %s %s failed", self.command, self.path)
            self.close_connection = True
            try:
                self._error(500, f"internal error: {type(e).__name__}: {e}")
            except OSError:
                pass  # the client is gone

    def do_GET(self):  # noqa: N802 - stdlib name
        self.mark_busy()
        self._guarded(self._get)

    def do_POST(self):  # noqa: N802 - stdlib name
        self._guarded(self._post)

    def _get(self):
        path = self.path.split("?", 1)[0]
        if path == METRICS_PATH:
            body, content_type = self.metrics.exposition()
            self._send(200, body, content_type)
            return
        match = _MODEL_PATH.match(path)
        if match is None or match["rest"] not in (None, "/metadata"):
            self._error(404, f"Malformed request: GET {path}")
            return
        if match["rest"] == "/metadata":
            self._answer(self.api.metadata, match)
        else:
            self._answer(self.api.status, match)

    def _post(self):
        path = self.path.split("?", 1)[0]
        match = _MODEL_PATH.match(path)
        try:
            length = http_server.body_length(self.headers, MAX_BODY_BYTES)
        except http_server.FramingError as e:
            self.close_connection = True
            self._error(e.status, e.message)
            return
        body = self.read_body(length)
        if match is None or match["rest"] is None or match["rest"] in (
            "/metadata",
        ):
            self._error(404, f"Malformed request: POST {path}")
            return
        if match["rest"] != ":predict":
            self._error(
                501, f"{match['rest'][1:]} is not served: SavedModels of "
                "uhga_tf have predict signatures only",
            )
            return
        self._answer(self.api.predict, match, body)


class RestServer:
    """The REST API of a `ModelServer`, on its own port and threads.

    Example:
        rest = RestServer(model_server, "127.0.0.1", 8501)
        port = rest.start()
        ...
        rest.stop()
    """

    def __init__(self, model_server, host="127.0.0.1", port=8501):
        if not 0 <= port <= 65535:
            raise ValueError(
                f"rest_api_port must be in [0, 65535]; received "
                f"rest_api_port={port}"
            )
        self.host, self.port = host, port
        handler = type(
            "Handler",
            (_Handler,),
            {"api": RestApi(model_server), "metrics": model_server.metrics},
        )
        self._handler = handler
        self._httpd = None
        self._thread = None

    def start(self):
        """Bind and serve in a background thread; return the bound port."""
        self._httpd, self._thread = http_server.serve_in_background(
            self.host, self.port, self._handler, "uhga-rest"
        )
        self.port = self._httpd.server_address[1]
        logging.info("REST API on %s:%d", self.host, self.port)
        return self.port

    def stop(self):
        """Stop accepting connections and close the socket."""
        if self._httpd is not None:
            http_server.stop_background(self._httpd, self._thread)
            self._httpd = None
