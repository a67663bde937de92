r"""Serving throughput and latency of the embedded gRPC server.

  python benchmarks/serving.py [--backbone=efficientnet_lite0|tiny]
      [--image_size=224] [--clients=8] [--requests_per_client=500]
      [--batch_size=32] [--batched_requests_per_client=10] [--max_seconds=90]
  python benchmarks/serving.py --attacks_only [--backbone=tiny]
  python benchmarks/serving.py --attacks_only --model_base_path=models/uhga

Exports a model (the real EfficientNet-Lite0 backbone from
`uhga_tf.models.backbone` with an untrained seeded hash head, or a tiny
two-conv stand-in), or with --model_base_path serves the newest version of an
export that `uhga_tf.export` wrote (a trained model, e.g. the demo's; its
`uhga_tf.json` is recorded in each run's `config.model`), measures the
in-process SavedModel (`serving_default` on JPEG bytes) and then `python -m
uhga_tf.serve` on loopback: `clients` threads each sending single-image
requests, then requests of `batch_size` images. Served codes are checked
against the in-process SavedModel; a mismatch counts as an error. Each phase
stops after `max_seconds`.

Writes benchmarks/results/serving.json. Top-level keys: `errors` (all
phases), `p50_ms`/`p99_ms` (single-image requests), `images_per_s` (batched
requests) and `served_over_inprocess` (batched served images/s over the
in-process SavedModel's images/s at the same batch size, same run).

The mixed run (`mixed` key; with --mixed_only it is the only phase and is
merged into the existing JSON) starts a batching server and measures an
all-good phase, then the same clients and request count with 1 request in
10 bad (corrupt bytes, a batch over max_batch_size, a float32 tensor for
image_bytes, in turn) and one decompression bomb (a ~100 KB PNG of
10000 x 10000 pixels) in every 100: `mixed.failed_good_requests`,
`mixed.p99_good_ms`, `mixed.p99_all_good_ms` (the all-good phase, same
script) and `mixed.peak_rss_mb` (the server's VmHWM after the mixed phase).

The `hostile` and `slowloris` runs (issue 18; with --attacks_only they are
merged into the existing JSON) are described in `serving_attacks.py`:
`hostile.failed_good_requests`, `hostile.p99_good_ms`,
`hostile.p99_all_good_ms`, `hostile.peak_rss_mb`, `hostile.unanswered`,
`slowloris.legit_success_rate` and `slowloris.legit_p99_ms`.

REST vs gRPC (section `rest_vs_grpc`, on unless --norest): the same server
also serves REST (`--rest_api_port=0`); the same clients send the same
images as TF-Serving REST JSON (`{"instances": [{"b64": ...}]}`, one
keep-alive connection per client thread) and over gRPC, in legs of
--rest_leg_seconds in the order gRPC, REST, REST, gRPC (--rest_rounds
times) for single images and again for batches, so drift in the machine's
load cancels; images/s of each leg are kept. `rest_over_grpc_batch` / `rest_over_grpc_single`:
REST images/s over gRPC images/s (batches of --batch_size / single images).
"""

import base64
import http.client
import json
import os
import platform
import struct
import sys
import tempfile
import threading
import time
import zlib

from absl import app
from absl import flags
import grpc
import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from uhga_tf import child_process
from uhga_tf import io_utils
from uhga_tf import provenance
from uhga_tf import saved_model
from uhga_tf.serving import grpc_client

