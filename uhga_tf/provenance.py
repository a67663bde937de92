"""Where a result came from: the source commit, for metadata and benchmarks."""

import os
import subprocess


def git_sha():
    """Return the git commit of the source tree, or None outside a repo."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
