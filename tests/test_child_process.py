"""child_process: the announcement parsers, and start / wait / stop."""

import signal

import pytest

from uhga_tf import child_process


def test_page_url_waits_for_the_complete_line():
    assert child_process.page_url("") is None
    assert child_process.page_url("search page on http://127.0.0") is None
    assert child_process.page_url(
        "search page on http://127.0.0.1:8123/\n") == "http://127.0.0.1:8123/"


def test_server_announcements():
    grpc_line = "serving uhga on 127.0.0.1:5123\n"
    rest_line = "rest on 127.0.0.1:8501\n"
    assert child_process.grpc_address("serving uhga on 127.0.0.1:51") is None
    assert child_process.grpc_address(grpc_line) == "127.0.0.1:5123"
    assert child_process.grpc_address("starting\n" + grpc_line) is None
    assert child_process.rest_port(grpc_line) is None
    assert child_process.rest_port(grpc_line + "rest on 127.0.0.1:85") is None
    assert child_process.rest_port(grpc_line + rest_line) == 8501


def test_a_child_that_exits_raises_with_its_log(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    proc = child_process.start(["uhga_tf_no_such_module"], out, log)
    with pytest.raises(RuntimeError, match="No module named"):
        child_process.wait_for_output(proc, out, log, lambda t: t or None,
                                      timeout_s=60)
    assert proc.returncode == 1


def test_ready_then_stop_and_timeout_stops(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    proc = child_process.start(
        ["http.server", "0", "--bind", "127.0.0.1"], out, log,
        env={"PYTHONUNBUFFERED": "1"})
    line = child_process.wait_for_output(
        proc, out, log, lambda t: t if t.endswith("\n") else None,
        timeout_s=60)
    assert line.startswith("Serving HTTP on 127.0.0.1 port ")
    assert child_process.stop(proc) == -signal.SIGTERM

    proc = child_process.start(
        ["http.server", "0", "--bind", "127.0.0.1"], out, log)
    with pytest.raises(RuntimeError, match="not ready in 0.5 s"):
        child_process.wait_for_output(proc, out, log, lambda t: None,
                                      timeout_s=0.5)
    assert proc.returncode == -signal.SIGTERM