SIGNATURE = saved_model.SIGNATURE_IMAGE_BYTES
INPUT = saved_model.INPUT_IMAGE_BYTES
CODES = saved_model.OUTPUT_CODES

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "backbone", "efficientnet_lite0", ["efficientnet_lite0", "tiny"],
    "Real backbone or a tiny stand-in.",
)
flags.DEFINE_integer("image_size", None, "Backbone input; default 224 / 32.")
flags.DEFINE_integer("code_length", 64, "Code length of the hash head.")
flags.DEFINE_integer("clients", 8, "Concurrent client threads.")
flags.DEFINE_integer("requests_per_client", 500, "Single-image requests.")
flags.DEFINE_integer("batch_size", 32, "Images per batched request.")
flags.DEFINE_integer(
    "batched_requests_per_client", 10, "Batched requests per client."
)
flags.DEFINE_float("max_seconds", 90.0, "Time limit per phase.")
flags.DEFINE_bool("enable_batching", False, "Server-side batching.")
flags.DEFINE_integer(
    "mixed_requests_per_client", 500,
    "Requests per client in each phase of the mixed run (0 skips it).",
)
flags.DEFINE_bool(
    "mixed_only", False,
    "Run only the mixed run and merge it into the existing --out JSON.",
)
flags.DEFINE_bool(
    "attacks_only", False,
    "Run only the hostile and slowloris runs (issue 18) and merge them "
    "into the existing --out JSON.",
)
flags.DEFINE_integer(
    "hostile_requests_per_client", 300,
    "Good requests per client in each phase of the hostile run.",
)
flags.DEFINE_integer("slowloris_connections", 200,
                     "Idle or trickling attacker connections.")
flags.DEFINE_float("slowloris_seconds", 60.0,
                   "Length of the slowloris run (one request a second).")
flags.DEFINE_float("slowloris_trickle_s", 5.0,
                   "Seconds between a trickling attacker's bytes.")
flags.DEFINE_bool("rest", True, "Also measure REST against gRPC.")
flags.DEFINE_float(
    "rest_leg_seconds", 15.0, "Length of one REST-vs-gRPC leg."
)
flags.DEFINE_integer(
    "rest_rounds", 2, "REST-vs-gRPC rounds of four legs (gRPC, REST, REST, "
    "gRPC) per request size."
)
flags.DEFINE_string(
    "model_base_path", None,
    "Serve the newest version of this `uhga_tf.export` base path (a "
    "trained model) instead of exporting a seeded one; --backbone and "
    "--image_size then come from its uhga_tf.json.",
)
flags.DEFINE_string(
    "out", "benchmarks/results/serving.json", "Where to write the JSON."
)

TIMEOUT = 60.0


def build_models(name, image_size, code_length):
    keras.utils.set_random_seed(0)
    if name == "tiny":
        backbone = keras.Sequential(
            [
                keras.Input((image_size, image_size, 3)),
                keras.layers.Rescaling(1 / 127.5, offset=-1.0),
                keras.layers.Conv2D(8, 3, activation="relu"),
                keras.layers.Conv2D(32, 3),
                keras.layers.GlobalAveragePooling2D(),
            ],
            name="tiny_backbone",
        )
        hasher = keras.Sequential(
            [keras.Input((32,)), keras.layers.Dense(code_length)]
        )
        return backbone, hasher
    from uhga_tf.models import backbone as backbone_lib
    from uhga_tf.models import hash_layer

    backbone = backbone_lib.build_backbone(name, image_size=image_size)
    feature_dim = int(backbone.output_shape[-1])
    hasher = hash_layer.build_hasher(feature_dim, code_length)
    return backbone, hasher


