"""The `hostile` and `slowloris` runs of `benchmarks/serving.py` (issue 18).

hostile: FLAGS.clients good clients (half REST, half gRPC) send
`per_client` single-image requests, first alone (all good), then while a
ninth client sends one guard-bypass attempt per second in turn: a JPEG of
8000x8000 with junk before its SOF marker, a GIF whose one frame of
6000x6000 hides behind a 10x10 canvas, an animated GIF of 8 frames of
1500x1500, a gRPC
`encode_images` tensor declaring [1, 20000, 20000, 3] with one value, and
JSON nested 100000 deep. Reported: failed good requests, p99 of good
requests in both phases, the server's peak RSS (VmHWM) and the attempts
that got no answer (a dropped connection or a 5xx).

slowloris: `connections` attacker sockets (half idle after connecting,
half trickling one header byte every `trickle_s` seconds, each reopened as
soon as the server closes it) while one client makes a REST request every
second for `seconds`: its success rate and p99.

All traffic goes to 127.0.0.1.
"""

import base64
import http.client
import json
import os
import socket
import sys
import threading
import time

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from uhga_tf.saved_model import wire_names

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
)
import hostile_inputs  # noqa: E402 - the catalogue's hostile bytes

TIMEOUT = 60.0
MODEL = wire_names.DEFAULT_MODEL_NAME


def rest_predict(port, encoded, connection=None):
    """One REST predict of `encoded` images; return (status, body bytes)."""
    body = json.dumps({"instances": [
        {"b64": base64.b64encode(b).decode("ascii")} for b in encoded
    ]})
    return rest_raw(port, body.encode(), connection)


def rest_raw(port, body, connection=None):
    own = connection is None
    connection = connection or http.client.HTTPConnection(
        "127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("POST", f"/v1/models/{MODEL}:predict", body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        if own:
            connection.close()


def attacks():
    """[(name, api, payload)]: the guard-bypass attempts, built once."""
    return [
        ("junk-before-SOF JPEG 8000x8000", "grpc",
         hostile_inputs.jpeg_with_junk_before_sof(8000, 8000)),
        ("GIF frame 6000x6000 on a 10x10 canvas", "rest",
         hostile_inputs.gif_frame_over_canvas((10, 10), (6000, 6000))),
        ("animated GIF 1500x1500 x 8", "grpc",
         hostile_inputs.animated_gif(1500, 1500, 8)),
        ("tensor declaring [1, 20000, 20000, 3]", "grpc",
         hostile_inputs.over_declared_request((1, 20000, 20000, 3))),
        ("JSON nested 100000 deep", "rest-raw", b"[" * 100_000),
    ]


def _attack_once(attack, stub, rest_port):
    """Send one attempt; return None if refused with a 4xx, else why not."""
    name, api, payload = attack
    try:
        if api == "grpc":
            request = payload
            if isinstance(payload, bytes):
                request = predict_pb2.PredictRequest()
                request.model_spec.name = MODEL
                request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(
                    np.array([payload], dtype=object)))
            stub.Predict(request, timeout=TIMEOUT)
            return f"{name}: answered OK"
        if api == "rest":
            status, _ = rest_predict(rest_port, [payload])
        else:
            status, _ = rest_raw(rest_port, payload)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return None
        return f"{name}: {e.code().name}"
    except (OSError, http.client.HTTPException) as e:
        return f"{name}: no answer ({type(e).__name__})"
    return None if 400 <= status < 500 else f"{name}: HTTP {status}"


def good_phase(stub, rest_port, goods, expected, per_client, clients,
               stop_attacks=None):
    """Good clients (even: gRPC, odd: REST); return latencies and failures."""
    latencies, failed = [], []
    lock = threading.Lock()

    def worker(i):
        connection = http.client.HTTPConnection("127.0.0.1", rest_port,
                                                timeout=TIMEOUT)
        mine = []
        for j in range(per_client):
            k = (i * per_client + j) % len(goods)
            start = time.perf_counter()
            try:
                if i % 2 == 0:
                    request = predict_pb2.PredictRequest()
                    request.model_spec.name = MODEL
                    request.inputs["image_bytes"].CopyFrom(
                        tf.make_tensor_proto(np.array([goods[k]],
                                                      dtype=object)))
                    response = stub.Predict(request, timeout=TIMEOUT)
                    codes = tf.make_ndarray(response.outputs["codes"])
                else:
                    status, body = rest_predict(rest_port, [goods[k]],
                                                connection)
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}: {body[:200]}")
                    codes = np.array(json.loads(body)["predictions"][0]
                                     ["codes"], np.int8)[None]
            except (grpc.RpcError, RuntimeError, OSError,
                    http.client.HTTPException) as e:
                with lock:
                    failed.append(str(e)[:200])
                connection.close()
                continue
            mine.append(time.perf_counter() - start)
            if not np.array_equal(codes, expected[k]):
                with lock:
                    failed.append(f"request {k}: codes differ")
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,))
               for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if stop_attacks is not None:
        stop_attacks.set()
    return latencies, failed, time.perf_counter() - start


