"""A quiet console for the entry points.

By default a run shows its progress bar, the few INFO lines of ours listed
in `CONSOLE_LINES` and every warning. Our internal INFO lines (e.g. `MAP@k:
0 of 200 queries empty`), TensorFlow's C++ start-up chatter (written to
file descriptor 2 before absl's logging is initialised, so
`TF_CPP_MIN_LOG_LEVEL` cannot hide it) and other libraries' INFO lines
(e.g. one `functional_saver.py ... Sharding callback duration` per
checkpoint) are hidden. `--verbosity=N` (absl's flag) or `UHGA_VERBOSE=1`
shows everything again.

Usage, in an entry point's `main` after flag parsing:
    console.configure(verbose=console.verbose_requested(FLAGS))
"""

import logging as std_logging
import os
import re
import sys
import tempfile

from absl import logging

ENV_VAR = "UHGA_VERBOSE"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# C++ lines TensorFlow writes while it loads: absl's pre-init notice, INFO
# lines (oneDNN, "Could not find cuda drivers") and the failed CUDA probe of
# a machine without a GPU. Anything else on fd 2 is replayed.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I\d{4} [\d:.]+ +\d+ \S+\.cc:\d+\] "
    r"|E\d{4} [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] failed call to cuInit)"
)
# The only INFO lines of ours a quiet console shows, as (path under the
# package, message format prefix): the data/split line, the similarity
# fractions, progress (feature extraction, a resume), validation and final
# MAP. Every other INFO line is internal (MAP@k empty-query counts, cache
# and split files, the config dump, the cluster count, ...) and shows only
# in a verbose run; warnings always show.
CONSOLE_LINES = (
    ("data/retrieval_sets.py", "retrieval sets: "),
    ("training/run.py", "similarity matrix (%s): "),
    ("data/feature_cache.py", "Extracting "),
    ("training/run.py", "resuming from step "),
    ("training/callbacks.py", "epoch %d: validation MAP"),
    ("training/run.py", "final MAP "),
)


def verbose_requested(flag_values):
    """True when `--verbosity` was given or UHGA_VERBOSE is set (not 0)."""
    if os.environ.get(ENV_VAR, "0") not in ("", "0"):
        return True
    return "verbosity" in flag_values and flag_values["verbosity"].present


class _QuietFilter:
    """Keep warnings and the CONSOLE_LINES; drop every other line."""

    def filter(self, record):
        if record.levelno >= std_logging.WARNING:
            return True
        if not record.pathname.startswith(_PACKAGE_DIR):
            return False
        path = record.pathname[len(_PACKAGE_DIR):].replace(os.sep, "/")
        message = str(record.msg)
        return any(
            path == file and message.startswith(prefix)
            for file, prefix in CONSOLE_LINES
        )


def quiet_filter():
    return _QuietFilter()


def configure(verbose=False):
    """Set the console up before TensorFlow is imported; idempotent.

    Quiet: installs the log filter on absl's handler and imports TensorFlow
    (and probes its devices) with fd 2 captured, then replays every captured
    line that is not known start-up noise. Verbose: shows TF's C++ INFO
    lines too (`TF_CPP_MIN_LOG_LEVEL=0` unless set).
    """
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietFilter) for f in handler.filters):
        handler.addFilter(_QuietFilter())
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(
                keepends=True
            ):
                if not _STARTUP_NOISE.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()
