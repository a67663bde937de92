"""Bad inputs, tried as a careless or hostile user would (issue 11).

Each case runs through the real entry point (`python -m uhga_tf.<cmd>` in a
subprocess) or a real server on 127.0.0.1, and asserts the exit or status
code, the key words of the one-line message, and that nothing was left
behind. The numbered defects of the issue are marked `defect N`.
"""

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

import hostile_inputs
import model_fixtures
from train_fixtures import write_feature_file
from uhga_tf.data import image_header
from uhga_tf.data import splits
from uhga_tf import saved_model
from uhga_tf.retrieval.hamming_index import HammingIndex
from uhga_tf.serving import server as server_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_LENGTH = 16
TIMEOUT = 20.0
INT64_MAX = 2**63 - 1


# Helpers ------------------------------------------------------------------


# What TensorFlow's bundled gRPC printed before aborting a child process
# (SIGABRT), once in about fifteen CI runs under load, before the command
# under test wrote its line; unrelated to any command's own behaviour.
_GRPC_EPOLL_ABORT = "epoll_wait error"


def cli(verb, *args, timeout=120, preexec_fn=None):
    """Run `python -m uhga_tf.<verb>`; return (exit code, last stderr line).

    A child that TensorFlow's gRPC event engine aborted (`_GRPC_EPOLL_ABORT`)
    is run once more, and only once; every assertion applies to that run.
    """
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", f"uhga_tf.{verb}", *args],
            cwd=REPO, capture_output=True, text=True, timeout=timeout,
            preexec_fn=preexec_fn,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                 "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        if not (result.returncode == -signal.SIGABRT
                and _GRPC_EPOLL_ABORT in result.stderr):
            break
    lines = result.stderr.strip().splitlines()
    ours = [x for x in lines if x.startswith(f"uhga_tf.{verb}:")]
    # TF may log after our line at exit; ours is still the only one.
    assert len(ours) <= 1, ours
    last = ours[-1] if ours else (lines[-1] if lines else "")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.returncode, last


def assert_one_line(code, line, verb, *words):
    assert code == 1, line
    assert line.startswith(f"uhga_tf.{verb}: "), line
    for word in words:
        assert word in line, (word, line)


def png_bomb(width, height):
    """A real, small PNG of width x height black pixels."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    idat = b"".join(compressor.compress(row) for _ in range(height))
    idat += compressor.flush()

    def chunk(tag, data):
        crc = zlib.crc32(tag + data)
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def webp_bytes(frames=1):
    """A still WebP, or an animated one of `frames` frames."""
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8))
              for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, "WEBP", save_all=frames > 1,
                   append_images=images[1:])
    return buffer.getvalue()


def small_images(n=2):
    _, encoded = model_fixtures.sample_images(
        [(20 + 4 * i, 24) for i in range(n)]
    )
    return encoded


@pytest.fixture(scope="module")
def export_base(tmp_path_factory):
    """A base path holding version 1 of the tiny model."""
    base = tmp_path_factory.mktemp("models")
    backbone, hasher = model_fixtures.tiny_models(CODE_LENGTH, seed=0)
    saved_model.export_saved_model(
        backbone, hasher, str(base), image_size=model_fixtures.IMAGE_SIZE,
        version=1,
    )
    return str(base)


def start_server(base, **overrides):
    config = server_lib.ServerConfig(
        model_base_path=str(base), port=0, poll_interval_s=0.2,
        num_versions=1, max_batch_size=8, **overrides,
    )
    server = server_lib.ModelServer(config)
    port = server.start()
    return server, grpc.insecure_channel(f"127.0.0.1:{port}"), port


@pytest.fixture(scope="module")
def batching_server(export_base):
    server, channel, port = start_server(
        export_base, enable_batching=True, batch_timeout_ms=5.0
    )
    yield channel, port
    channel.close()
    server.stop(1.0)


def predict(channel, signature, name, array, dtype=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "uhga"
    request.model_spec.signature_name = signature
    request.inputs[name].CopyFrom(tf.make_tensor_proto(array, dtype=dtype))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    return stub.Predict(request, timeout=TIMEOUT)


def predict_error(channel, signature, name, array, dtype=None):
    with pytest.raises(grpc.RpcError) as info:
        predict(channel, signature, name, array, dtype)
    return info.value.code(), info.value.details()


def model_status(channel):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "uhga"
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    return stub.GetModelStatus(request, timeout=TIMEOUT)


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def tiny_train_args(tmp_path, **overrides):
    features = tmp_path / "features.npz"
    if not features.exists():
        write_feature_file(str(features))
    values = {
        "dataset": "features", "data_dir": str(features),
        "cache_dir": str(tmp_path / "cache"),
        "workdir": str(tmp_path / "run"), "code_length": 16,
        "global_batch_size": 32, "epochs": 1, "eval_every_epochs": 1,
        "checkpoint_every_steps": 3, "learning_rate": 0.01,
        "positive_weight": "auto",
    }
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()] + ["--noprogress"]


# train --------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag", ["--learning_rate=nan", "--similarity_lambda=inf",
             "--hash_lr_multiplier=nan", "--attention_grad_p=-inf"],
)
def test_train_non_finite_float_flag_writes_nothing(tmp_path, flag):
    """defect 5: `nan <= 0` is False; NaN must not pass validation."""
    workdir = tmp_path / "run"
    code, line = cli("train", f"--workdir={workdir}", flag)
    assert_one_line(code, line, "train", "finite", flag[2:].split("=")[0])
    assert not workdir.exists()


def test_train_workdir_is_a_file(tmp_path):
    """defect 6."""
    workdir = tmp_path / "run"
    workdir.write_text("not a folder")
    code, line = cli("train", *tiny_train_args(tmp_path, workdir=workdir))
    assert_one_line(code, line, "train", "workdir", str(workdir), "folder")
    assert workdir.read_text() == "not a folder"


def test_train_workdir_under_a_file(tmp_path):
    """defect 6 (stands in for a read-only workdir, which root can write)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, line = cli(
        "train", *tiny_train_args(tmp_path, workdir=blocker / "run")
    )
    assert_one_line(code, line, "train", "workdir", str(blocker), "folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only dirs")
