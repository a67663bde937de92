"""Tests for the REST API and Prometheus metrics of the embedded server.

One `python -m uhga_tf.serve --port=0 --rest_api_port=0` subprocess serves
both APIs on loopback; REST answers are compared with gRPC answers for the
same inputs, and every bad request of the gRPC catalogue in test_server.py
is replayed over REST.
"""

import base64
import json
import os
import re
import subprocess

import grpc
import numpy as np
import pytest
import tensorflow as tf

import http_fixtures
import test_server as grpc_tests
from uhga_tf import child_process
from uhga_tf import saved_model
from uhga_tf.serving import grpc_client
from uhga_tf.serving import rest

pytestmark = pytest.mark.slow

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
TIMEOUT = grpc_tests.TIMEOUT


class RestServerProcess(grpc_tests.ServerProcess):
    """The gRPC test server with --rest_api_port=0; reads both ports."""

    def __init__(self, base_path, log_dir, *extra_flags):
        super().__init__(base_path, log_dir, "--rest_api_port=0", *extra_flags)
        self.rest_port = child_process.wait_for_output(
            self.proc, self.out_path, self.log_path, child_process.rest_port,
            30)

    def call(self, method, path, body=None):
        """Return (HTTP status, parsed JSON or text) of one request."""
        status, data = http_fixtures.http_call(
            self.rest_port, method, path, body, timeout=TIMEOUT
        )
        return status, data.decode() if isinstance(data, bytes) else data


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    models = grpc_tests.tiny_models(seed=0)
    base = str(tmp_path_factory.mktemp("served") / "uhga")
    saved_model.export_saved_model(
        *models, base, image_size=grpc_tests.IMAGE_SIZE
    )
    models_v2 = grpc_tests.tiny_models(seed=1)
    saved_model.export_saved_model(
        *models_v2, base, image_size=grpc_tests.IMAGE_SIZE
    )
    server = RestServerProcess(
        base,
        str(tmp_path_factory.mktemp("log")),
        "--version_labels=stable=1,canary=2",
    )
    try:
        yield {1: models, 2: models_v2}, server
    finally:
        server.terminate()
        grpc_client.close_channels()


def b64(blob):
    return {"b64": base64.b64encode(blob).decode("ascii")}


def test_predict_row_and_columnar_equal_grpc_bit_for_bit(served):
    models, server = served
    _, encoded = grpc_tests.sample_images()
    expected = grpc_tests.expected_codes(models[2], encoded)
    grpc_codes, grpc_packed = grpc_client.encode_images(
        server.address, encoded, timeout=TIMEOUT, channel=server.channel
    )
    np.testing.assert_array_equal(grpc_codes, expected)

    status, rows = server.call(
        "POST",
        "/v1/models/uhga:predict",
        {"instances": [b64(e) for e in encoded]},
    )
    assert status == 200, rows
    assert [sorted(r) for r in rows["predictions"]] == [
        ["codes", "packed_codes"]
    ] * len(encoded)
    codes = np.array([r["codes"] for r in rows["predictions"]], np.int8)
    packed = np.array(
        [r["packed_codes"] for r in rows["predictions"]], np.uint8
    )
    assert codes.tobytes() == grpc_codes.tobytes()
    assert packed.tobytes() == grpc_packed.tobytes()

    status, columns = server.call(
        "POST",
        "/v1/models/uhga:predict",
        {"inputs": {"image_bytes": [b64(e) for e in encoded]}},
    )
    assert status == 200, columns
    assert np.array(columns["outputs"]["codes"], np.int8).tobytes() == (
        grpc_codes.tobytes()
    )
    # An unnamed columnar input and a single output: a bare value.
    status, single = server.call(
        "POST",
        "/v1/models/uhga:predict",
        {"inputs": [b64(encoded[0])], "output_filter": ["packed_codes"]},
    )
    assert status == 200, single
    assert single == {"outputs": grpc_packed[:1].tolist()}


