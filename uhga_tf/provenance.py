"""Where a result came from: the source commit and the flags it depends on,
for metadata and benchmarks."""

import hashlib
import json
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


def experiment_digest(experiment):
    """The flags a result depends on: `config.digest_dict` with every
    location at its default and a backbone weights file named by its
    content (`backbone.weights_identity`), so neither where a run writes
    nor where its files lie changes it."""
    from uhga_tf import config
    from uhga_tf.models import backbone

    values = config.digest_dict(config.at_default_locations(experiment))
    values["model"]["backbone_weights"] = backbone.weights_identity(
        experiment.model.backbone_weights)
    return values


def short_hash(values):
    """16 hex digits of the sha256 of `values` as sorted JSON."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