def test_train_read_only_workdir(tmp_path):
    """defect 6."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdir.chmod(0o500)
    try:
        code, line = cli("train", *tiny_train_args(tmp_path,
                                                   workdir=workdir))
    finally:
        workdir.chmod(0o700)
    assert_one_line(code, line, "train", "not writable", str(workdir))


def test_train_binary_flagfile(tmp_path):
    """defect 6."""
    flagfile = tmp_path / "bad.flags"
    flagfile.write_bytes(bytes(range(256)) * 4)
    code, line = cli("train", f"--flagfile={flagfile}")
    assert_one_line(code, line, "train", str(flagfile), "UTF-8")


def test_train_missing_flagfile(tmp_path):
    """absl named the file, on two lines; now one."""
    code, line = cli("train", f"--flagfile={tmp_path / 'nope.flags'}")
    assert code == 1
    assert "nope.flags" in line


def test_train_corrupt_config_json_names_file_and_line(tmp_path):
    """defect 7."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{\n  "data": {\n  oops\n}\n')
    code, line = cli("train", *tiny_train_args(tmp_path))
    assert_one_line(code, line, "train", "config.json", "line 3")


def test_train_unknown_choice(tmp_path):
    """Already behaved: a bad choice is one line and writes nothing."""
    code, line = cli("train", f"--workdir={tmp_path / 'run'}",
                     "--loss=hinge")
    assert_one_line(code, line, "train", "loss must be one of")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """One epoch (7 steps, checkpoints at 3, 6 and 7) of the tiny run."""
    tmp_path = tmp_path_factory.mktemp("trained")
    result = subprocess.run(
        [sys.executable, "-m", "uhga_tf.train", *tiny_train_args(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


def _checkpoint_numbers(ckpt_dir):
    state = tf.train.get_checkpoint_state(str(ckpt_dir))
    return sorted(
        int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths
    )


def test_train_resume_falls_back_from_truncated_checkpoint(
    trained_workdir, tmp_path
):
    """defect 4: resume from the previous complete checkpoint."""
    shutil.copytree(trained_workdir, tmp_path, dirs_exist_ok=True)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    newest = _checkpoint_numbers(ckpt_dir)[-1]
    data = ckpt_dir / f"ckpt-{newest}.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(100)
    result = subprocess.run(
        [sys.executable, "-m", "uhga_tf.train",
         *tiny_train_args(tmp_path, epochs=2)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is damaged" in result.stderr
    assert (ckpt_dir / "damaged" / data.name).exists()
    # Resumed from the step before the damaged one, and trained on to 14.
    assert f"resuming from step {newest - 1}" in result.stderr
    assert _checkpoint_numbers(ckpt_dir)[-1] == 14


def test_checkpoint_all_damaged_starts_from_scratch(tmp_path):
    """defect 4, library level: nothing whole left means a fresh start."""
    from uhga_tf.training import checkpoints

    variable = tf.Variable(1.0)
    checkpoint = tf.train.Checkpoint(v=variable)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path), 3)
    manager.save(checkpoint_number=1)
    for data in tmp_path.glob("ckpt-1.data-*"):
        data.write_bytes(b"")
    assert checkpoints.drop_damaged(str(tmp_path)) == [
        str(tmp_path / "ckpt-1")
    ]
    assert tf.train.get_checkpoint_state(str(tmp_path)) is None
    assert (tmp_path / "damaged" / "ckpt-1.index").exists()


def test_train_changed_model_without_config_json_keeps_workdir(
    trained_workdir, tmp_path
):
    """defect 5: config.json is written only after the restore succeeded."""
    shutil.copytree(trained_workdir, tmp_path, dirs_exist_ok=True)
    os.remove(tmp_path / "run" / "config.json")
    code, line = cli("train", *tiny_train_args(tmp_path, code_length=32),
                     timeout=600)
    assert_one_line(code, line, "train", "another model", "checkpoint")
    assert not (tmp_path / "run" / "config.json").exists()


# data ---------------------------------------------------------------------


def test_flat_class_folder_suggests_query_pool_all():
    """defect 7: no test/ part; say so instead of 'need 50, received 0'."""
    labels = np.repeat(np.arange(10), 60)
    partition = np.array(["train"] * len(labels))
    with pytest.raises(ValueError, match="--query_pool=all"):
        splits.make_split("uhga", labels, partition, seed=0)


def test_corrupt_split_file_names_file_and_line(tmp_path):
    """defect 7."""
    labels = np.repeat(np.arange(10), 200)
    partition = np.array(["train"] * 1500 + ["test"] * 500)
    rng = np.random.default_rng(0)
    partition = partition[rng.permutation(len(partition))]
    kw = {"per_class": {"query": 5, "train": 20, "validation": 5}}
    splits.load_or_create_split(str(tmp_path), "toy", "uhga", labels,
                                partition, 0, **kw)
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("toy")]
    lines = (folder / "train.txt").read_text().splitlines()
    lines[4] = "12x"
    (folder / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as info:
        splits.load_or_create_split(str(tmp_path), "toy", "uhga", labels,
                                    partition, 0, **kw)
    assert "train.txt" in str(info.value) and "line 5" in str(info.value)


# export -------------------------------------------------------------------


def test_export_version_beyond_int64_writes_nothing(tmp_path):
    """defect 8."""
    export_dir = tmp_path / "models"
    code, line = cli("export", f"--checkpoint={tmp_path}",
                     f"--export_dir={export_dir}",
                     f"--version={INT64_MAX + 1}")
    assert_one_line(code, line, "export", "version", str(INT64_MAX))
    assert not export_dir.exists()


def test_export_animated_webp_warmup_writes_nothing(tmp_path):
    """defect 8: the server would refuse it, so export refuses it (a still
    WebP is decoded since TensorFlow's decoder reads it; an animation is
    not, with 3 channels)."""
    webp = tmp_path / "warm.webp"
    webp.write_bytes(webp_bytes(frames=3))
    export_dir = tmp_path / "models"
    code, line = cli("export", f"--checkpoint={tmp_path}",
                     f"--export_dir={export_dir}",
                     f"--warmup_images={webp}")
    assert_one_line(code, line, "export", "warmup_images[0]",
                    "animated WebP")
    assert not export_dir.exists()


def test_export_dir_is_a_file(tmp_path):
    """defect 6."""
    export_dir = tmp_path / "models"
    export_dir.write_text("x")
    code, line = cli("export", f"--checkpoint={tmp_path}",
                     f"--export_dir={export_dir}")
    assert_one_line(code, line, "export", "export_dir", str(export_dir),
                    "folder")


def test_export_missing_checkpoint(tmp_path):
    """Already behaved: names the missing config.json; writes nothing."""
    export_dir = tmp_path / "models"
    code, line = cli("export", f"--checkpoint={tmp_path / 'none'}",
                     f"--export_dir={export_dir}")
    assert_one_line(code, line, "export", "config.json")
    assert not export_dir.exists()


# serve: start-up and hot-swap --------------------------------------------


def _garbage_version(base, version):
    path = os.path.join(base, str(version))
    os.makedirs(path)
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(b"\x08\x96\x01 this is not a SavedModel \xff\xff")


@contextlib.contextmanager
def _serving_copy(export_base, base, before_start=None):
    """Serve a copy of `export_base` at `base`; yield (server, channel).

    `before_start(base)` may damage the copy before the server starts.
    """
    shutil.copytree(export_base, base)
    if before_start is not None:
        before_start(base)
    server, channel, _ = start_server(base)
    try:
        yield server, channel
    finally:
        channel.close()
        server.stop(1.0)


def _predict_one_image(channel):
    return predict(channel, "serving_default", "image_bytes",
                   np.array(small_images(1), dtype=object))


def test_bad_version_at_startup_serves_the_good_one(export_base, tmp_path):
    """defect 1: a garbage saved_model.pb at start-up."""
    base = tmp_path / "models"
    with _serving_copy(export_base, base,
                       lambda b: _garbage_version(b, 2)) as (_, channel):
        response = _predict_one_image(channel)
        assert response.model_spec.version.value == 1
        status = {s.version: s for s in model_status(channel)
                  .model_version_status}
        assert status[1].state == (
            get_model_status_pb2.ModelVersionStatus.AVAILABLE)
        assert status[2].state == get_model_status_pb2.ModelVersionStatus.END
        assert "DecodeError" in status[2].status.error_message


def test_bad_version_does_not_stop_hot_swapping(export_base, tmp_path):
    """defect 1: a corrupt version, then a valid one, while serving."""
    base = tmp_path / "models"
    with _serving_copy(export_base, base) as (server, channel):
        _garbage_version(base, 2)
        assert wait_for(lambda: 2 in server.manager.failed())
        shutil.copytree(os.path.join(export_base, "1"), base / "3")
        assert wait_for(lambda: server.manager.versions() == [3])
        response = _predict_one_image(channel)
        assert response.model_spec.version.value == 3
        assert server._poller.is_alive()


def test_version_beyond_int64_is_not_served(export_base, tmp_path):
    """defect 8, server side: such a folder is not a version."""
    base = tmp_path / "models"
    shutil.copytree(export_base, base)
    shutil.copytree(os.path.join(export_base, "1"),
                    base / str(INT64_MAX + 1))
    assert saved_model.list_versions(str(base)) == [1]


def test_serve_refuses_a_port_in_use(tmp_path):
    """defect 2: a second server on a busy port is an error, not a twin."""
    other = grpc.server(
        __import__("concurrent.futures").futures.ThreadPoolExecutor(1)
    )
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        code, line = cli("serve", f"--model_base_path={tmp_path}",
                         f"--port={port}", timeout=60)
    finally:
        other.stop(0)
    assert_one_line(code, line, "serve", "cannot bind", f"--port={port}",
                    "free port")


def test_serve_missing_base_path(tmp_path):
    """Already behaved."""
    code, line = cli("serve", f"--model_base_path={tmp_path / 'none'}",
                     "--port=0", timeout=60)
    assert_one_line(code, line, "serve", "not a directory")


# serve: requests ----------------------------------------------------------


def test_decompression_bomb_is_refused_from_its_header(batching_server):
    """defect 3: refused before decoding, naming the limit."""
    channel, _ = batching_server
    bomb = png_bomb(6000, 6000)
    assert len(bomb) < 200_000
    start = time.monotonic()
    code, details = predict_error(channel, "serving_default", "image_bytes",
                                  np.array([bomb], dtype=object))
    assert time.monotonic() - start < 2.0
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "6000x6000" in details and "max_image_pixels" in details


def test_bomb_does_not_block_good_requests(batching_server):
    """defect 3: good requests beside bombs answer promptly."""
    channel, _ = batching_server
    bomb = np.array([png_bomb(6000, 6000)], dtype=object)
    good = np.array(small_images(1), dtype=object)
    errors, latencies = [], []

    def bombs():
        for _ in range(5):
            try:
                predict(channel, "serving_default", "image_bytes", bomb)
            except grpc.RpcError as e:
                errors.append(e.code())

    thread = threading.Thread(target=bombs)
    thread.start()
    for _ in range(5):
        start = time.monotonic()
        predict(channel, "serving_default", "image_bytes", good)
        latencies.append(time.monotonic() - start)
    thread.join()
    assert errors == [grpc.StatusCode.INVALID_ARGUMENT] * 5
    assert max(latencies) < 2.0, latencies


def test_request_pixel_limit():
    """defect 3: the per-request total, in the shared request path."""
    from uhga_tf.serving import request_checks

    limits = request_checks.RequestLimits(max_image_pixels=1000,
                                          max_request_pixels=1500)
    one = small_images(1)[0]  # 20 x 24 = 480 pixels
    request_checks.check_input_array(
        "image_bytes", np.array([one, one, one], dtype=object), limits)
    with pytest.raises(request_checks.RequestError,
                       match="max_request_pixels=1500"):
        request_checks.check_input_array(
            "image_bytes", np.array([one] * 4, dtype=object), limits)
    with pytest.raises(request_checks.RequestError,
                       match="max_image_pixels=1000"):
        request_checks.check_input_array(
            "images", np.zeros((1, 40, 40, 3), np.uint8), limits)


def test_nan_features_are_invalid_argument(batching_server):
    """defect 8: NaN features were answered with all -1 codes."""
    channel, _ = batching_server
    features = np.zeros((2, model_fixtures.FEATURE_DIM), np.float32)
    features[1, 3] = np.nan
    code, details = predict_error(channel, "encode_features", "features",
                                  features)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "features[1]" in details and "finite" in details


def test_corrupt_image_is_invalid_argument(batching_server):
    """Already behaved."""
    channel, _ = batching_server
    code, details = predict_error(channel, "serving_default", "image_bytes",
                                  np.array([b"GIF89a garbage"], dtype=object))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_animated_webp_request_is_invalid_argument(batching_server):
    """A still WebP is coded; an animated one is refused by name before
    the decoder, which would fail on it."""
    channel, _ = batching_server
    code, details = predict_error(
        channel, "serving_default", "image_bytes",
        np.array([webp_bytes(frames=3)], dtype=object))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "animated WebP" in details
    code, details = predict_error(channel, "serving_default", "image_bytes",
                                  np.array([b"RIFF1234WAVE"], dtype=object))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "JPEG, PNG, GIF, BMP or WebP" in details


def test_wrong_dtype_is_invalid_argument(batching_server):
    """Already behaved."""
    channel, _ = batching_server
    code, details = predict_error(channel, "encode_images", "images",
                                  np.zeros((1, 8, 8, 3), np.float32))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "uint8" in details


# encode -------------------------------------------------------------------


def test_encode_out_in_missing_folder(batching_server, tmp_path):
    """defect 6."""
    _, port = batching_server
    image = tmp_path / "a.png"
    image.write_bytes(small_images(1)[0])
    out = tmp_path / "missing" / "codes.npy"
    code, line = cli("encode", f"--server=127.0.0.1:{port}",
                     f"--out={out}", str(image))
    assert_one_line(code, line, "encode", str(out.parent))
    assert not out.parent.exists()


def test_encode_image_path_is_a_folder(batching_server, tmp_path):
    """defect 6."""
    _, port = batching_server
    code, line = cli("encode", f"--server=127.0.0.1:{port}", str(tmp_path))
    assert_one_line(code, line, "encode", str(tmp_path), "not a folder")


def test_encode_missing_image(batching_server, tmp_path):
    """Already behaved."""
    _, port = batching_server
    code, line = cli("encode", f"--server=127.0.0.1:{port}",
                     str(tmp_path / "none.png"))
    assert_one_line(code, line, "encode", "none.png")


# index / search / weights ------------------------------------------------


def _index_without(tmp_path, field):
    directory = tmp_path / "index"
    index = HammingIndex(CODE_LENGTH, backend="numpy")
    codes = np.where(np.random.default_rng(0).random((4, CODE_LENGTH)) < .5,
                     -1, 1).astype(np.int8)
    index.add(codes, np.arange(4))
    index.save(str(directory))
    path = directory / "hamming_index.bin"
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<8sII", data)
    header = json.loads(data[16:16 + length])
    del header[field]
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<8sII", magic, version, len(new)) + new
                     + data[16 + length:])
    return directory


def test_search_index_header_missing_a_field(tmp_path):
    """defect 6."""
    directory = _index_without(tmp_path, "count")
    query = tmp_path / "q.png"
    query.write_bytes(small_images(1)[0])
    out = tmp_path / "grid.png"
    code, line = cli("search", f"--index={directory}",
                     f"--model={tmp_path}", f"--out={out}", str(query))
    assert_one_line(code, line, "search", "hamming_index.bin", "count")
    assert not out.exists()


def test_index_build_missing_model(tmp_path):
    """Already behaved: one line, no index folder left."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(small_images(1)[0])
    out = tmp_path / "index"
    code, line = cli("index", "build", f"--model={tmp_path / 'none'}",
                     f"--images={images}", f"--out={out}")
    assert code == 1 and line.startswith("uhga_tf.index: "), line
    assert not out.exists()


def test_evaluate_corrupt_config_json(tmp_path):
    """defect 7: names the file and the line; --out not created."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"model": {"code_length": 16,}}')
    out = tmp_path / "eval"
    code, line = cli("evaluate", f"--checkpoint={workdir}", f"--out={out}")
    assert_one_line(code, line, "evaluate", "config.json", "line 1")
    assert not out.exists()


def test_reproduce_bad_seeds():
    """Already behaved."""
    code, line = cli("reproduce", "--table=1", "--seeds=0")
    assert_one_line(code, line, "reproduce", "seeds must be >= 1")


@pytest.mark.parametrize("payload", [b"", b"hello world\n" * 10,
                                     bytes(range(256))])
def test_malformed_pth_is_a_user_error(tmp_path, payload):
    """A malformed .pth is a ValueError naming the file (the reader already
    did this; the entry points now also treat unpickling errors as user
    errors)."""
    from uhga_tf.models import torch_weights

    path = tmp_path / "weights.pth"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=str(path)):
        torch_weights.load_state_dict(str(path), expected_sha256=None)


def test_one_line_for_os_errors():
    """The message format for path errors: what, (path), expected."""
    from uhga_tf import cli_errors

    error = IsADirectoryError(21, "Is a directory", "/tmp/x")
    assert cli_errors.describe(error) == (
        "Is a directory (/tmp/x): expected a file, not a folder"
    )


def test_animated_gif_counts_every_frame():
    """defect 3: the GIF decoder decodes all frames, so all count."""
    from PIL import Image

    from uhga_tf.serving import request_checks

    frames = [Image.fromarray(np.full((40, 50, 3), 30 * i, np.uint8))
              for i in range(7)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True,
                   append_images=frames[1:])
    single = io.BytesIO()
    frames[0].save(single, "GIF")
    limits = request_checks.RequestLimits(max_image_pixels=10_000)
    assert request_checks.check_encoded_image(
        single.getvalue(), "g", limits) == 2000
    with pytest.raises(request_checks.RequestError, match="7 frames"):
        request_checks.check_encoded_image(animated.getvalue(), "g", limits)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_header_sizes_match_the_decoder(fmt):
    """The header reader agrees with tf.io.decode_image on every format."""
    from PIL import Image

    from uhga_tf.data import image_header

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((37, 53, 3), np.uint8)).save(buffer, fmt)
    data = buffer.getvalue()
    decoded = tf.io.decode_image(data, channels=3, expand_animations=False)
    assert image_header.image_size(data) == (fmt, 53, 37)
    assert decoded.shape[:2] == (37, 53)


