"""Stage one of the two-stage recipe: a backbone fine-tuned once per seed.

Stage one trains the backbone and the hash layer end to end
(`config.FINE_TUNE_RECIPE` over the caller's flags, on the stock backbone's
S) and writes the fine-tuned backbone (`backbone.FINE_TUNED_WEIGHTS_FILE`).
Stage two is any frozen-feature run with `backbone_weights` set to that
file. Each stage-one run lives in `<cache_dir>/fine_tuned/<digest>/`, named
by the digest of its experiment: callers with the same flags share it, a
killed run resumes from its checkpoints, and a finished one (its
results.json written last) is read back instead of trained again.
"""

import os

from uhga_tf import config as config_lib
from uhga_tf import provenance
from uhga_tf.models import backbone as backbone_lib
from uhga_tf.training import run as run_lib

STORE = "fine_tuned"


def stage_one_experiment(base_experiment, seed):
    """The end-to-end experiment whose backbone stage two reads."""
    experiment = config_lib.with_values(
        base_experiment, {**config_lib.FINE_TUNE_RECIPE, "seed": seed})
    digest = provenance.short_hash(provenance.experiment_digest(experiment))
    workdir = os.path.join(
        base_experiment.data.cache_dir, STORE,
        f"{base_experiment.data.dataset}_s{seed}_{digest}")
    return config_lib.with_values(
        experiment, {"workdir": workdir, "logdir": ""})


def fine_tuned_backbone(base_experiment, seed, sets=None):
    """Train stage one for `seed` unless stored; return its record.

    Args:
        base_experiment: the flags stage one starts from (data, split, S);
            its backbone must be the stock one.
        seed: training seed of stage one.
        sets: optional `RetrievalSets` of the stock backbone's features
            (the S stage one is trained on is built from them).

    Returns:
        dict: weights (path of the fine-tuned backbone), weights_identity
        (its sha256), workdir, the commit it was trained on, and stage
        one's validation metrics.
    """
    experiment = stage_one_experiment(base_experiment, seed)
    workdir = experiment.workdir
    weights = os.path.join(workdir, backbone_lib.FINE_TUNED_WEIGHTS_FILE)
    # results.json is written after the weights: it marks a finished run.
    results_path = os.path.join(workdir, run_lib.RESULTS_FILE)
    if not os.path.exists(results_path):
        run_lib.run_experiment(experiment, sets=sets)
    results = config_lib.read_json(results_path)
    return {
        "weights": weights,
        "weights_identity": backbone_lib.weights_identity(weights),
        "workdir": workdir,
        "seed": seed,
        "commit": results.get("commit"),
        "recipe": config_lib.FINE_TUNE_RECIPE,
        **{k: results.get(k) for k in (
            "validation_map", "validation_map_1000", "validation_p_100",
            "steps", "wall_time_s", "resumed_from_step")},
    }
