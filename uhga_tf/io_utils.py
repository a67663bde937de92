"""Small helpers every layer shares: atomic files, JSON of numpy values, TF
error lines.

A file the project writes (results, configs, caches, plots, saved hashers)
is written next to its target under a temporary name, flushed to disk and
renamed into place, so a reader, a resumed run or a kill mid-write never
sees half a file.
"""

import contextlib
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a temporary path next to `path`; rename it into place on success.

    `suffix` keeps the extension a writer insists on (`np.savez` adds
    `.npz`, Keras wants `.keras`, matplotlib infers the format). On any
    exception the temporary file is removed and `path` is left untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=directory,
        prefix="." + os.path.basename(path) + ".",
        suffix=".tmp" + suffix,
    )
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(path, data):
    """Write `data` (bytes) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json_atomic(path, payload, indent=2, sort_keys=True):
    """Write `payload` as JSON to `path` atomically; numpy values allowed."""
    text = json.dumps(
        payload, indent=indent, sort_keys=sort_keys, default=to_builtin
    )
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def to_builtin(value):
    """`json.dumps(default=...)`: numpy scalars/arrays and paths as builtins.

    Raises:
        TypeError: for anything else, as `json` expects of a default.
    """
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def tf_error_line(error):
    """The meaningful line of a TF op error, without graph boilerplate.

    TF wraps an op's message in "Graph execution error:", "Detected at node"
    and "[[{{node ...}}]]" lines; a user needs the op's own sentence.
    """
    lines = [
        line.strip()
        for line in str(getattr(error, "message", error)).splitlines()
    ]
    useful = [
        line
        for line in lines
        if line
        and not line.startswith("[[")
        and not line.startswith("Graph execution error")
        and not line.startswith("Detected at node")
        and not line.startswith("<stack traces")
    ]
    line = useful[-1] if useful else next(
        (x for x in reversed(lines) if x), type(error).__name__
    )
    cut = line.find(" [[")
    if cut > 0:
        line = line[:cut]
    return line.strip()