def test_user_error_removes_new_outputs_and_bugs_keep_traceback(tmp_path):
    """The shared path: user error -> one line, exit 1, new outputs gone;
    anything else propagates unchanged (its traceback is shown)."""
    from uhga_tf import cli_errors

    kept = tmp_path / "kept"
    kept.mkdir()
    new = tmp_path / "new"

    def half_written():
        (new / "part").mkdir(parents=True)
        (kept / "file").write_text("x")
        raise ValueError("bad value (--flag): expected a good one")

    with pytest.raises(SystemExit) as info:
        cli_errors.run("verb", half_written, outputs=[str(new), str(kept)])
    assert str(info.value) == (
        "uhga_tf.verb: bad value (--flag): expected a good one"
    )
    assert not new.exists() and kept.exists()

    def bug():
        raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):
        cli_errors.run("verb", bug)


# Issue 18: one decode guard for every path from bytes to pixels ----------


@pytest.mark.parametrize("name,encoded,words", [
    ("junk before SOF", hostile_inputs.jpeg_with_junk_before_sof(300, 200),
     ["not a well-formed JPEG", "header"]),
    ("junk before DQT", hostile_inputs.jpeg_with_junk_before_dqt(300, 200),
     ["not a well-formed JPEG"]),
    ("BMP cut short", hostile_inputs.truncated_bmp_header(),
     ["not a well-formed BMP"]),
])
def test_image_that_cannot_be_sized_is_refused(batching_server, name,
                                               encoded, words):
    """issue 18 item 1: the decoder skips junk the header reader cannot,
    so bytes that cannot be sized never reach it (a 300x200 JPEG with two
    junk bytes was decoded in full)."""
    channel, _ = batching_server
    code, details = predict_error(channel, "serving_default", "image_bytes",
                                  np.array([encoded], dtype=object))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, name
    for word in words:
        assert word in details, (word, details)