def jpeg_images(n, seed=0):
    """Seeded 256x192 JPEGs with smooth structure plus noise."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(n):
        ramp = np.linspace(0, 255, 256)[None, :, None] * rng.uniform(-1, 1, 3)
        noise = rng.normal(0, 30, size=(192, 256, 3))
        image = np.clip(rng.integers(0, 256, 3) + ramp + noise, 0, 255)
        encoded.append(tf.io.encode_jpeg(image.astype(np.uint8)).numpy())
    return encoded


def load_signature(path):
    """The `serving_default` signature of the SavedModel at `path`."""
    return tf.saved_model.load(path).signatures[SIGNATURE]


def reference_codes(fn, requests):
    """In-process codes of each request (a list of encoded images)."""
    return [fn(**{INPUT: tf.constant(r)})[CODES].numpy() for r in requests]


def in_process_images_per_s(path, images, batch_size, max_seconds):
    fn = load_signature(path)
    batch = tf.constant(images[:batch_size])
    fn(**{INPUT: batch})  # warm-up
    count, start = 0, time.perf_counter()
    while count < 20 and time.perf_counter() - start < max_seconds / 3:
        fn(**{INPUT: batch})
        count += 1
    elapsed = time.perf_counter() - start
    return count * batch_size / elapsed, fn


def start_server(base, log_dir, enable_batching=None, rest=False):
    """`uhga_tf.serve` on free ports: (process, gRPC address, REST port)."""
    if enable_batching is None:
        enable_batching = FLAGS.enable_batching
    out_path = os.path.join(log_dir, "server.out")
    log_path = os.path.join(log_dir, "server.log")
    args = [
        "uhga_tf.serve", f"--model_base_path={base}", "--port=0",
        f"--max_batch_size={max(64, FLAGS.batch_size)}",
    ]  # fmt: skip
    if rest:
        args.append("--rest_api_port=0")
    if enable_batching:
        args.append("--enable_batching")
    proc = child_process.start(args, out_path, log_path)

    def ready(text):
        address = child_process.grpc_address(text)
        port = child_process.rest_port(text) if rest else None
        if address is None or (rest and port is None):
            return None
        return address, port

    address, port = child_process.wait_for_output(
        proc, out_path, log_path, ready, 180, poll_s=0.2)
    return proc, address, port


def run_clients(worker):
    """Run worker(i) on FLAGS.clients threads; return the wall seconds."""
    threads = [
        threading.Thread(target=worker, args=(i,))
        for i in range(FLAGS.clients)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def percentiles_ms(latencies, suffix="_ms"):
    """p50 and p99 of `latencies` (seconds) in ms; 0 when there are none."""
    ms = np.array(latencies) * 1000 if len(latencies) else np.zeros(1)
    return {
        f"p{q}{suffix}": round(float(np.percentile(ms, q)), 3)
        for q in (50, 99)
    }


def run_phase(address, channel, requests, per_client, expected, max_seconds):
    """Each client sends its requests in turn; returns latency stats."""
    latencies, errors = [], []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def worker(i):
        mine = []
        for j in range(per_client):
            if time.monotonic() > deadline:
                break
            k = (i * per_client + j) % len(requests)
            start = time.perf_counter()
            try:
                codes, _ = grpc_client.encode_images(
                    address, requests[k], timeout=TIMEOUT, channel=channel
                )
            except grpc.RpcError as e:
                with lock:
                    errors.append(f"{e.code().name}: {e.details()}")
                continue
            mine.append(time.perf_counter() - start)
            if not np.array_equal(codes, expected[k]):
                with lock:
                    errors.append(f"request {k}: codes differ")
        with lock:
            latencies.extend(mine)

    elapsed = run_clients(worker)
    n = len(latencies)
    images = n * len(requests[0])
    return {
        "requests": n,
        "images_per_request": len(requests[0]),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(n / elapsed, 2),
        "images_per_s": round(images / elapsed, 2),
        **percentiles_ms(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def png_bomb(width=10000, height=10000):
    """A real PNG of width x height black pixels, about 100 KB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    idat = b"".join(compressor.compress(row) for _ in range(height))
    idat += compressor.flush()

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _request(array, dtype=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = saved_model.DEFAULT_MODEL_NAME
    request.model_spec.signature_name = SIGNATURE
    request.output_filter.append(CODES)
    request.inputs[INPUT].CopyFrom(
        tf.make_tensor_proto(array, dtype=dtype)
    )
    return request


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def mixed_phase(stub, goods, expected, bads, bomb, per_client, max_seconds):
    """Good requests, with bad ones (1 in 10) and a bomb every 100 if given.

    Returns good-request latency stats and the count of good requests that
    failed (an error status or wrong codes) and of bad requests that did
    not get INVALID_ARGUMENT.
    """
    latencies, failed_good, wrong_bad = [], [], []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    counts = {"good": 0, "bad": 0, "bomb": 0}

    def worker(i):
        mine = []
        for j in range(per_client):
            if time.monotonic() > deadline:
                break
            if bads is not None and j % 100 == 50:
                kind, request = "bomb", bomb
            elif bads is not None and j % 10 == 5:
                kind, request = "bad", bads[(j // 10) % len(bads)]
            else:
                kind = "good"
                k = (i * per_client + j) % len(goods)
                request = goods[k]
            start = time.perf_counter()
            try:
                response = stub.Predict(request, timeout=TIMEOUT)
            except grpc.RpcError as e:
                with lock:
                    counts[kind] += 1
                    if kind == "good":
                        failed_good.append(f"{e.code().name}: {e.details()}")
                    elif e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        wrong_bad.append(f"{kind} {e.code().name}")
                continue
            elapsed = time.perf_counter() - start
            with lock:
                counts[kind] += 1
                if kind != "good":
                    wrong_bad.append(f"{kind} answered OK")
                    continue
            codes = tf.make_ndarray(response.outputs[CODES])
            if not np.array_equal(codes, expected[k]):
                with lock:
                    failed_good.append(f"request {k}: codes differ")
                continue
            mine.append(elapsed)
        with lock:
            latencies.extend(mine)

    elapsed = run_clients(worker)
    return {
        "requests": counts,
        "seconds": round(elapsed, 3),
        **percentiles_ms(latencies, suffix="_good_ms"),
        "failed_good_requests": len(failed_good),
        "bad_not_invalid_argument": len(wrong_bad),
        "first_errors": (failed_good + wrong_bad)[:3],
    }


def mixed_run(base, tmp, images, fn):
    """All-good phase, then the mixed phase, on one batching server."""
    goods = [_request(np.array([b], dtype=object)) for b in images]
    expected = reference_codes(fn, [[b] for b in images])
    max_batch_size = max(64, FLAGS.batch_size)
    bads = [
        _request(np.array([b"\xff\xd8\xff garbage, not a JPEG"],
                          dtype=object)),
        _request(np.array(images[:1] * (max_batch_size + 1), dtype=object)),
        _request(np.zeros((1,), np.float32)),
    ]
    bomb = _request(np.array([png_bomb()], dtype=object))
    proc, address, _ = start_server(base, tmp, enable_batching=True)
    channel = grpc.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
    )
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        stub.Predict(goods[0], timeout=TIMEOUT)
        per_client = FLAGS.mixed_requests_per_client
        all_good = mixed_phase(stub, goods, expected, None, None,
                               per_client, FLAGS.max_seconds)
        rss_all_good = peak_rss_mb(proc.pid)
        mixed = mixed_phase(stub, goods, expected, bads, bomb, per_client,
                            FLAGS.max_seconds)
        rss = peak_rss_mb(proc.pid)
    finally:
        channel.close()
        child_process.stop(proc, grace_s=30)
    return {
        "failed_good_requests": mixed["failed_good_requests"],
        "p99_good_ms": mixed["p99_good_ms"],
        "p99_all_good_ms": all_good["p99_good_ms"],
        "p99_ratio": round(mixed["p99_good_ms"] / all_good["p99_good_ms"],
                           3),
        "peak_rss_mb": rss,
        "peak_rss_mb_after_all_good": rss_all_good,
        "all_good": all_good,
        "mixed": mixed,
        "config": {
            "backbone": FLAGS.backbone,
            "clients": FLAGS.clients,
            "requests_per_client": FLAGS.mixed_requests_per_client,
            "enable_batching": True,
            "bad": "1 in 10: corrupt bytes, batch of "
            f"{max_batch_size + 1} > max_batch_size, float32 image_bytes",
            "bomb": "1 in 100: 10000x10000 PNG "
            f"({len(bomb.inputs[INPUT].string_val[0])} bytes)",
            "good": f"one 256x192 JPEG via {SIGNATURE}",
        },
    }


# REST vs gRPC ----------------------------------------------------------


class RestClient:
    """TF-Serving REST predict over one keep-alive connection."""

    def __init__(self, port):
        self._connection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=TIMEOUT
        )

    def encode_images(self, encoded):
        body = json.dumps(
            {
                "instances": [
                    {"b64": base64.b64encode(b).decode("ascii")}
                    for b in encoded
                ],
                "output_filter": [CODES],
            }
        )
        self._connection.request(
            "POST",
            f"/v1/models/{saved_model.DEFAULT_MODEL_NAME}:predict",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        response = self._connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer}")
        return np.array(answer["predictions"], np.int8)

    def close(self):
        self._connection.close()


def timed_phase(make_call, requests, expected, max_seconds):
    """FLAGS.clients threads send `requests` round robin until the limit.

    make_call() -> (call(encoded) -> codes, close()) per thread.
    """
    latencies, errors = [], []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def worker(i):
        call, close = make_call()
        mine, j = [], 0
        try:
            while time.monotonic() < deadline:
                k = (i + j * FLAGS.clients) % len(requests)
                j += 1
                start = time.perf_counter()
                try:
                    codes = call(requests[k])
                except (grpc.RpcError, RuntimeError, OSError) as e:
                    with lock:
                        errors.append(str(e)[:200])
                    continue
                mine.append(time.perf_counter() - start)
                if not np.array_equal(codes, expected[k]):
                    with lock:
                        errors.append(f"request {k}: codes differ")
        finally:
            close()
            with lock:
                latencies.extend(mine)

    elapsed = run_clients(worker)
    return latencies, len(requests[0]), elapsed, errors


def _summary(parts):
    latencies = [x for part in parts for x in part[0]]
    seconds = sum(part[2] for part in parts)
    n = len(latencies)
    return {
        "requests": n,
        "images_per_request": parts[0][1],
        "seconds": round(seconds, 3),
        "images_per_s": round(n * parts[0][1] / seconds, 2),
        **percentiles_ms(latencies),
        "errors": sum(len(part[3]) for part in parts),
        "first_errors": [e for part in parts for e in part[3]][:3],
        "images_per_s_per_leg": [
            round(len(part[0]) * part[1] / part[2], 2) for part in parts
        ],
    }


def rest_vs_grpc(address, rest_port, singles, batches, expected_single,
                 expected_batched):  # fmt: skip
    """Same server, same images, same clients: REST and gRPC, ABBA order."""

    def grpc_call():
        channel = grpc.insecure_channel(address)

        def call(encoded):
            codes, _ = grpc_client.encode_images(
                address, encoded, timeout=TIMEOUT, channel=channel
            )
            return codes

        return call, channel.close

    def rest_call():
        rest = RestClient(rest_port)
        return rest.encode_images, rest.close

    result = {}
    for name, requests, expected in (
        ("single", singles, expected_single),
        ("batch", batches, expected_batched),
    ):
        runs = {"grpc": [], "rest": []}
        for api in ("grpc", "rest", "rest", "grpc") * FLAGS.rest_rounds:
            make_call = grpc_call if api == "grpc" else rest_call
            runs[api].append(
                timed_phase(make_call, requests, expected,
                            FLAGS.rest_leg_seconds)
            )  # fmt: skip
        result[name] = {api: _summary(parts) for api, parts in runs.items()}
        result[f"rest_over_grpc_{name}"] = round(
            result[name]["rest"]["images_per_s"]
            / result[name]["grpc"]["images_per_s"],
            3,
        )
    return result


def export_model(tmp, image_size, images):
    """Export the benchmark model under `<tmp>/uhga`; return (base, path)."""
    backbone, hasher = build_models(
        FLAGS.backbone, image_size, FLAGS.code_length
    )
    base = os.path.join(tmp, "uhga")
    path = saved_model.export_saved_model(
        backbone, hasher, base, image_size=image_size,
        metadata={"backbone": FLAGS.backbone},
        warmup_images=images[:2],
    )  # fmt: skip
    return base, path


def existing_model(base):
    """(base, newest version path, its uhga_tf.json) of an export."""
    found = saved_model.list_versions(base)
    if not found:
        raise ValueError(f"no version under --model_base_path={base}")
    path = os.path.join(base, str(found[-1]))
    with open(os.path.join(path, saved_model.ASSETS_EXTRA,
                           saved_model.METADATA_FILENAME)) as f:
        metadata = json.load(f)
    return base, path, metadata


def model_record(path, metadata):
    """What `config.model` says about a served export."""
    keys = ("backbone", "backbone_weights", "image_size", "code_length",
            "training_data", "checkpoint", "git_sha", "created_utc")
    return {"path": os.path.abspath(path),
            **{k: metadata[k] for k in keys if k in metadata}}


def request_sets(images):
    """Single-image requests (one per image) and 8 batches of batch_size."""
    singles = [[b] for b in images]
    batches = [
        [images[(i + j) % len(images)] for j in range(FLAGS.batch_size)]
        for i in range(8)
    ]
    return singles, batches


def measure_served(base, tmp, singles, batches, expected):
    """gRPC single and batched phases, then REST vs gRPC, on one server.

    Returns:
        (single phase, batched phase, REST-vs-gRPC comparison or None).
    """
    expected_single, expected_batched = expected
    proc, address, rest_port = start_server(base, tmp, rest=FLAGS.rest)
    channel = grpc.insecure_channel(address)
    comparison = None
    try:
        grpc_client.encode_images(address, singles[0], channel=channel)
        single = run_phase(
            address, channel, singles, FLAGS.requests_per_client,
            expected_single, FLAGS.max_seconds,
        )  # fmt: skip
        batched = run_phase(
            address, channel, batches, FLAGS.batched_requests_per_client,
            expected_batched, FLAGS.max_seconds,
        )  # fmt: skip
        if FLAGS.rest:
            comparison = rest_vs_grpc(
                address, rest_port, singles, batches, expected_single,
                expected_batched,
            )  # fmt: skip
    finally:
        channel.close()
        child_process.stop(proc, grace_s=30)
    return single, batched, comparison


def measure(base, path, tmp, images):
    """Every phase of a full run; returns the raw measurements."""
    inproc_batched, fn = in_process_images_per_s(
        path, images, FLAGS.batch_size, FLAGS.max_seconds
    )
    inproc_single, _ = in_process_images_per_s(
        path, images, 1, FLAGS.max_seconds
    )
    singles, batches = request_sets(images)
    expected = (reference_codes(fn, singles), reference_codes(fn, batches))
    single, batched, comparison = measure_served(
        base, tmp, singles, batches, expected
    )
    mixed = None
    if FLAGS.mixed_requests_per_client:
        mixed = mixed_run(base, tmp, images, fn)
    return {
        "single": single,
        "batched": batched,
        "comparison": comparison,
        "mixed": mixed,
        "inproc_single": inproc_single,
        "inproc_batched": inproc_batched,
    }


def run_config(image_size):
    """The `config` section of the result JSON."""
    return {
        "backbone": FLAGS.backbone,
        "hash_head": "untrained, seeded" if FLAGS.backbone != "tiny"
        else "Dense, seeded",
        "image_size": image_size,
        "code_length": FLAGS.code_length,
        "clients": FLAGS.clients,
        "requests_per_client": FLAGS.requests_per_client,
        "batch_size": FLAGS.batch_size,
        "batched_requests_per_client": FLAGS.batched_requests_per_client,
        "max_seconds": FLAGS.max_seconds,
        "enable_batching": FLAGS.enable_batching,
        "input": f"256x192 JPEG bytes via {SIGNATURE}",
    }


def device_line():
    return (f"CPU ({os.cpu_count()} cores, shared), "
            f"{platform.processor() or platform.machine()}")


def summarise(measured, image_size, wall):
    """The result JSON of a full run (see the module docstring)."""
    single, batched = measured["single"], measured["batched"]
    inproc_single = measured["inproc_single"]
    inproc_batched = measured["inproc_batched"]
    result = {
        "errors": single["errors"] + batched["errors"],
        "p50_ms": single["p50_ms"],
        "p99_ms": single["p99_ms"],
        "images_per_s": batched["images_per_s"],
        "served_over_inprocess": round(
            batched["images_per_s"] / inproc_batched, 3
        ),
        "single": single,
        "batched": batched,
        "inprocess_images_per_s": {
            "batch_1": round(inproc_single, 2),
            f"batch_{FLAGS.batch_size}": round(inproc_batched, 2),
        },
        "single_served_over_inprocess_batch_1": round(
            single["images_per_s"] / inproc_single, 3
        ),
        "config": run_config(image_size),
        "mixed": measured["mixed"],
        "git_sha": provenance.git_sha(),
        "tensorflow_version": tf.__version__,
        "device": device_line(),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    comparison = measured["comparison"]
    if comparison is not None:
        result["errors"] += sum(
            comparison[kind][api]["errors"]
            for kind in ("single", "batch")
            for api in ("grpc", "rest")
        )
        result["rest_over_grpc_batch"] = comparison["rest_over_grpc_batch"]
        result["rest_over_grpc_single"] = comparison["rest_over_grpc_single"]
        result["rest_vs_grpc"] = comparison
        result["config"]["rest_leg_seconds"] = FLAGS.rest_leg_seconds
        result["config"]["rest_rounds"] = FLAGS.rest_rounds
    return result


def print_comparison(comparison):
    print("\n| REST vs gRPC | API | requests | images/s | p50 ms | "
          "p99 ms | errors |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind in ("single", "batch"):
        for api in ("grpc", "rest"):
            phase = comparison[kind][api]
            print(
                f"| {kind} | {api} | {phase['requests']} | "
                f"{phase['images_per_s']} | {phase['p50_ms']} | "
                f"{phase['p99_ms']} | {phase['errors']} |"
            )
    print(
        f"\nrest_over_grpc_batch = {comparison['rest_over_grpc_batch']}, "
        f"rest_over_grpc_single = {comparison['rest_over_grpc_single']}"
    )


def print_tables(result, image_size):
    """The Markdown tables of a full run."""
    inproc_batched = result["inprocess_images_per_s"][
        f"batch_{FLAGS.batch_size}"
    ]
    print(
        f"\n{FLAGS.backbone} @ {image_size}px, {FLAGS.code_length} bits, "
        f"{FLAGS.clients} clients\n"
    )
    print("| phase | requests | req/s | images/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, phase in (("single image", result["single"]), (
        f"{FLAGS.batch_size}-image batch", result["batched"]
    )):
        print(
            f"| {name} | {phase['requests']} | {phase['requests_per_s']} | "
            f"{phase['images_per_s']} | {phase['p50_ms']} | "
            f"{phase['p99_ms']} | {phase['errors']} |"
        )
    print(
        f"| in-process SavedModel, batch {FLAGS.batch_size} | | | "
        f"{inproc_batched:.2f} | | | |"
    )
    if "rest_vs_grpc" in result:
        print_comparison(result["rest_vs_grpc"])
    print(
        f"\nserved_over_inprocess = {result['served_over_inprocess']} "
        f"(wall {result['wall_s']} s) -> {FLAGS.out}"
    )
    if result["mixed"] is not None:
        print_mixed(result["mixed"])


def main(argv):
    del argv
    wall = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    image_size = FLAGS.image_size or (
        32 if FLAGS.backbone == "tiny" else 224
    )
    images = jpeg_images(max(64, FLAGS.batch_size))
    served = None
    with tempfile.TemporaryDirectory(prefix="uhga_bench_") as tmp:
        if FLAGS.model_base_path:
            base, path, metadata = existing_model(FLAGS.model_base_path)
            image_size = int(metadata["image_size"])
            served = model_record(path, metadata)
        else:
            base, path = export_model(tmp, image_size, images)
        if FLAGS.attacks_only:
            runs = attack_runs(base, tmp, images, load_signature(path))
            load = {"start": round(load_at_start, 2),
                    "end": round(os.getloadavg()[0], 2)}
            return write_attacks_only(runs, image_size, wall, served, load)
        if served is not None:
            raise app.UsageError(
                "--model_base_path is supported with --attacks_only only")
        if FLAGS.mixed_only:
            mixed = mixed_run(base, tmp, images, load_signature(path))
            return write_mixed_only(mixed, image_size, wall)
        measured = measure(base, path, tmp, images)
    result = summarise(measured, image_size, wall)
    write_result(result)
    print_tables(result, image_size)


def print_mixed(mixed):
    print("\n| mixed run | good requests | p99 good ms | failed good | "
          "peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    print(f"| all good | {mixed['all_good']['requests']['good']} | "
          f"{mixed['p99_all_good_ms']} | "
          f"{mixed['all_good']['failed_good_requests']} | "
          f"{mixed['peak_rss_mb_after_all_good']} |")
    print(f"| 1/10 bad, 1/100 bomb | {mixed['mixed']['requests']['good']} | "
          f"{mixed['p99_good_ms']} | {mixed['failed_good_requests']} | "
          f"{mixed['peak_rss_mb']} |")


def write_result(result):
    """Write `result` to --out atomically (keys in insertion order)."""
    io_utils.write_json_atomic(FLAGS.out, result, sort_keys=False)


def attack_runs(base, tmp, images, fn):
    """The `hostile` and `slowloris` runs on one batching gRPC+REST server."""
    import serving_attacks

    expected = reference_codes(fn, [[b] for b in images])
    proc, address, rest_port = start_server(base, tmp, enable_batching=True,
                                            rest=True)
    channel = grpc.insecure_channel(address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        stub.Predict(_request(np.array(images[:1], dtype=object)),
                     timeout=TIMEOUT)
        hostile = serving_attacks.hostile_run(
            stub, rest_port, proc.pid, images, expected,
            FLAGS.hostile_requests_per_client, FLAGS.clients, peak_rss_mb,
            percentiles_ms,
        )
        slowloris = serving_attacks.slowloris_run(
            rest_port, images[0], FLAGS.slowloris_connections,
            FLAGS.slowloris_seconds, FLAGS.slowloris_trickle_s,
            percentiles_ms,
        )
    finally:
        channel.close()
        child_process.stop(proc, grace_s=30)
    return {"hostile": hostile, "slowloris": slowloris}


def write_attacks_only(runs, image_size, wall, served=None, load=None):
    result = {}
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            result = json.load(f)
    for run in runs.values():
        if served is None:
            run["config"].update(backbone=FLAGS.backbone,
                                 image_size=image_size)
        else:
            run["config"].update(backbone=served["backbone"],
                                 image_size=image_size, model=served)
        run["command"] = " ".join(
            ["python", "benchmarks/serving.py", *sys.argv[1:]])
        run["git_sha"] = provenance.git_sha()
        run["tensorflow_version"] = tf.__version__
        run["device"] = result.get("device") or device_line()
        # The 1-minute load average of the whole machine (other jobs
        # included) before the hostile run and after the slowloris run.
        run["load_avg_1m"] = load
    runs["hostile"]["wall_s"] = round(time.perf_counter() - wall, 1)
    result.update(runs)
    write_result(result)
    hostile, slow = runs["hostile"], runs["slowloris"]
    print("\n| hostile | failed good | p99 good ms | p99 all-good ms | "
          "peak RSS MB | unanswered |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {hostile['attacks_sent']} attacks | "
          f"{hostile['failed_good_requests']} | {hostile['p99_good_ms']} | "
          f"{hostile['p99_all_good_ms']} | {hostile['peak_rss_mb']} | "
          f"{hostile['unanswered']} |")
    print("\n| slowloris | connections | legit success | legit p99 ms |")
    print("|---|---:|---:|---:|")
    print(f"| {slow['config']['seconds']} s | "
          f"{slow['config']['connections']} | "
          f"{slow['legit_success_rate']} | {slow['legit_p99_ms']} |")
    print(f"\n-> {FLAGS.out}")


def write_mixed_only(mixed, image_size, wall):
    result = {}
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            result = json.load(f)
    mixed["config"]["image_size"] = image_size
    mixed["git_sha"] = provenance.git_sha()
    mixed["wall_s"] = round(time.perf_counter() - wall, 1)
    result["mixed"] = mixed
    write_result(result)
    print_mixed(mixed)
    print(f"\n-> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