def test_other_signatures_and_json_numbers(served):
    models, server = served
    backbone, hasher = models[2]
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(2, 12, 10, 3), dtype=np.uint8)
    expected, _ = saved_model.encode_in_process(
        backbone, hasher, images, grpc_tests.IMAGE_SIZE
    )
    status, answer = server.call(
        "POST",
        "/v1/models/uhga:predict",
        {
            "signature_name": "encode_images",
            "instances": [{"images": image.tolist()} for image in images],
        },
    )
    assert status == 200, answer
    np.testing.assert_array_equal(
        [r["codes"] for r in answer["predictions"]], expected
    )
    features = rng.normal(size=(3, grpc_tests.FEATURE_DIM)).astype(np.float32)
    grpc_codes, _ = grpc_client.encode_features(
        server.address, features, timeout=TIMEOUT, channel=server.channel
    )
    status, answer = server.call(
        "POST",
        "/v1/models/uhga:predict",
        {"signature_name": "encode_features", "inputs": features.tolist()},
    )
    assert status == 200, answer
    np.testing.assert_array_equal(answer["outputs"]["codes"], grpc_codes)


def test_version_and_label_routing(served):
    models, server = served
    _, encoded = grpc_tests.sample_images(2)
    body = {"instances": [b64(e) for e in encoded]}
    for path, version in (
        ("/v1/models/uhga/versions/1:predict", 1),
        ("/v1/models/uhga/versions/2:predict", 2),
        ("/v1/models/uhga/labels/stable:predict", 1),
        ("/v1/models/uhga/labels/canary:predict", 2),
        ("/v1/models/uhga:predict", 2),
    ):
        status, answer = server.call("POST", path, body)
        assert status == 200, (path, answer)
        np.testing.assert_array_equal(
            [r["codes"] for r in answer["predictions"]],
            grpc_tests.expected_codes(models[version], encoded),
            err_msg=path,
        )
    assert grpc_tests.expected_codes(models[1], encoded).tolist() != (
        grpc_tests.expected_codes(models[2], encoded).tolist()
    )
    status, answer = server.call("POST", "/v1/models/uhga/labels/beta:predict",
                                 body)  # fmt: skip
    assert status == 400 and "'beta'" in answer["error"], answer


def test_status_and_metadata(served):
    _, server = served
    ok = {"error_code": "OK", "error_message": ""}
    assert server.call("GET", "/v1/models/uhga") == (
        200,
        {
            "model_version_status": [
                {"version": "1", "state": "AVAILABLE", "status": ok},
                {"version": "2", "state": "AVAILABLE", "status": ok},
            ]
        },
    )
    assert server.call("GET", "/v1/models/uhga/labels/stable") == (
        200,
        {
            "model_version_status": [
                {"version": "1", "state": "AVAILABLE", "status": ok}
            ]
        },
    )
    status, answer = server.call("GET", "/v1/models/uhga/versions/1/metadata")
    assert status == 200, answer
    assert answer["model_spec"] == {
        "name": "uhga", "signature_name": "", "version": "1"
    }  # fmt: skip
    signatures = answer["metadata"]["signature_def"]["signature_def"]
    assert set(signatures) == {
        "serving_default", "encode_images", "encode_features"
    }  # fmt: skip
    image_bytes = signatures["serving_default"]["inputs"]["image_bytes"]
    assert image_bytes["dtype"] == "DT_STRING"
    assert signatures["serving_default"]["method_name"] == (
        "tensorflow/serving/predict"
    )
    for path in ("/v1/models/resnet", "/v1/models/uhga/versions/7/metadata"):
        status, answer = server.call("GET", path)
        assert status == 404 and set(answer) == {"error"}, (path, answer)


def _rest_body(inputs, kwargs):
    """The REST request of a gRPC catalogue case: (path, JSON body)."""
    model = kwargs.get("model_name", "uhga")
    path = f"/v1/models/{model}"
    if "version" in kwargs:
        path += f"/versions/{kwargs['version']}"
    body = {}
    if "signature_name" in kwargs:
        body["signature_name"] = kwargs["signature_name"]
    if "output_filter" in kwargs:
        body["output_filter"] = kwargs["output_filter"]
    columns = {}
    for name, value in inputs.items():
        if value.dtype == object:
            columns[name] = [b64(v) for v in value.tolist()]
        elif name == "images" and value.dtype.kind == "f":
            # JSON numbers carry no dtype; non-integers cannot be uint8.
            columns[name] = (value + 0.5).tolist()
        else:
            columns[name] = value.tolist()
    body["inputs"] = columns
    return path + ":predict", body