def test_gif_frame_counts_at_its_own_size():
    """issue 18 item 1: a 10x10 canvas holding a 400x300 frame decodes to
    400x300 = 120000 pixels, not the 100 its screen descriptor says."""
    from uhga_tf.data import image_header

    encoded = hostile_inputs.gif_frame_over_canvas((10, 10), (400, 300))
    decoded = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    assert decoded.shape[0] * decoded.shape[1] == 120_000
    assert image_header.check_decodable(encoded, 120_000) == 120_000
    with pytest.raises(image_header.ImageTooLarge, match="120000 pixels"):
        image_header.check_decodable(encoded, 119_999)


def test_over_declared_tensor_is_refused_before_materialising(
        batching_server, monkeypatch):
    """issue 18 item 1: shape [1, 6000, 6000, 3] with one value was padded
    out by tf.make_ndarray (108 MB here, 1.2 GB at 20000^2) before the
    pixel limit refused it."""
    channel, _ = batching_server
    materialised = []
    make_ndarray = tf.make_ndarray

    def spy(proto, *args, **kwargs):
        materialised.append([d.size for d in proto.tensor_shape.dim])
        return make_ndarray(proto, *args, **kwargs)

    monkeypatch.setattr(tf, "make_ndarray", spy)
    request = hostile_inputs.over_declared_request((1, 6000, 6000, 3))
    assert request.ByteSize() < 100
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "6000x6000" in info.value.details()
    assert "max_image_pixels" in info.value.details()
    assert [1, 6000, 6000, 3] not in materialised


