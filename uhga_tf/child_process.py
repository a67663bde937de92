"""Start the package's own commands as child processes, wait, stop them.

Tests, benchmarks and the docs' screenshot script run `uhga_tf.serve` or
`uhga_tf.search_page` on port 0 and learn where it listens from the line it
prints once it serves. This module is that one start / wait / stop sequence,
so a change to how a command announces itself is made in one place.
"""

import os
import signal
import subprocess
import sys
import time


def start(module_args, out_path, log_path, cwd=None, env=None):
    """`python -m *module_args`, stdout to `out_path`, stderr to `log_path`."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    with open(out_path, "wb") as out, open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", *module_args],
            cwd=cwd, env=env, stdout=out, stderr=log)


def log_tail(log_path, chars=3000):
    with open(log_path, "rb") as f:
        return f.read().decode(errors="replace")[-chars:]


def wait_for_output(proc, out_path, log_path, ready, timeout_s,
                    poll_s=0.1):
    """Poll the child's stdout until `ready(text)` is not None; return it.

    Raises RuntimeError with the tail of the child's log if it exits first
    or nothing is ready within `timeout_s`; the child is stopped whenever
    this raises, so a failed start never leaves a server behind.
    """
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{proc.args[2]} exited with {proc.returncode}: "
                    f"{log_tail(log_path)}")
            with open(out_path) as f:
                found = ready(f.read())
            if found is not None:
                return found
            time.sleep(poll_s)
        raise RuntimeError(
            f"{proc.args[2]} was not ready in {timeout_s} s: "
            f"{log_tail(log_path)}")
    except BaseException:
        stop(proc)
        raise


def stop(proc, grace_s=20):
    """SIGTERM, SIGKILL after `grace_s`; return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def page_url(text):
    """The search page's URL once its first line is complete, else None."""
    return text.split()[-1] if text.endswith("\n") else None


def grpc_address(text):
    """'127.0.0.1:<port>' from the server's `serving ...:<port>` line."""
    line = text.split("\n", 1)[0]
    if line.startswith("serving ") and "\n" in text:
        return "127.0.0.1:" + line.strip().rsplit(":", 1)[1]
    return None


def rest_port(text):
    """The REST port from the server's `rest ...:<port>` line, else None."""
    for line in text.splitlines(keepends=True):
        if line.startswith("rest ") and line.endswith("\n"):
            return int(line.strip().rsplit(":", 1)[1])
    return None