@grpc_tests.each_bad_case
def test_grpc_bad_request_catalogue_over_rest(
    served, inputs, kwargs, code, words
):
    """Each case gets the gRPC status, as its HTTP code, and the message."""
    _, server = served
    error = grpc_tests.predict_error(server, inputs, kwargs)
    assert error.code() == code
    path, body = _rest_body(inputs, kwargs)
    status, answer = server.call("POST", path, body)
    assert status == rest.http_status(code), answer
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    if kwargs.get("signature_name") == "encode_images" and (
        inputs["images"].dtype == np.float32
    ):
        # JSON has no float32: the numbers must fit the signature's uint8.
        assert "uint8" in answer["error"], answer
    else:
        assert answer["error"] == error.details()
        for word in words:
            assert word in answer["error"], answer


@pytest.mark.parametrize(
    "path,body,status,words",
    [
        ("/v1/models/uhga:predict", "{not json", 400, ["JSON Parse error"]),
        ("/v1/models/uhga:predict", {"instances": [], "inputs": []}, 400,
         ["exactly one of"]),
        ("/v1/models/uhga:predict", {"instances": [{"b64": "%%%"}]}, 400,
         ["base64"]),
        ("/v1/models/uhga:predict",
         {"signature_name": "encode_images", "inputs": [[[[1, 2, 3]], [[4]]]]},
         400, ["rectangular"]),
        ("/v1/models/uhga:predict",
         {"signature_name": "encode_images",
          "inputs": [[[[1, 2, 300]]]]}, 400, ["uint8", "300"]),
        ("/v1/models/uhga:predict",
         {"signature_name": "encode_images",
          "inputs": [b64(b"\xff\xd8\xff")]}, 400, ["uint8", "string"]),
        ("/v1/models/uhga:classify", {"instances": []}, 501, ["classify"]),
        ("/v1/models/uhga/versions/x:predict", {"instances": []}, 400,
         ["'x'"]),
        ("/v2/models/uhga:predict", {"instances": []}, 404, ["Malformed"]),
    ],  # fmt: skip
)
def test_rest_only_bad_requests(served, path, body, status, words):
    _, server = served
    code, answer = server.call("POST", path, body)
    assert code == status, answer
    assert set(answer) == {"error"}, answer
    for word in words:
        assert word in answer["error"], answer