def test_index_build_guards_every_file_and_reads_gif_and_bmp(
        export_base, tmp_path):
    """issue 18 items 1 and 7: `index build --images` applies the guard
    (a 3000x3000 PNG bomb, 2.2 GB at 10000^2, was decoded) and indexes
    the GIF and BMP files the model reads (they were ignored)."""
    from PIL import Image

    from uhga_tf import retrieval

    model_dir = os.path.join(export_base, "1")
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.full((24, 20, 3), 90, np.uint8)
    for fmt in ("PNG", "GIF", "BMP"):
        Image.fromarray(pixels).save(images / f"a.{fmt.lower()}", fmt)
    index = retrieval.build_index(model_dir, str(tmp_path / "index"),
                                  images_dir=str(images), progress=False)
    assert len(index) == 3
    (images / "bomb.png").write_bytes(png_bomb(3000, 3000))
    with pytest.raises(ValueError,
                       match="bomb.png: the file is a 3000x3000 PNG"):
        retrieval.build_index(model_dir, str(tmp_path / "index2"),
                              images_dir=str(images), progress=False,
                              max_image_pixels=1_000_000)
    index = retrieval.build_index(model_dir, str(tmp_path / "index3"),
                                  images_dir=str(images), progress=False,
                                  skip_corrupt=True,
                                  max_image_pixels=1_000_000)
    assert len(index) == 3


def test_search_cli_bomb_is_one_line(tmp_path):
    """issue 18 item 1: the search CLI ended in PIL's
    DecompressionBombError traceback for a 20000^2 PNG query."""
    directory = tmp_path / "index"
    index = HammingIndex(CODE_LENGTH, backend="numpy")
    index.add(np.ones((2, CODE_LENGTH), np.int8), np.arange(2))
    index.save(str(directory))
    query = tmp_path / "bomb.png"
    query.write_bytes(png_bomb(20000, 20000))
    code, line = cli("search", f"--index={directory}",
                     f"--model={tmp_path}", str(query))
    assert_one_line(code, line, "search", "bomb.png", "20000x20000",
                    f"max_pixels={image_header.COLLECTION_MAX_IMAGE_PIXELS}")


def test_folder_dataset_image_check_applies_the_guard():
    """issue 18 item 1: folder datasets read sizes through PIL, which
    decodes junk-prefixed JPEGs the header reader cannot size."""
    from uhga_tf.data import image_folder

    with pytest.raises(ValueError, match="not a well-formed JPEG"):
        image_folder.check_image_bytes(
            hostile_inputs.jpeg_with_junk_before_sof(30, 20))
    with pytest.raises(ValueError, match="max_image_pixels=100"):
        image_folder.check_image_bytes(small_images(1)[0], max_pixels=100)


# Issue 18: every request answered; no ambiguous framing ------------------


@pytest.fixture(scope="module")
def rest_server(export_base):
    """An in-process gRPC + REST server on 127.0.0.1: (server, REST port)."""
    from uhga_tf.serving import rest

    server, channel, _ = start_server(export_base)
    api = rest.RestServer(server, "127.0.0.1", 0)
    port = api.start()
    yield server, port
    api.stop()
    channel.close()
    server.stop(1.0)


