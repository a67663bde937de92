"""Tests for the embedded gRPC server and its client, over loopback.

Each server runs `python -m uhga_tf.serve --port=0` in a subprocess; the
bound port is read from its first stdout line. Every call has a deadline and
every server is stopped (SIGTERM, then SIGKILL) even when a test fails.
"""

import contextlib
import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

import model_fixtures
from uhga_tf import child_process
from uhga_tf import codes as codes_lib
from uhga_tf import saved_model
from uhga_tf.serving import grpc_client

pytestmark = pytest.mark.slow

IMAGE_SIZE = model_fixtures.IMAGE_SIZE
FEATURE_DIM = model_fixtures.FEATURE_DIM
CODE_LENGTH = 24
MAX_BATCH_SIZE = 8
POLL_INTERVAL_S = 0.5
START_TIMEOUT_S = 90
TIMEOUT = 20.0


def tiny_models(seed):
    return model_fixtures.tiny_models(CODE_LENGTH, seed)


def sample_images(n=4, seed=0):
    """Seeded (pixels, PNG/JPEG bytes) of mixed sizes."""
    sizes = [(24 + 8 * i, 60 - 6 * i) for i in range(n)]
    return model_fixtures.sample_images(sizes, seed)


def expected_codes(models, encoded):
    backbone, hasher = models
    rows = []
    for blob in encoded:
        image = tf.io.decode_image(blob, channels=3, expand_animations=False)
        codes, logits = saved_model.encode_in_process(
            backbone, hasher, image[None], IMAGE_SIZE
        )
        assert np.abs(logits).min() > 1e-4, "a code bit sits on 0"
        rows.append(codes)
    return np.concatenate(rows)


class ServerProcess:
    """`python -m uhga_tf.serve` in a subprocess on a free loopback port."""

    def __init__(self, base_path, log_dir, *extra_flags):
        self.log_path = os.path.join(log_dir, "server.log")
        self.out_path = os.path.join(log_dir, "server.out")
        self.proc = child_process.start(
            ["uhga_tf.serve", f"--model_base_path={base_path}",
             "--model_name=uhga", "--port=0",
             f"--poll_interval_s={POLL_INTERVAL_S}",
             f"--max_batch_size={MAX_BATCH_SIZE}", "--num_versions=2",
             *extra_flags],
            self.out_path, self.log_path, env={"CUDA_VISIBLE_DEVICES": ""})
        self.address = child_process.wait_for_output(
            self.proc, self.out_path, self.log_path, child_process.grpc_address,
            START_TIMEOUT_S)
        self.channel = grpc.insecure_channel(self.address)

    def log_tail(self, chars=3000):
        return child_process.log_tail(self.log_path, chars)

    def terminate(self, timeout=20):
        """SIGTERM; return the exit code (SIGKILL if it does not stop)."""
        self.channel.close()
        return child_process.stop(self.proc, grace_s=timeout)


@contextlib.contextmanager
def running_server(base_path, log_dir, *extra_flags):
    server = ServerProcess(base_path, log_dir, *extra_flags)
    try:
        yield server
    finally:
        server.terminate()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    models = tiny_models(seed=0)
    base = str(tmp_path_factory.mktemp("served") / "uhga")
    saved_model.export_saved_model(*models, base, image_size=IMAGE_SIZE)
    with running_server(base, str(tmp_path_factory.mktemp("log"))) as server:
        yield models, server


def test_predict_image_bytes_matches_in_process(served):
    models, server = served
    _, encoded = sample_images()
    codes, packed = grpc_client.encode_images(
        server.address, encoded, timeout=TIMEOUT, channel=server.channel
    )
    expected = expected_codes(models, encoded)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(packed, codes_lib.pack_codes(expected))
    assert len({row.tobytes() for row in codes}) >= 2
    # The cached-channel path gives the same answer.
    codes_again, _ = grpc_client.encode_images(
        server.address, encoded[:1], timeout=TIMEOUT
    )
    np.testing.assert_array_equal(codes_again, expected[:1])
    grpc_client.close_channels()


def test_predict_uint8_and_features_match_in_process(served):
    (backbone, hasher), server = served
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(3, 40, 28, 3), dtype=np.uint8)
    codes, packed = grpc_client.encode_uint8_images(
        server.address, images, timeout=TIMEOUT, channel=server.channel
    )
    expected, logits = saved_model.encode_in_process(
        backbone, hasher, images, IMAGE_SIZE
    )
    assert np.abs(logits).min() > 1e-4
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(packed, codes_lib.pack_codes(expected))

    features = rng.normal(size=(5, FEATURE_DIM)).astype(np.float32)
    codes, _ = grpc_client.encode_features(
        server.address, features, timeout=TIMEOUT, channel=server.channel
    )
    np.testing.assert_array_equal(
        codes, codes_lib.binarize(np.asarray(hasher(features)))
    )


