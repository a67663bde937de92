"""One HTTP request to a test server on 127.0.0.1, shared by the REST and
search-page tests."""

import http.client
import json


def http_call(port, method, path, body=None, timeout=60):
    """Return (status, parsed JSON if the reply is JSON, else raw bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        connection.request(method, path, body=body)
        response = connection.getresponse()
        data = response.read()
        kind = response.getheader("Content-Type", "")
    finally:
        connection.close()
    if kind.startswith("application/json"):
        return response.status, json.loads(data)
    return response.status, data


def wait_for(condition, timeout=10.0, interval=0.02):
    """Poll `condition` until true (True) or `timeout` seconds (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False
