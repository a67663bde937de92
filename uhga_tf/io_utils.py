"""Small helpers every layer shares: atomic files and folders, JSON of numpy
values, TF error lines.

A file the project writes (results, configs, caches, plots, saved hashers)
is written next to its target under a temporary name, flushed to disk and
renamed into place, so a reader, a resumed run or a kill mid-write never
sees half a file. A folder (a SavedModel version, an index, a split) is
written the same way with `atomic_directory`.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

# TF reports a failed file operation as "<path>; <strerror>" (its IOError)
# under a status code of its own choosing (ENOSPC: RESOURCE_EXHAUSTED,
# EFBIG: OUT_OF_RANGE), wrapped in "{{function_node ...}}" and "[Op:...]".
_TF_WRAPPER_RE = re.compile(r"^\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\]$")
_TF_FILE_ERROR_RE = re.compile(r"^(?P<path>.+); (?P<reason>[^;]+)$")
_TF_ERRNOS = {
    os.strerror(number): number
    for number in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                   errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                   errno.EDQUOT, errno.EFBIG, errno.EIO)
}
# A failed write() names no file; these say the file system refused it.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# TF's own temporary names: a sharded checkpoint is written under
# `<prefix>_temp*/part-*` before it is merged, a file as
# `<name>.tempstate<digits>` before it is renamed.
_TF_TEMP_DIR_RE = re.compile(r"_temp(_[0-9a-f]+)?/part-\d+-of-\d+[^/]*$")
_TF_TEMP_FILE_RE = re.compile(r"\.tempstate\d+$")


def tf_file_error(error):
    """(errno, strerror, path) of a TF op error about a file, else None.

    The path is the one the caller asked TF to write: TF's temporary names
    are mapped back to it (`ckpt-6_temp/part-00000-of-00001...` ->
    `ckpt-6`, `x.tempstate123` -> `x`).
    """
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(error, tf.errors.OpError):
        return None
    lines = [x for x in str(error.message).splitlines() if x.strip()]
    if not lines:
        return None
    match = _TF_FILE_ERROR_RE.match(
        _TF_WRAPPER_RE.sub("", lines[-1].strip()))
    if match is None or match.group("reason") not in _TF_ERRNOS:
        return None
    path = _TF_TEMP_FILE_RE.sub("", match.group("path").strip())
    path = _TF_TEMP_DIR_RE.sub("", path)
    reason = match.group("reason")
    return _TF_ERRNOS[reason], reason, path


def _inside(path, folder):
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder + os.sep)


def _naming_target(error, tmp, target):
    """`error` naming `target` when it names `tmp` (or nothing), else None.

    A failed write under a temporary name (a full disk, a file-size
    limit) is reported for the path the caller asked for: the temporary
    one is removed before anyone reads the message.
    """
    if isinstance(error, OSError):
        if (error.filename is None and error.errno in _WRITE_ERRNOS) or (
                error.filename is not None and _inside(error.filename, tmp)):
            error.filename = target
        return None
    found = tf_file_error(error)
    if found is None or not _inside(found[2], tmp):
        return None
    return OSError(found[0], found[1], target)


@contextlib.contextmanager
def _errors_naming(tmp, target):
    """Re-raise what fails under `tmp` as naming `target` (_naming_target)."""
    try:
        yield
    except Exception as e:
        renamed = _naming_target(e, tmp, target)
        if renamed is not None:
            raise renamed from e
        raise


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
        with _errors_naming(tmp, path):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(path, prefix=None, merge=False):
    """Yield a new folder beside `path`; move it to `path` on success.

    When `path` does not exist the folder is renamed into place: one
    rename, so a reader sees all of it or nothing. A rename cannot replace
    a folder that holds files, so when `path` exists:
    - `merge=True` moves each file in with `os.replace` (each file atomic;
      other files in `path`, e.g. a lock file, stay);
    - otherwise the rename raises OSError, and the caller decides (refuse,
      or read what another process stored first).
    On any exception the temporary folder is removed and `path` is left as
    it was.

    Args:
        prefix: the temporary folder's name prefix (default
            `.<name>.tmp-`); a poller that skips a prefix passes its own.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(
        prefix=prefix or f".{os.path.basename(path)}.tmp-", dir=parent
    )
    # mkdtemp makes 0700; the folder gets the mode a plain mkdir gives.
    os.chmod(tmp, 0o777 & ~umask())
    try:
        with _errors_naming(tmp, path):
            yield tmp
            if merge and os.path.isdir(path):
                for name in sorted(os.listdir(tmp)):
                    os.replace(os.path.join(tmp, name),
                               os.path.join(path, name))
            else:
                os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def umask():
    """The process umask (set and restored at once: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