def _counter(text, **labels):
    """Sum of uhga_request_count_total samples matching `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("uhga_request_count_total{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_counters_move(served):
    _, server = served
    _, encoded = grpc_tests.sample_images(1)
    status, before = server.call("GET", rest.METRICS_PATH)
    assert status == 200
    ok_rest = dict(api="rest", method="Predict", model="uhga", version="1",
                   signature="serving_default", status="OK")  # fmt: skip
    ok_grpc = dict(ok_rest, api="grpc", version="2")
    # A signature no loaded version has is counted as "<other>" (issue 18).
    bad_rest = dict(ok_rest, version="", signature="<other>",
                    status="INVALID_ARGUMENT")  # fmt: skip
    for _ in range(2):
        server.call(
            "POST",
            "/v1/models/uhga/versions/1:predict",
            {"instances": [b64(encoded[0])]},
        )
    grpc_client.encode_images(
        server.address, encoded, timeout=TIMEOUT, channel=server.channel
    )
    server.call(
        "POST",
        "/v1/models/uhga:predict",
        {"signature_name": "encode_text", "instances": [b64(encoded[0])]},
    )
    status, after = server.call("GET", rest.METRICS_PATH)
    assert status == 200
    for labels, delta in ((ok_rest, 2), (ok_grpc, 1), (bad_rest, 1)):
        moved = _counter(after, **labels) - _counter(before, **labels)
        assert moved == delta, (labels, moved)
    bucket = re.search(
        r'uhga_request_latency_seconds_count\{api="rest",method="Predict",'
        r'model="uhga",signature="serving_default",status="OK",'
        r'version="1"\} (\S+)',
        after,
    )
    assert bucket and float(bucket.group(1)) >= 2, after[-2000:]
    assert 'uhga_model_version_loaded{model="uhga",version="1"} 1.0' in after
    assert 'uhga_model_version_loaded{model="uhga",version="2"} 1.0' in after
    assert 'uhga_loaded_versions{model="uhga"} 2.0' in after


def _readme_curl_commands():
    with open(README) as f:
        text = f.read()
    section = text.split("### REST and Prometheus metrics", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if line.startswith("#") or line.startswith("python -m uhga_tf.serve"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return [c for c in commands if c]


def test_readme_curl_examples(served, tmp_path):
    models, server = served
    commands = _readme_curl_commands()
    assert len(commands) == 6 and all(
        c.startswith("curl ") for c in commands
    ), commands
    _, encoded = grpc_tests.sample_images(1)
    jpeg = tf.io.encode_jpeg(
        tf.io.decode_image(encoded[0], channels=3)
    ).numpy()
    (tmp_path / "query.jpg").write_bytes(jpeg)
    outputs = []
    for command in commands:
        command = command.replace(
            "localhost:8501", f"127.0.0.1:{server.rest_port}"
        )
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (command, result.stderr)
        outputs.append(result.stdout)
    latest = grpc_tests.expected_codes(models[2], [jpeg])
    stable = grpc_tests.expected_codes(models[1], [jpeg])
    rows = json.loads(outputs[0])["predictions"]
    np.testing.assert_array_equal([r["codes"] for r in rows], latest)
    columns = json.loads(outputs[1])["outputs"]
    assert np.array(columns["codes"]).shape == (1, grpc_tests.CODE_LENGTH)
    packed = json.loads(outputs[2])["predictions"]
    np.testing.assert_array_equal(
        np.unpackbits(np.array(packed, np.uint8), axis=1),
        (stable > 0).astype(np.uint8),
    )
    assert [s["version"] for s in json.loads(outputs[3])[
        "model_version_status"]] == ["1", "2"]  # fmt: skip
    assert "serving_default" in json.loads(outputs[4])["metadata"][
        "signature_def"]["signature_def"]  # fmt: skip
    assert 'api="rest"' in outputs[5] and 'status="OK"' in outputs[5]


def test_metric_labels_stay_bounded():
    from uhga_tf.serving import prometheus
    from tensorflow_serving.apis import model_pb2

    served = prometheus.ServingMetrics("uhga", lambda: [3])
    for i in range(prometheus.MAX_LABEL_SETS + 50):
        spec = model_pb2.ModelSpec(name="uhga", signature_name=f"sig{i}")
        served.observe("rest", "Predict", spec, None, "INVALID_ARGUMENT",
                       0.01)  # fmt: skip
    stranger = model_pb2.ModelSpec(name="resnet", signature_name="sig0")
    served.observe("grpc", "Predict", stranger, None, "NOT_FOUND", 0.01)
    text = served.exposition()[0].decode()
    counts = [
        line for line in text.splitlines()
        if line.startswith("uhga_request_count_total{")
    ]  # fmt: skip
    assert len(counts) == prometheus.MAX_LABEL_SETS + 2, len(counts)
    assert _counter(text, model="<other>", signature="<other>",
                    status="INVALID_ARGUMENT") == 50  # fmt: skip
    assert _counter(text, model="<other>", status="NOT_FOUND") == 1
    assert 'uhga_model_version_loaded{model="uhga",version="3"} 1.0' in text


def test_http_codes_follow_tf_serving():
    """TF-Serving's model_servers/http_server.cc ToHTTPStatusCode."""
    codes = grpc.StatusCode
    assert {
        code.name: rest.http_status(code)
        for code in (
            codes.OK, codes.INVALID_ARGUMENT, codes.FAILED_PRECONDITION,
            codes.OUT_OF_RANGE, codes.NOT_FOUND, codes.UNIMPLEMENTED,
            codes.INTERNAL, codes.RESOURCE_EXHAUSTED, codes.UNAVAILABLE,
            codes.DEADLINE_EXCEEDED, codes.CANCELLED,
        )
    } == {
        "OK": 200, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400,
        "OUT_OF_RANGE": 400, "NOT_FOUND": 404, "UNIMPLEMENTED": 501,
        "INTERNAL": 500, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
        "DEADLINE_EXCEEDED": 504, "CANCELLED": 499,
    }  # fmt: skip