def raw_http(port, request, timeout=TIMEOUT):
    """Send raw bytes; return (status code, body) of the first response."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _wire(text):
    """Latin-1 where possible: http.server decodes the request line and
    headers as Latin-1, so b"\xb2" arrives as "²" (isdigit, not int)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _post(path, body, headers=b""):
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode() + headers
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def _rest_count(server, **labels):
    import re

    total = 0.0
    for line in server.metrics.exposition()[0].decode().splitlines():
        if line.startswith("uhga_request_count_total{"):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


PREDICT = "/v1/models/uhga:predict"


@pytest.mark.parametrize("body", [
    b"[" * 100_000,
    hostile_inputs.nested_json(900),
    hostile_inputs.nested_json(40, key="inputs"),
    b'{"instances": ' + b'{"a": ' * 5000 + b"0" + b"}" * 5001,
], ids=["brackets", "instances-900", "inputs-40", "objects-5000"])
def test_deeply_nested_json_is_400(rest_server, body):
    """issue 18 item 3: RecursionError dropped the connection."""
    server, port = rest_server
    before = _rest_count(server, api="rest", status="INVALID_ARGUMENT")
    status, answer = raw_http(port, _post(PREDICT, body))
    assert status == 400, answer
    assert b"nested deeper than 32 levels" in answer
    assert _rest_count(server, api="rest",
                       status="INVALID_ARGUMENT") == before + 1


