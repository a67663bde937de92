"""The one error path of every entry point (train, evaluate, reproduce,
export, serve, encode, index, search, search_page), and the notice of a
deprecated spelling.

A user error (a bad value, a missing, unwritable or wrong-kind path, a
corrupt file) ends the command with one stderr line

    uhga_tf.<cmd>: <what> (<path or flag>): <what was expected>

and exit status 1; outputs the command created are removed first, so nothing
half-written stays behind. Anything else is a bug and keeps its traceback.

    def main(argv): ...
    if __name__ == "__main__":
        cli_errors.app_run("export", main, outputs=lambda: [FLAGS.out])
"""

import errno
import os
import pickle
import shutil
import sys

from absl import app
from absl import flags

from uhga_tf import io_utils

# What the user should give instead, per OSError errno.
_EXPECTED = {
    errno.ENOENT: "an existing path",
    errno.ENOTDIR: "a folder, but a file lies on the way",
    errno.EISDIR: "a file, not a folder",
    errno.EEXIST: "a path that does not exist yet",
    errno.EACCES: "a path this user may read and write",
    errno.EPERM: "a path this user may read and write",
    errno.EROFS: "a writable file system",
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free disk quota",
    errno.EFBIG: "a file size within this process's limit (ulimit -f)",
    errno.EADDRINUSE: "a free port",
}


def _tf_user_errors():
    """TF's file and data errors, when TensorFlow is already imported."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return ()
    errors = tf.errors
    return (
        errors.NotFoundError,
        errors.DataLossError,
        errors.PermissionDeniedError,
        errors.AlreadyExistsError,
        errors.InvalidArgumentError,
        errors.FailedPreconditionError,
        # A full disk under --workdir or --export_dir ("No space left on
        # device"), or a batch that does not fit in memory.
        errors.ResourceExhaustedError,
    )


def _protobuf_errors():
    try:
        from google.protobuf import message
    except ImportError:  # pragma: no cover - protobuf ships with TF
        return ()
    return (message.DecodeError,)


def is_user_error(error):
    """A user error (one line, exit 1) rather than a bug (traceback)."""
    return (isinstance(error, user_error_types())
            or io_utils.tf_file_error(error) is not None)


def user_error_types():
    """The exception types treated as user errors (not bugs)."""
    return (
        ValueError,  # includes UnicodeDecodeError and JSONDecodeError
        OSError,
        EOFError,
        pickle.UnpicklingError,
        *_protobuf_errors(),
        *_tf_user_errors(),
    )


def describe(error):
    """One line for a user error, without the command prefix."""
    if isinstance(error, OSError) and error.filename is not None:
        what = error.strerror or type(error).__name__
        expected = _EXPECTED.get(error.errno, "a usable path")
        return f"{what} ({error.filename}): expected {expected}"
    if isinstance(error, UnicodeDecodeError):
        return f"not a text file ({error.reason}): expected UTF-8 text"
    file_error = io_utils.tf_file_error(error)
    if file_error is not None:
        number, reason, path = file_error
        expected = _EXPECTED.get(number, "a usable path")
        return f"{reason} ({path}): expected {expected}"
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(error, tf.errors.OpError):
        lines = [x for x in str(error.message).splitlines() if x.strip()]
        return lines[-1].strip() if lines else type(error).__name__
    text = str(error).strip() or type(error).__name__
    if not isinstance(error, (ValueError, OSError)):
        text = f"{type(error).__name__}: {text}"
    return " ".join(text.split())


def _existing(paths):
    return {p for p in paths if p and os.path.lexists(p)}


def _remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError:
        pass


def run(verb, fn, *args, outputs=(), **kwargs):
    """Run fn; a user error becomes one stderr line and exit status 1.

    Args:
        verb: the command name (`uhga_tf.<verb>: ...`).
        fn: the command's work.
        outputs: paths the command may create; those that did not exist
            before and exist after a user error are removed.
    """
    outputs = [os.path.abspath(p) for p in outputs if p]
    before = _existing(outputs)
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # bugs are re-raised unchanged below
        if not is_user_error(e):
            raise
        for path in sorted(set(_existing(outputs)) - before, reverse=True):
            _remove(path)
        sys.exit(f"uhga_tf.{verb}: {describe(e)}")


def _flags_parser(verb):
    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            sys.exit(f"uhga_tf.{verb}: {e}: see --helpfull")
        except user_error_types() as e:  # e.g. a binary --flagfile
            flagfiles = [
                arg.split("=", 1)[1]
                for arg in argv[1:]
                if arg.startswith(("--flagfile=", "-flagfile="))
            ]
            where = ", ".join(flagfiles) or "command line"
            if isinstance(e, UnicodeDecodeError):
                reason = "expected a UTF-8 text flag file"
            else:
                reason = f"expected readable flags ({describe(e)})"
            sys.exit(f"uhga_tf.{verb}: cannot read the flags ({where}): "
                     f"{reason}")

    return parse


def app_run(verb, main, outputs=None):
    """`absl.app.run(main)` with the shared error path around it.

    Args:
        verb: the command name.
        main: the absl main(argv).
        outputs: optional callable returning the paths the command may
            create (called after flag parsing).
    """

    def wrapped(argv):
        paths = outputs() if outputs is not None else ()
        return run(verb, main, argv, outputs=paths)

    app.run(wrapped, flags_parser=_flags_parser(verb))


def forward_deprecated(old, new_verb, args):
    """Run `python -m uhga_tf.<new_verb> ARGS` after a one-line notice.

    An old command spelling keeps working for one release. exec, not a
    child process: the process id stays, so a supervisor's SIGTERM still
    reaches the command, and the exit status is the command's own.
    """
    sys.stderr.write(
        f"uhga_tf: `{old}` is deprecated and goes in the next release; "
        f"use `python -m uhga_tf.{new_verb}` (same flags)\n"
    )
    sys.stderr.flush()
    sys.stdout.flush()
    os.execv(sys.executable,
             [sys.executable, "-m", f"uhga_tf.{new_verb}", *args])
