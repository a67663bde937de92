"""A fitted reference written as a workdir that `uhga_tf.export` reads.

The README sends users to k-means+LS (k=10) for 16-bit codes and for codes
without training. To serve it they need what a trained run leaves: ``config.json`` (the
experiment: data, backbone, image size, code length) and ``hasher.keras``
(features -> z). A reference that encodes by one matrix product and a sign
(`Hasher.linear_map`) becomes such a hasher (`hash_layer.linear_hasher`),
so export, the servers, the client and the index take it unchanged.
"""

import os

import numpy as np

from uhga_tf import codes as codes_lib
from uhga_tf import config as config_lib
from uhga_tf import io_utils
from uhga_tf.baselines.references import REFERENCES
from uhga_tf.baselines.references import fit_reference
from uhga_tf.baselines.references import reference_settings

RESULT_FILENAME = "reference.json"


def fit_reference_workdir(experiment, method, sets=None):
    """Fit `method` (a `REFERENCES` name) and write it to the workdir.

    Args:
        experiment: `config.ExperimentConfig`; its data, backbone, image size,
            code length and seed are used, and its workdir is written.
        method: e.g. "k-means+LS (k=10)".
        sets: optional preloaded `RetrievalSets` (tests).

    Returns:
        dict: the method, its settings, the validation metrics of the Keras
        hasher's codes and the share of database bits equal to the
        reference's own (float64) codes. Also written to reference.json.

    Raises:
        ValueError: unknown method, one with no linear map, or a workdir
            that already holds a run.
    """
    choices = exportable_references()
    if method not in REFERENCES:
        raise ValueError(
            f"method must be one of {choices}; received method={method!r}")
    if method not in choices:
        raise ValueError(
            f"{method} does not encode by one matrix product and a sign, so "
            f"it cannot become a hasher; choose one of {choices}")
    workdir = experiment.workdir
    config_lib.check_writable_dir(workdir, "workdir")
    taken = [name for name in ("config.json", "hasher.keras")
             if os.path.exists(os.path.join(workdir, name))]
    if taken:
        raise ValueError(
            f"workdir {workdir!r} already holds {', '.join(taken)}; use a "
            "new workdir"
        )
    # Imported here: TensorFlow and the data stack load only once the
    # arguments have passed.
    from uhga_tf.data import retrieval_sets
    from uhga_tf.models import hash_layer
    from uhga_tf.training import run as run_lib

    if sets is None:
        sets = retrieval_sets.load_retrieval_sets(
            experiment.data, experiment.model, experiment.train.seed,
            progress=experiment.progress)
    hasher = fit_reference(
        method, experiment.model.code_length, sets, experiment.train.seed)
    model = hash_layer.linear_hasher(
        hasher.linear_map(), hasher.mean, hasher.options["unit_rows"])
    database_codes = run_lib.encode(model, sets.features["database"])
    agreement = float(np.mean(
        database_codes == hasher.encode(sets.features["database"])))
    validation_codes = run_lib.encode(model, sets.features["validation"])
    result = {
        "method": method,
        "settings": reference_settings(method),
        "code_length": experiment.model.code_length,
        "seed": experiment.train.seed,
        "data": sets.description,
        "bit_agreement_with_reference": agreement,
        # No MAP without labels: how the codes spread instead.
        **(run_lib.validation_metrics(validation_codes, database_codes, sets)
           if sets.labelled else {
               "labelled": False,
               **codes_lib.code_statistics(database_codes)}),
    }
    os.makedirs(workdir, exist_ok=True)
    with io_utils.atomic_path(
            os.path.join(workdir, "hasher.keras"), suffix=".keras") as tmp:
        model.save(tmp)
    io_utils.write_json_atomic(
        os.path.join(workdir, RESULT_FILENAME), result)
    # config.json last: export reads a workdir only once it is there.
    io_utils.write_json_atomic(
        os.path.join(workdir, "config.json"), experiment.to_dict())
    return result


def exportable_references():
    """The `REFERENCES` names with a linear map, sorted."""
    from uhga_tf.baselines import base

    return sorted(
        name for name, reference in REFERENCES.items()
        if base.HASHERS[reference.hasher].linear_map
        is not base.Hasher.linear_map)
