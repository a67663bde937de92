"""The HTTP connection layer of the REST API and the search page.

`BoundedHTTPServer` is the standard library's `ThreadingHTTPServer` (a
thread per connection suits the blocking TensorFlow calls and needs no new
dependency) with what it lacks against slow or idle clients:

- at most `max_connections` connections; when all are taken, the one that
  has waited longest without a complete request (an idle keep-alive
  connection, or one still trickling its request) is closed to make room
  for the newcomer, and only when every connection is running a request
  does a newcomer get 503;
- a total deadline per request: a connection that has not delivered its
  request line, headers and body within `read_deadline_s` of the request
  line, or that stays idle longer than `idle_timeout_s` overall, is closed
  (the socket timeout alone bounds each read, not the request);
- `body_length` refuses ambiguous framing (Content-Length together with
  Transfer-Encoding, or two different Content-Lengths: request smuggling
  behind a proxy) and lengths that are not ASCII digits.

Handlers derive from `BoundedHandler`, which reports each connection's
phase (idle, reading, busy) to the server. A maintained asynchronous server
(e.g. uvicorn/h11) provides the same, but would put an event loop and a
new dependency in front of blocking TensorFlow calls for no gain here.
"""

import http.server
import json
import re
import socket
import threading
import time

from absl import logging

MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 60.0
READ_DEADLINE_S = 30.0
_ASCII_DIGITS = re.compile(r"[0-9]{1,19}")
_IDLE, _READING, _BUSY = "idle", "reading", "busy"


def parse_int(text, largest):
    """ASCII decimal digits -> int in [0, largest], else None.

    `str.isdigit` accepts "²" and other digits `int` refuses (or reads),
    so paths and headers are matched against [0-9] only.
    """
    if text is None or not _ASCII_DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if value <= largest else None


class FramingError(Exception):
    """A request whose body length cannot be known safely (HTTP status)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def body_length(headers, limit, what="request body"):
    """The body length a request declares, refusing ambiguous framing.

    Raises:
        FramingError: 400 ambiguous, 411 missing or malformed, 413 over
            `limit`.
    """
    lengths = headers.get_all("Content-Length") or []
    if headers.get("Transfer-Encoding") is not None and lengths:
        raise FramingError(
            400, "a request must not carry both Content-Length and "
            "Transfer-Encoding"
        )
    if len(set(lengths)) > 1:
        raise FramingError(
            400, f"conflicting Content-Length headers {lengths}"
        )
    length = parse_int(lengths[0].strip(), 2**63) if lengths else None
    if length is None:
        raise FramingError(
            411, "a Content-Length header of ASCII digits is required"
        )
    if length > limit:
        raise FramingError(
            413, f"{what} of {length} bytes is over the limit of {limit} "
            "bytes"
        )
    return length


class BoundedHTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most `max_connections`, none monopolised.

    See the module docstring for the eviction and deadline rules.
    """

    daemon_threads = True
    # socketserver's default backlog of 5 drops the SYNs of a burst of
    # connections (an attack, or many clients at once), and a dropped SYN
    # is retried only after a second.
    request_queue_size = 128

    def __init__(self, address, handler, max_connections=MAX_CONNECTIONS,
                 read_deadline_s=READ_DEADLINE_S,
                 idle_timeout_s=IDLE_TIMEOUT_S):
        self.max_connections = max_connections
        self.read_deadline_s = read_deadline_s
        self.idle_timeout_s = idle_timeout_s
        # socket -> [phase, since] for every connection holding a slot; an
        # evicted one leaves at once (its thread ends on its own), so the
        # accept loop never waits for it.
        self._phases = {}
        self._phases_lock = threading.Lock()
        super().__init__(address, handler)

    def set_phase(self, sock, phase):
        """Record that `sock` is idle, reading a request, or running one."""
        with self._phases_lock:
            if sock in self._phases:
                self._phases[sock] = [phase, time.monotonic()]

    def _take_slot(self, request):
        """Give `request` a slot, evicting the longest-waiting idle or
        reading connection if all are taken; False if all run requests."""
        victim = None
        with self._phases_lock:
            if len(self._phases) >= self.max_connections:
                waiting = [
                    (since, sock)
                    for sock, (phase, since) in self._phases.items()
                    if phase != _BUSY
                ]
                if not waiting:
                    return False
                _, victim = min(waiting, key=lambda item: item[0])
                del self._phases[victim]
            self._phases[request] = [_IDLE, time.monotonic()]
        if victim is not None:
            self._close(victim, "evicted for a new connection")
        return True

    def _close(self, sock, why):
        with self._phases_lock:
            self._phases.pop(sock, None)
        logging.vlog(1, "HTTP connection closed: %s", why)
        try:
            # Wakes the handler thread blocked in recv (it reads EOF).
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone

    def service_actions(self):
        """Close connections past their idle timeout or read deadline."""
        now = time.monotonic()
        with self._phases_lock:
            expired = [
                sock for sock, (phase, since) in self._phases.items()
                if (phase == _IDLE and now - since > self.idle_timeout_s)
                or (phase == _READING and now - since > self.read_deadline_s)
            ]
        for sock in expired:
            self._close(sock, "request not received in time")

    def process_request(self, request, client_address):
        if not self._take_slot(request):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def _refuse(self, request):
        body = json.dumps({
            "error": f"over {self.max_connections} open connections, all "
            "running requests; retry later"
        }).encode()
        try:
            request.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\n"
                b"Content-Type: application/json\r\n"
                b"Connection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        except OSError:
            pass  # the client is gone; nothing to tell it
        self.shutdown_request(request)

    def _release(self, request):
        with self._phases_lock:
            self._phases.pop(request, None)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def handle_error(self, request, client_address):
        """A client that vanished (or was evicted) is not an error."""
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            logging.vlog(1, "HTTP client %s gone: %s", client_address, error)
            return
        logging.exception("HTTP connection from %s failed", client_address)