@pytest.mark.parametrize("version", [
    "99999999999999999999", "9223372036854775808", "\u00b2", "\u0661",
])
def test_malformed_version_in_path_is_400(rest_server, version):
    """issue 18 item 3: past int64, or digits isdigit() accepts."""
    _, port = rest_server
    path = f"/v1/models/uhga/versions/{version}"
    status, answer = raw_http(
        port, _wire(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 400, answer
    assert b"version must be an integer in [0, 9223372036854775807]" in answer


@pytest.mark.parametrize("length", ["\u00b2", "\u00b3\u00b9",
                                    "\u0661\u0662", "+5", "5 5",
                                    "99999999999999999999999"])
def test_malformed_content_length_is_answered(rest_server, length):
    """issue 18 item 3: '²' passed isdigit() and then int() raised."""
    _, port = rest_server
    request = _wire(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Length: {length}\r\n\r\n{{}}")
    status, answer = raw_http(port, request)
    assert status in (411, 413), answer
    assert b"Content-Length" in answer or b"over the limit" in answer


def test_content_length_with_chunked_is_refused(rest_server):
    """issue 18 item 4: both framings -> 400, never the Content-Length."""
    _, port = rest_server
    body = b'{"instances": []}'
    status, answer = raw_http(
        port, _post(PREDICT, body, b"Transfer-Encoding: chunked\r\n"))
    assert status == 400, answer
    assert b"both Content-Length and Transfer-Encoding" in answer
    status, answer = raw_http(
        port, _post(PREDICT, body, b"Content-Length: 3\r\n"))
    assert status == 400 and b"conflicting Content-Length" in answer


def test_unexpected_error_is_a_one_line_internal(rest_server, monkeypatch):
    """issue 18 item 3: any bug is 500 / INTERNAL, counted as such."""
    server, port = rest_server

    def broken(request):
        raise KeyError("boom")

    monkeypatch.setattr(server, "predict", broken)
    image = base64.b64encode(small_images(1)[0]).decode()
    body = json.dumps({"instances": [{"b64": image}]}).encode()
    before = _rest_count(server, api="rest", status="INTERNAL")
    status, answer = raw_http(port, _post(PREDICT, body))
    assert status == 500, answer
    assert json.loads(answer) == {"error": "internal error: KeyError: 'boom'"}
    assert _rest_count(server, api="rest", status="INTERNAL") == before + 1
    assert _rest_count(server, api="rest", status="OK", method="Predict",
                       signature="serving_default") == 0


# Issue 18: monitoring and model state equal to the truth -----------------


def test_junk_labels_cannot_crowd_out_a_new_version():
    """issue 18 item 5: junk names filled the label cap, then a newly
    deployed real version was counted as "<other>"."""
    from tensorflow_serving.apis import model_pb2

    from uhga_tf.serving import prometheus

    loaded = [1]
    metrics = prometheus.ServingMetrics(
        "uhga", lambda: loaded, lambda: {"serving_default"}, {"stable": 1})
    for i in range(prometheus.MAX_LABEL_SETS + 10):
        junk = model_pb2.ModelSpec(name="uhga", signature_name=f"junk{i}")
        junk.version.value = 1000 + i
        metrics.observe("grpc", "Predict", junk, None, "NOT_FOUND", 0.01)
    loaded.append(2)
    real = model_pb2.ModelSpec(name="uhga", signature_name="serving_default")
    metrics.observe("grpc", "Predict", real, 2, "OK", 0.01)
    labelled = model_pb2.ModelSpec(name="uhga", version_label="stable")
    metrics.observe("rest", "GetModelStatus", labelled, None, "OK", 0.01)
    text = metrics.exposition()[0].decode()
    counts = [line for line in text.splitlines()
              if line.startswith("uhga_request_count_total{")]
    assert len(counts) == 3, counts
    server = type("S", (), {"metrics": metrics})
    assert _rest_count(server, version="2", signature="serving_default",
                       status="OK") == 1
    assert _rest_count(server, version="label:stable") == 1
    assert _rest_count(server, version="<other>",
                       signature="<other>") == prometheus.MAX_LABEL_SETS + 10


def test_rest_status_of_a_failed_version_equals_grpc(export_base, tmp_path):
    """issue 18 item 5: REST said UNKNOWN / error_code "OK"."""
    from uhga_tf.serving import rest

    base = tmp_path / "models"
    with _serving_copy(export_base, base,
                       lambda b: _garbage_version(b, 2)) as (server, channel):
        api = rest.RestApi(server)
        answer = api.status({"name": "uhga", "version": None, "label": None})
        by_grpc = {s.version: s for s in model_status(channel)
                   .model_version_status}
        by_rest = {int(s["version"]): s
                   for s in answer["model_version_status"]}
        assert by_rest[1]["state"] == "AVAILABLE"
        assert by_rest[1]["status"]["error_code"] == "OK"
        assert by_rest[2]["state"] == "END"
        assert by_rest[2]["status"]["error_code"] == "UNKNOWN"
        assert by_rest[2]["status"]["error_message"] == (
            by_grpc[2].status.error_message)
        assert "DecodeError" in by_rest[2]["status"]["error_message"]


def test_failed_version_is_retried_when_its_files_change(export_base,
                                                         tmp_path):
    """issue 18 item 5: a non-atomic copy (saved_model.pb first, variables/
    later) was marked END for good."""
    base = tmp_path / "models"
    with _serving_copy(export_base, base) as (server, channel):
        source = os.path.join(export_base, "1")
        os.makedirs(base / "2")
        shutil.copy(os.path.join(source, "saved_model.pb"), base / "2")
        assert wait_for(lambda: 2 in server.manager.failed())
        for name in os.listdir(source):
            if name != "saved_model.pb":
                target = base / "2" / name
                if os.path.isdir(os.path.join(source, name)):
                    shutil.copytree(os.path.join(source, name), target)
                else:
                    shutil.copy(os.path.join(source, name), target)
        assert wait_for(lambda: server.manager.versions() == [2])
        assert 2 not in server.manager.failed()
        assert _predict_one_image(channel).model_spec.version.value == 2


# Issue 18: wrong files and silent surprises -------------------------------


def _index_with(tmp_path, **fields):
    directory = _index_without(tmp_path, "count")
    path = directory / "hamming_index.bin"
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<8sII", data)
    header = json.loads(data[16:16 + length])
    header["count"] = 4
    header.update(fields)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<8sII", magic, version, len(new)) + new
                     + data[16 + length:])
    return directory


@pytest.mark.parametrize("fields,word", [
    ({"count": "4"}, "count='4'"),
    ({"metadata_bytes": None}, "metadata_bytes=None"),
    ({"payload_bytes": 1.5}, "payload_bytes=1.5"),
    ({"info": []}, "info=[]"),
    ({"count": -4}, "count=-4"),
])
def test_index_header_field_of_the_wrong_type(tmp_path, fields, word):
    """issue 18 item 6: a string count ended in a TypeError traceback."""
    directory = _index_with(tmp_path, **fields)
    with pytest.raises(ValueError, match="corrupt index header") as info:
        HammingIndex.load(str(directory))
    assert word in str(info.value)


def test_index_out_is_a_file_names_out(tmp_path):
    """issue 18 item 6: the error named an internal temp path."""
    out = tmp_path / "taken"
    out.write_text("not a folder")
    index = HammingIndex(CODE_LENGTH, backend="numpy")
    index.add(np.ones((1, CODE_LENGTH), np.int8), np.arange(1))
    with pytest.raises(ValueError) as info:
        index.save(str(out))
    assert str(info.value).startswith(f"index directory {out} is a file")
    assert out.read_text() == "not a folder"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_index_folder_follows_the_umask(tmp_path):
    """issue 18 item 7: index folders were created 0700."""
    index = HammingIndex(CODE_LENGTH, backend="numpy")
    index.add(np.ones((1, CODE_LENGTH), np.int8), np.arange(1))
    old = os.umask(0o022)
    try:
        index.save(str(tmp_path / "index"))
    finally:
        os.umask(old)
    assert (tmp_path / "index").stat().st_mode & 0o777 == 0o755


def test_damaged_hasher_is_named_damaged(trained_workdir, tmp_path):
    """issue 18 item 6: a truncated hasher.keras was "File not found"."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_workdir / "run" / "config.json", run)
    whole = (trained_workdir / "run" / "hasher.keras").read_bytes()
    (run / "hasher.keras").write_bytes(whole[: len(whole) // 2])
    export_dir = tmp_path / "models"
    code, line = cli("export", f"--checkpoint={run}",
                     f"--export_dir={export_dir}")
    assert_one_line(code, line, "export", "hasher.keras is damaged")
    assert "File not found" not in line
    assert not export_dir.exists()


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """issue 18 item 6: TF's "No space left on device" (training under
    --workdir, export onto --export_dir) ended in a traceback and left an
    empty export_dir."""
    from uhga_tf import cli_errors

    export_dir = tmp_path / "models"

    def write_until_full():
        export_dir.mkdir()
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{export_dir}/.tmp-1/variables; No space left on "
            "device")

    with pytest.raises(SystemExit) as info:
        cli_errors.run("export", write_until_full,
                       outputs=[str(export_dir)])
    assert str(info.value) == (
        f"uhga_tf.export: No space left on device ({export_dir}/.tmp-1/"
        "variables): expected free disk space")
    assert not export_dir.exists()


# A full disk for real: a small tmpfs (root) and RLIMIT_FSIZE (anyone).


def _mount_tmpfs(path, size):
    """Mount a tmpfs of `size` at `path`; return None, or why not."""
    if not sys.platform.startswith("linux"):
        return "tmpfs is Linux only"
    mount = shutil.which("mount")
    if mount is None:
        return "no mount command"
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    if result.returncode:
        return (f"mount -t tmpfs needs root with CAP_SYS_ADMIN "
                f"({result.stderr.strip()})")
    return None


def _limit_file_size(limit):
    """A preexec_fn: the child's writes past `limit` bytes fail (EFBIG)."""
    import resource
    import signal

    def limit_in_child():
        # Ignored, SIGXFSZ no longer kills: write() returns EFBIG instead.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_in_child


@pytest.fixture(params=["tmpfs", "rlimit_fsize"])
def small_disk(request, tmp_path):
    """make(size) -> (folder, preexec_fn, words of the expected line).

    tmpfs: a real file system of `size` bytes mounted on the folder; the
    child's writes fail with ENOSPC ("No space left on device") exactly as
    on a full disk. Skipped, with the mount's reason, where mounting is not
    allowed (not root, or a container without CAP_SYS_ADMIN); `.ci/run` runs
    as root.
    rlimit_fsize: a plain folder, and the child runs under RLIMIT_FSIZE
    (`ulimit -f`) of 8 KiB with SIGXFSZ ignored, so the kernel fails any
    write past 8 KiB in any file with EFBIG ("File too large") part-way
    through it, as ENOSPC does. Needs no privilege: every Linux run has it.
    It proves the same error path (a real write() failing in TF's C++ file
    system and in Python, a partial file on disk), not free space itself.
    """
    folder = tmp_path / "disk"
    folder.mkdir()
    if request.param == "rlimit_fsize":
        import resource

        if not hasattr(resource, "RLIMIT_FSIZE"):
            pytest.skip("no RLIMIT_FSIZE on this platform")

        def make(size):
            del size
            return folder, _limit_file_size(8 * 1024), (
                "File too large", "ulimit -f")

        yield make
        return

    mounted = []

    def make(size):
        reason = _mount_tmpfs(folder, size)
        if reason is not None:
            pytest.skip(reason)
        mounted.append(folder)
        return folder, None, ("No space left on device",
                              "expected free disk space")

    yield make
    for path in mounted:
        if subprocess.run(["umount", str(path)]).returncode:
            subprocess.run(["umount", "-l", str(path)])


def _debris(folder):
    """Files and folders under `folder` that no finished write leaves:
    TF's `_temp` checkpoint folders and `.tempstate` files, our `.tmp`
    names (atomic_path, atomic_directory)."""
    found = []
    for directory, dirs, files in os.walk(folder):
        for name in dirs + files:
            if ("_temp" in name or ".tempstate" in name
                    or name.startswith(".") or ".tmp" in name):
                found.append(os.path.join(directory, name))
    return found


def test_train_on_a_full_disk_keeps_whole_checkpoints_only(
    tmp_path, small_disk
):
    """issue 18 item 6, on a real full file system: training whose
    --workdir fills up ended in a ResourceExhaustedError line naming TF's
    temporary file ("{{function_node ...}} .../ckpt-6_temp/part-...
    .tempstate...") or, for EFBIG, an OutOfRangeError traceback, and left
    `ckpt-6_temp/` behind. Now: one line naming the checkpoint it was
    writing and what is expected; the whole checkpoints stay (a rerun with
    space resumes from them), nothing half-written does."""
    disk, preexec_fn, words = small_disk("48k")
    workdir = disk / "run"
    code, line = cli("train", *tiny_train_args(tmp_path, workdir=workdir),
                     timeout=600, preexec_fn=preexec_fn)
    ckpt_dir = workdir / "checkpoints"
    assert_one_line(code, line, "train", f"({ckpt_dir}{os.sep}ckpt-",
                    *words)
    assert _debris(workdir) == []
    whole = (_checkpoint_numbers(ckpt_dir)
             if (ckpt_dir / "checkpoint").exists() else [])
    failed = int(line.split(f"{ckpt_dir}{os.sep}ckpt-")[1].split(")")[0])
    assert failed not in whole, (failed, whole)
    allowed = {"checkpoint"} | {f"ckpt-{n}.index" for n in whole} | {
        f"ckpt-{n}.data-00000-of-00001" for n in whole}
    assert set(os.listdir(ckpt_dir)) <= allowed, os.listdir(ckpt_dir)


def test_export_onto_a_full_disk_leaves_nothing(
    trained_workdir, tmp_path, small_disk
):
    """issue 18 item 6, on a real full file system: an export that does
    not fit ended in a traceback (EFBIG) and left an empty export_dir.
    Now: one line naming the version it was writing and what is expected,
    and no export_dir, temporary folder or partial file on the disk."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_workdir / "run" / "hasher.keras", run)
    with open(trained_workdir / "run" / "config.json") as f:
        config = json.load(f)
    # The tiny run's 16-d features fit the 16-d tiny backbone (~160 KB
    # export: saved_model.pb alone is over 64 KiB).
    config["model"].update(backbone="tiny_cnn", image_size=32)
    with open(run / "config.json", "w") as f:
        json.dump(config, f)
    disk, preexec_fn, words = small_disk("64k")
    export_dir = disk / "models"
    code, line = cli("export", f"--checkpoint={run}",
                     f"--export_dir={export_dir}", timeout=600,
                     preexec_fn=preexec_fn)
    assert_one_line(code, line, "export", f"({export_dir / '1'})", *words)
    assert not export_dir.exists()
    assert os.listdir(disk) == []


def _toy_split(tmp_path, name="toy", classes=10):
    labels = np.repeat(np.arange(classes), 2000 // classes)
    partition = np.array(["train"] * 1500 + ["test"] * 500)
    partition = partition[np.random.default_rng(0).permutation(2000)]
    kw = {"per_class": {"query": 50 // classes, "train": 200 // classes,
                        "validation": 50 // classes}}
    split = splits.load_or_create_split(str(tmp_path), name, "uhga", labels,
                                        partition, 0, **kw)
    return split, (str(tmp_path), name, "uhga", labels, partition, 0), kw


@pytest.mark.parametrize("damage,words", [
    ("repeat", ["train.txt repeats index"]),
    ("overlap", ["in both query.txt and train.txt"]),
])
def test_stored_split_is_validated_fully(tmp_path, damage, words):
    """issue 18 item 7: repeated indices and a query/train overlap were
    accepted (and changed MAP)."""
    split, args, kw = _toy_split(tmp_path)
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("toy")]
    train = [int(i) for i in split.train]
    if damage == "repeat":
        train[1] = train[0]
    else:
        train[0] = int(split.query[0])
    (folder / "train.txt").write_text("\n".join(map(str, train)) + "\n")
    with pytest.raises(ValueError) as info:
        splits.load_or_create_split(*args, **kw)
    for word in words:
        assert word in str(info.value)


def test_split_cache_is_keyed_by_the_data(tmp_path):
    """issue 18 item 7: a second `folder` collection in the same checkout
    was refused until cache/splits was deleted."""
    first, _, _ = _toy_split(tmp_path, "folder", classes=10)
    second, _, _ = _toy_split(tmp_path, "folder", classes=5)
    again, _, _ = _toy_split(tmp_path, "folder", classes=10)
    assert len(list(tmp_path.iterdir())) == 2
    for name in splits.SPLIT_SETS:
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.train, second.train)


@pytest.mark.parametrize("labels", [
    np.zeros(400, np.int64),
    np.ones((400, 3), np.uint8),
], ids=["single-label", "multi-label-all-share"])
def test_single_class_collection_warns(tmp_path, caplog, labels):
    """issue 18 item 7: one class printed "final MAP 1.0000" silently."""
    partition = np.array(["train"] * 300 + ["test"] * 100)
    with caplog.at_level("WARNING"):
        try:
            splits.load_or_create_split(str(tmp_path), "one", "uhga",
                                        labels, partition, 0)
        except ValueError:
            pass  # a protocol may refuse it too; the warning came first
    assert any("single class" in r.getMessage() and "1.0" in r.getMessage()
               for r in caplog.records), [r.getMessage()
                                          for r in caplog.records]
