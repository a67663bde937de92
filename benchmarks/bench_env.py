"""Provenance shared by the benchmark scripts: commit, tree state, CPU."""

import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _git(*args):
    return subprocess.run(
        ["git", *args], cwd=HERE, capture_output=True, text=True, check=True,
    ).stdout


def git_sha():
    """HEAD's commit, or "unknown" outside a checkout."""
    try:
        return _git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Outputs, not inputs: a benchmark rewrites its own stored cells and JSON
# while it runs, and that alone must not mark its result as dirty.
RESULT_DIRS = ("benchmarks/results", "docs/results")


def git_dirty():
    """Whether tracked files other than stored results differ from HEAD
    (None outside a checkout)."""
    excluded = [f":(exclude,top){path}" for path in RESULT_DIRS]
    try:
        return bool(_git("status", "--porcelain", "--untracked-files=no",
                         "--", ":/", *excluded))
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model():
    """The CPU's model name from lscpu, else platform.processor()."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def provenance():
    """{commit, dirty, cpu} for a benchmark's JSON."""
    return {"commit": git_sha(), "dirty": git_dirty(), "cpu": cpu_model()}


def merge_entry(path, key, entry, values):
    """Merge `entry` under `key` into the JSON at `path`, atomically, with
    the command line, the flag `values` (data_dir left out: it names one
    machine's folder) and provenance(); other keys are kept."""
    from uhga_tf import io_utils

    stored = {}
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
    stored[key] = {
        **entry,
        "command": " ".join(sys.argv),
        "flags": {k: v for k, v in values.items() if k != "data_dir"},
        **provenance(),
    }
    text = json.dumps(stored, indent=2, sort_keys=True, default=str)
    io_utils.write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def flag_experiment(program):
    """(flat flag values, ExperimentConfig, RetrievalSets) of the config
    flags, for scripts that read one experiment's sets; a bad flag exits
    with its message under ``program``'s name."""
    from uhga_tf import config
    from uhga_tf import flags_util
    from uhga_tf.data import retrieval_sets

    values = flags_util.config_values()
    experiment = flags_util.exit_on_user_error(
        program, config.experiment_from_flat, values)
    sets = retrieval_sets.load_retrieval_sets(
        experiment.data, experiment.model, experiment.train.seed,
        progress=True)
    return values, experiment, sets