class BoundedHandler(http.server.BaseHTTPRequestHandler):
    """A keep-alive handler that reports its phase to `BoundedHTTPServer`.

    Subclasses read bodies with `read_body` and call `mark_busy` before a
    request that has no body runs.
    """

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    # Headers and body are separate writes: without TCP_NODELAY, Nagle's
    # algorithm holds the body until the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True

    def _phase(self, phase):
        set_phase = getattr(self.server, "set_phase", None)
        if set_phase is not None:
            set_phase(self.connection, phase)

    def handle_one_request(self):
        self._phase(_IDLE)
        super().handle_one_request()

    def parse_request(self):
        # The request line has arrived: headers and body are now due
        # within the server's read deadline.
        self._phase(_READING)
        return super().parse_request()

    def mark_busy(self):
        """The request is complete; it runs, and is never evicted."""
        self._phase(_BUSY)

    def read_body(self, length):
        """Read exactly `length` body bytes, then mark the request busy."""
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionAbortedError(
                f"body cut short at {len(data)} of {length} bytes"
            )
        self.mark_busy()
        return data


def serve_in_background(host, port, handler, thread_name):
    """Bind a `BoundedHTTPServer` and serve it on a daemon thread.

    Returns:
        (httpd, thread); `httpd.server_address[1]` is the bound port.

    Raises:
        ValueError: when (host, port) cannot be bound.
    """
    try:
        httpd = BoundedHTTPServer((host, port), handler)
    except OSError as e:
        raise ValueError(f"cannot bind {host}:{port}: {e}") from e
    thread = threading.Thread(
        target=httpd.serve_forever,
        kwargs={"poll_interval": 0.2},
        name=thread_name,
        daemon=True,
    )
    thread.start()
    return httpd, thread


def stop_background(httpd, thread):
    """Undo `serve_in_background`: stop serving, close, join the thread."""
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)