def test_output_filter_returns_only_requested(served):
    _, server = served
    _, encoded = sample_images(1)
    outputs = grpc_client.predict(
        server.address,
        {"image_bytes": np.array(encoded, dtype=object)},
        output_filter=["packed_codes"],
        timeout=TIMEOUT,
        channel=server.channel,
    )
    assert set(outputs) == {"packed_codes"}
    assert outputs["packed_codes"].shape == (1, CODE_LENGTH // 8)


def test_model_metadata_describes_signatures(served):
    _, server = served
    version, signatures = grpc_client.get_model_metadata(
        server.address, timeout=TIMEOUT, channel=server.channel
    )
    assert version == 1
    assert set(signatures) == {
        "serving_default",
        "encode_images",
        "encode_features",
    }
    outputs = {
        "codes": ("int8", [None, CODE_LENGTH]),
        "packed_codes": ("uint8", [None, CODE_LENGTH // 8]),
    }
    assert signatures["serving_default"]["inputs"] == {
        "image_bytes": ("string", [None])
    }
    assert signatures["encode_images"]["inputs"] == {
        "images": ("uint8", [None, None, None, 3])
    }
    assert signatures["encode_features"]["inputs"] == {
        "features": ("float32", [None, FEATURE_DIM])
    }
    for signature in signatures.values():
        assert signature["outputs"] == outputs
        assert signature["method_name"] == "tensorflow/serving/predict"


def test_model_status_available(served):
    _, server = served
    assert grpc_client.get_model_status(
        server.address, timeout=TIMEOUT, channel=server.channel
    ) == {1: "AVAILABLE"}
    assert grpc_client.get_model_status(
        server.address, timeout=TIMEOUT, channel=server.channel, version=1
    ) == {1: "AVAILABLE"}


def _bad_cases():
    _, encoded = sample_images(2)
    good = np.array(encoded, dtype=object)
    jpeg = tf.io.encode_jpeg(np.zeros((16, 16, 3), np.uint8)).numpy()
    pixels = np.zeros((2, 20, 20, 3), np.uint8)
    many = np.array(encoded * 5, dtype=object)[: MAX_BATCH_SIZE + 1]
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    not_found = grpc.StatusCode.NOT_FOUND
    # (id, inputs, predict kwargs, code, words the message must contain)
    return [
        ("unknown_signature", {"image_bytes": good},
         {"signature_name": "encode_text"}, invalid, ["'encode_text'"]),
        ("unknown_input_name", {"jpegs": good}, {}, invalid, ["'jpegs'"]),
        ("wrong_dtype", {"images": pixels.astype(np.float32)},
         {"signature_name": "encode_images"}, invalid, ["uint8", "float32"]),
        ("wrong_rank", {"images": pixels[:, :, :, 0]},
         {"signature_name": "encode_images"}, invalid,
         ["shape", "[2, 20, 20]"]),
        ("wrong_feature_dim",
         {"features": np.zeros((2, FEATURE_DIM + 1), np.float32)},
         {"signature_name": "encode_features"}, invalid,
         ["shape", str(FEATURE_DIM + 1)]),
        ("not_an_image", {"image_bytes": np.array([encoded[0], b"garbage"],
                                                  dtype=object)},
         {}, invalid, ["image_bytes[1]", "not a JPEG"]),
        ("truncated_jpeg", {"image_bytes": np.array([encoded[0], jpeg[:30]],
                                                    dtype=object)},
         {}, invalid, ["image_bytes[1]", "JPEG"]),
        ("empty_batch", {"image_bytes": np.array([], dtype=object)}, {},
         invalid, ["empty batch"]),
        ("batch_over_max", {"image_bytes": many}, {}, invalid,
         [f"max_batch_size={MAX_BATCH_SIZE}", str(MAX_BATCH_SIZE + 1)]),
        ("unknown_output", {"image_bytes": good},
         {"output_filter": ["logits"]}, invalid, ["'logits'"]),
        ("unknown_model", {"image_bytes": good}, {"model_name": "resnet"},
         not_found, ["'resnet'"]),
        ("unknown_version", {"image_bytes": good}, {"version": 99},
         not_found, ["version 99"]),
    ]  # fmt: skip


# Runs a test once per bad request of `_bad_cases` (test_rest reuses it).
each_bad_case = pytest.mark.parametrize(
    "inputs,kwargs,code,words",
    [case[1:] for case in _bad_cases()],
    ids=[case[0] for case in _bad_cases()],
)


def predict_error(server, inputs, kwargs):
    """The grpc.RpcError that a Predict call of `inputs` must raise."""
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.predict(
            server.address,
            inputs,
            timeout=TIMEOUT,
            channel=server.channel,
            **kwargs,
        )
    return info.value


@each_bad_case
def test_bad_request_status_then_good_request(
    served, inputs, kwargs, code, words
):
    models, server = served
    error = predict_error(server, inputs, kwargs)
    assert error.code() == code, error.details()
    for word in words:
        assert word in error.details(), error.details()
    # The server keeps serving.
    _, encoded = sample_images(1)
    codes, _ = grpc_client.encode_images(
        server.address, encoded, timeout=TIMEOUT, channel=server.channel
    )
    np.testing.assert_array_equal(codes, expected_codes(models, encoded))


def test_metadata_and_status_errors(served):
    _, server = served
    stub = prediction_service_pb2_grpc.PredictionServiceStub(server.channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "uhga"
    request.metadata_field.append("signature_def")
    request.model_spec.version.value = 5
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelMetadata(request, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "version 5" in info.value.details()
    request.model_spec.ClearField("version")
    request.metadata_field[:] = ["graph"]
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelMetadata(request, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'graph'" in info.value.details()

    status_stub = model_service_pb2_grpc.ModelServiceStub(server.channel)
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "resnet"
    with pytest.raises(grpc.RpcError) as info:
        status_stub.GetModelStatus(status_request, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'resnet'" in info.value.details()
    # One warning line per refused request in the server log.
    assert server.log_tail(100000).count("GetModelMetadata NOT_FOUND") == 1


def test_encode_cli_prints_hex_and_writes_npy(served, tmp_path):
    models, server = served
    _, encoded = sample_images(2)
    paths = []
    for i, blob in enumerate(encoded):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(blob)
        paths.append(str(path))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    base = [
        sys.executable,
        "-m",
        "uhga_tf.encode",
        f"--server={server.address}",
    ]
    result = subprocess.run(
        base + paths, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = expected_codes(models, encoded)
    lines = result.stdout.strip().splitlines()
    assert lines == [
        f"{p} {codes_lib.pack_codes(expected[i : i + 1])[0].tobytes().hex()}"
        for i, p in enumerate(paths)
    ]
    out = tmp_path / "codes.npy"
    result = subprocess.run(
        base + [f"--out={out}"] + paths,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_array_equal(np.load(out), expected)
    result = subprocess.run(
        base + ["--model_name=nope", paths[0]],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "uhga_tf.encode: NOT_FOUND: "
    )


def test_new_version_hot_swap_with_batching(tmp_path):
    """Export v2 while 4 clients hammer a batching server; none fails."""
    models_v1, models_v2 = tiny_models(seed=0), tiny_models(seed=1)
    _, encoded = sample_images()
    expected_v1 = expected_codes(models_v1, encoded)
    expected_v2 = expected_codes(models_v2, encoded)
    assert not np.array_equal(expected_v1, expected_v2)
    base = str(tmp_path / "uhga")
    saved_model.export_saved_model(*models_v1, base, image_size=IMAGE_SIZE)
    server = ServerProcess(
        base, str(tmp_path), "--enable_batching", "--batch_timeout_ms=5"
    )
    try:
        stop = threading.Event()
        errors, seen = [], []

        def hammer(i):
            blob = [encoded[i]]
            while not stop.is_set():
                try:
                    codes, _ = grpc_client.encode_images(
                        server.address,
                        blob,
                        timeout=TIMEOUT,
                        channel=server.channel,
                    )
                except grpc.RpcError as e:
                    errors.append(f"{e.code()}: {e.details()}")
                    return
                if np.array_equal(codes[0], expected_v1[i]):
                    seen.append(1)
                elif np.array_equal(codes[0], expected_v2[i]):
                    seen.append(2)
                else:
                    errors.append(f"client {i}: codes of neither version")
                    return

        threads = [
            threading.Thread(target=hammer, args=(i,)) for i in range(4)
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        saved_model.export_saved_model(*models_v2, base, image_size=IMAGE_SIZE)
        exported_at = time.monotonic()
        while time.monotonic() - exported_at < POLL_INTERVAL_S + 30:
            status = grpc_client.get_model_status(
                server.address, timeout=TIMEOUT, channel=server.channel
            )
            if 2 in status:
                break
            time.sleep(0.05)
        swap_s = time.monotonic() - exported_at
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert status == {1: "AVAILABLE", 2: "AVAILABLE"}
        # Poll interval plus load and warm-up on two shared cores.
        assert swap_s < POLL_INTERVAL_S + 15, swap_s
        assert seen.count(1) > 0 and seen.count(2) > 0
        # Unversioned requests get v2; both versions answer when named.
        codes, _ = grpc_client.encode_images(
            server.address, encoded, timeout=TIMEOUT, channel=server.channel
        )
        np.testing.assert_array_equal(codes, expected_v2)
        for version, expected in ((1, expected_v1), (2, expected_v2)):
            outputs = grpc_client.predict(
                server.address,
                {"image_bytes": np.array(encoded, dtype=object)},
                version=version,
                timeout=TIMEOUT,
                channel=server.channel,
            )
            np.testing.assert_array_equal(outputs["codes"], expected)
    finally:
        returncode = server.terminate()
    assert returncode == 0, server.log_tail()
    assert "Server stopped" in server.log_tail()
