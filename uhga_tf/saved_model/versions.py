"""The `<base_path>/<version>/` layout TF-Serving and our server poll.

Only directories whose whole name is a non-negative integer are versions;
an export writes to a `.tmp-<version>-<random>` directory first (never an
integer) and renames it into place.
"""

import os
import re

import numpy as np

TEMP_PREFIX = ".tmp-"
_VERSION_RE = re.compile(r"^[0-9]+$")
# TF-Serving's model_spec.version is an Int64Value.
MAX_VERSION = 2**63 - 1


def list_versions(base_path):
    """Return the sorted integer versions under `base_path` (servable dirs).

    Only directories whose whole name is a non-negative integer count, as in
    TF-Serving's file-system source; temporary export directories and files
    are ignored. A missing base path has no versions.
    """
    try:
        names = os.listdir(base_path)
    except FileNotFoundError:
        return []
    return sorted(
        int(name)
        for name in names
        if _VERSION_RE.match(name)
        and int(name) <= MAX_VERSION
        and os.path.isdir(os.path.join(base_path, name))
    )



def check_version(version):
    """Refuse a version TF-Serving could not address (ValueError)."""
    if (
        isinstance(version, bool)
        or not isinstance(version, (int, np.integer))
        or not 1 <= version <= MAX_VERSION
    ):
        raise ValueError(
            f"version must be an integer in [1, {MAX_VERSION}] (int64, as "
            f"model_spec.version); received version={version!r}"
        )



def next_version(export_dir):
    """One more than the newest version under `export_dir` (1 if none)."""
    versions = list_versions(export_dir)
    return versions[-1] + 1 if versions else 1
