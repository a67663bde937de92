"""The HTTP connection layer: caps that slow or idle clients cannot hold.

Every server binds 127.0.0.1 with a small cap and short deadlines, so the
attacks are a handful of sockets and each test ends within seconds.
"""

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest

from uhga_tf.serving import http_server

TIMEOUT = 10.0


class Hello(http_server.BoundedHandler):
    """GET answers "ok"; GET /wait blocks until `release` is set."""

    release = threading.Event()

    def do_GET(self):  # noqa: N802 - stdlib name
        self.mark_busy()
        if self.path == "/wait":
            self.release.wait(TIMEOUT)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self):  # noqa: N802 - stdlib name
        try:
            length = http_server.body_length(self.headers, 1000)
        except http_server.FramingError as e:
            self.close_connection = True
            self.send_error(e.status, e.message)
            return
        body = self.read_body(length)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        del args


@contextlib.contextmanager
def serving(**kwargs):
    httpd = http_server.BoundedHTTPServer(("127.0.0.1", 0), Hello, **kwargs)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
        daemon=True,
    )
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        Hello.release.set()
        http_server.stop_background(httpd, thread)
        Hello.release.clear()


def get(port, path="/", connection=None):
    """(status, body) of one GET; a fresh connection unless given."""
    own = connection is None
    connection = connection or http.client.HTTPConnection(
        "127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        if own:
            connection.close()


def closed_within(sock, seconds):
    """True when the server closes `sock` (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(1024):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_idle_keep_alive_connections_yield_to_new_ones():
    """issue 18 item 2: 70 idle keep-alive connections held every slot and
    everyone else got 503; now the longest-idle one is closed instead."""
    with serving(max_connections=2) as port:
        idle = [http.client.HTTPConnection("127.0.0.1", port,
                                           timeout=TIMEOUT)
                for _ in range(2)]
        for connection in idle:
            assert get(port, connection=connection) == (200, b"ok")
            time.sleep(0.05)  # idle[0] has waited longest
        assert get(port) == (200, b"ok")
        assert closed_within(idle[0].sock, 2.0)
        assert get(port, connection=idle[1]) == (200, b"ok")
        for connection in idle:
            connection.close()


def test_running_requests_are_never_evicted():
    """Only when every connection runs a request is a newcomer 503."""
    with serving(max_connections=2) as port:
        results = []
        workers = [threading.Thread(target=lambda: results.append(
            get(port, "/wait"))) for _ in range(2)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        status, body = get(port)
        assert status == 503
        assert "all running requests" in json.loads(body)["error"]
        Hello.release.set()
        for worker in workers:
            worker.join(TIMEOUT)
        assert results == [(200, b"ok")] * 2


def test_trickling_request_meets_a_total_deadline():
    """issue 18 item 2: one header byte every 20 s kept a connection for
    ever (the timeout was per read); now the request has 1 s in all."""
    with serving(read_deadline_s=1.0, idle_timeout_s=30.0) as port:
        sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        start = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\n")
        closed = False
        for _ in range(10):
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            if closed_within(sock, 0.3):
                closed = True
                break
        sock.close()
        assert closed
        assert 0.9 < time.monotonic() - start < 2.5


def test_trickling_and_idle_flood_does_not_lock_out_a_client():
    """issue 18 item 2, small: 24 attackers on 8 slots, 5 good requests."""
    with serving(max_connections=8, read_deadline_s=30.0) as port:
        attackers = []
        for i in range(24):
            sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
            if i % 2:
                sock.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
            attackers.append(sock)
        time.sleep(0.2)
        try:
            assert [get(port) for _ in range(5)] == [(200, b"ok")] * 5
        finally:
            for sock in attackers:
                sock.close()


@pytest.mark.parametrize("headers,status", [
    ("Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", 400),
    ("Content-Length: 2\r\nContent-Length: 3\r\n", 400),
    ("Content-Length: \u00b2\r\n", 411),
    ("Content-Length: \u00b3\u00b9\r\n", 411),
    ("Content-Length: \u0661\r\n", 411),
    ("Content-Length: 1001\r\n", 413),
])
def test_ambiguous_or_malformed_framing_is_refused(headers, status):
    """issue 18 items 3-4: never answered by Content-Length alone."""
    with serving() as port:
        sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        # Latin-1 as http.server decodes it: b"\xb2" arrives as "²".
        text = "POST / HTTP/1.1\r\nHost: x\r\n" + headers + "\r\nok"
        try:
            sock.sendall(text.encode("latin-1"))
        except UnicodeEncodeError:
            sock.sendall(text.encode("utf-8"))
        reply = sock.recv(4096)
        sock.close()
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply


def test_parse_int_takes_ascii_digits_in_range():
    assert http_server.parse_int("12", 100) == 12
    assert http_server.parse_int("101", 100) is None
    for text in ("\u00b2", "\u0661", "+1", " 1", "", "1e3", None):
        assert http_server.parse_int(text, 100) is None, text