def hostile_run(stub, rest_port, pid, goods, expected, per_client, clients,
                peak_rss_mb, percentiles_ms):
    """The all-good phase, then the same with one attack per second."""
    plan = attacks()
    good_phase(stub, rest_port, goods, expected, 20, clients)  # warm-up
    all_good, failed_all_good, _ = good_phase(
        stub, rest_port, goods, expected, per_client, clients)
    rss_all_good = peak_rss_mb(pid)
    stop = threading.Event()
    unanswered, sent = [], []

    def attacker():
        i = 0
        while not stop.is_set():
            attack = plan[i % len(plan)]
            why = _attack_once(attack, stub, rest_port)
            sent.append(attack[0])
            if why is not None:
                unanswered.append(why)
            i += 1
            stop.wait(1.0)

    thread = threading.Thread(target=attacker)
    thread.start()
    hostile, failed, seconds = good_phase(
        stub, rest_port, goods, expected, per_client, clients, stop)
    thread.join()
    p99 = percentiles_ms(hostile, "_good_ms")["p99_good_ms"]
    p99_all = percentiles_ms(all_good, "_good_ms")["p99_good_ms"]
    return {
        "failed_good_requests": len(failed) + len(failed_all_good),
        "p99_good_ms": p99,
        "p99_all_good_ms": p99_all,
        "p99_ratio": round(p99 / p99_all, 3),
        "peak_rss_mb": peak_rss_mb(pid),
        "peak_rss_mb_after_all_good": rss_all_good,
        "unanswered": len(unanswered),
        "attacks_sent": len(sent),
        "good_requests": len(hostile),
        "seconds": round(seconds, 1),
        "first_errors": (failed + unanswered)[:3],
        "config": {
            "clients": clients, "requests_per_client": per_client,
            "good": "one 256x192 JPEG; even clients gRPC, odd REST",
            "attacks": [name for name, _, _ in plan],
        },
    }


# slowloris ---------------------------------------------------------------


class _Attackers:
    """`n` sockets to 127.0.0.1:port, idle or trickling, reopened when shut."""

    def __init__(self, port, n, trickle_s):
        self.port, self.n, self.trickle_s = port, n, trickle_s
        self.socks = [None] * n
        self.due = [0.0] * n
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i):
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), 5.0)
            if i % 2:  # trickler: a request line, then a header, slowly
                sock.sendall(f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\n"
                             "X-a: ".encode())
            sock.setblocking(False)
        except OSError:
            sock = None
        self.socks[i] = sock
        self.due[i] = time.monotonic() + self.trickle_s

    def _alive(self, sock):
        try:
            return sock.recv(4096) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def _run(self):
        for i in range(self.n):
            self._open(i)
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for i, sock in enumerate(self.socks):
                if sock is None or not self._alive(sock):
                    if sock is not None:
                        sock.close()
                    self._open(i)
                    self.reopened += 1
                elif i % 2 and now >= self.due[i]:
                    try:
                        sock.send(b"a")
                    except OSError:
                        pass
                    self.due[i] = now + self.trickle_s
        for sock in self.socks:
            if sock is not None:
                sock.close()

    def __enter__(self):
        self._thread.start()
        time.sleep(2.0)  # all connected before the client starts
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def slowloris_run(rest_port, good, connections, seconds, trickle_s,
                  percentiles_ms):
    """One client, one request a second, under `connections` attackers."""
    latencies, failures = [], []
    with _Attackers(rest_port, connections, trickle_s) as attackers:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            tick = time.monotonic()
            try:
                status, body = rest_predict(rest_port, [good])
                if status == 200:
                    latencies.append(time.monotonic() - tick)
                else:
                    failures.append(f"HTTP {status}: {body[:120]!r}")
            except (OSError, http.client.HTTPException) as e:
                failures.append(f"{type(e).__name__}: {e}")
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        reopened = attackers.reopened
    total = len(latencies) + len(failures)
    return {
        "legit_success_rate": round(len(latencies) / max(1, total), 4),
        "legit_p99_ms": percentiles_ms(latencies)["p99_ms"],
        "legit_p50_ms": percentiles_ms(latencies)["p50_ms"],
        "legit_requests": total,
        "attacker_connections_reopened": reopened,
        "first_errors": failures[:3],
        "config": {"connections": connections, "seconds": seconds,
                   "trickle_s": trickle_s,
                   "attackers": "half idle, half trickling a header"},
    }
