"""Stage one of the two-stage recipe: a backbone fine-tuned once per seed.

Stage one trains the backbone and the hash layer end to end
(`config.FINE_TUNE_RECIPE` over the caller's flags, on the stock backbone's
S) and writes the fine-tuned backbone (`backbone.FINE_TUNED_WEIGHTS_FILE`).
Stage two is any frozen-feature run with `backbone_weights` set to that
file. Each stage-one run lives in `<cache_dir>/fine_tuned/<digest>/`, named
by the digest of its experiment: callers with the same flags share it, a
killed run resumes from its checkpoints, and a finished one (its
results.json written last) is read back instead of trained again.

With `rounds` > 1 stage one repeats: round r starts from round r - 1's
backbone, and S, the hash layer's start and the train features are rebuilt
on that backbone's features (S is never rebuilt inside a round, so a round
that trains longer fits S's own errors: docs/product_recipe.md, section 1l).
A round's flags name the previous round's weights by sha256, so each round
has its own digest and store entry.
"""

import os

from uhga_tf import config as config_lib
from uhga_tf import provenance
from uhga_tf.data import retrieval_sets
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


def fine_tuned_backbone(base_experiment, seed, sets=None, rounds=1):
    """Train stage one for `seed` unless stored; return its record.

    Args:
        base_experiment: the flags stage one starts from (data, split, S);
            its backbone must be the stock one.
        seed: training seed of stage one.
        sets: optional `RetrievalSets` of the stock backbone's features
            (the S stage one is trained on is built from them); None =
            loaded with the base's split seed, never stage one's seed.
        rounds: rounds of stage one (>= 1), each from the previous round's
            backbone with S rebuilt on its features.

    Returns:
        dict of the last round: weights (path of the fine-tuned backbone),
        weights_identity (its sha256), start_weights (the backbone it
        started from), workdir, experiment (its flags, as a dict), the
        commit it was trained on, the description of the sets it trained
        on (stage_one_data) and its validation metrics; `rounds`,
        and with rounds > 1 the earlier rounds' records (without their
        flags) under `earlier_rounds`.
    """
    rounds = int(rounds)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; received rounds={rounds}")
    records = [_one_round(base_experiment, seed, sets)]
    for _ in range(1, rounds):
        tuned = config_lib.with_values(
            base_experiment, {"backbone_weights": records[-1]["weights"]})
        # The split stays the base's (its seed), as for stage two.
        tuned_sets = retrieval_sets.load_retrieval_sets(
            tuned.data, tuned.model, base_experiment.train.seed,
            progress=True)
        records.append(_one_round(tuned, seed, tuned_sets))
    record = {**records[-1], "rounds": rounds}
    if rounds > 1:
        record["earlier_rounds"] = [
            {k: v for k, v in r.items() if k != "experiment"}
            for r in records[:-1]]
    return record


def record_is_current(base_experiment, record, data=None):
    """Whether `fine_tuned_backbone(base_experiment, record["seed"])`, with
    as many rounds as `record` holds, would read its store entries back now.

    False when the recipe, the base flags or a round's start have changed
    since: such a call trains a new stage one, so results computed on
    `record`'s backbone are stale. With `data` (the description of the
    stock sets the call is given), also False when the first round trained
    on other sets (another split) or its record does not say which. Reads
    only the record, never the store.
    """
    rounds = [*record.get("earlier_rounds", []), record]
    if data is not None and rounds[0].get("stage_one_data") != data:
        return False
    start = base_experiment
    for round_record in rounds:
        expected = stage_one_experiment(start, record["seed"]).workdir
        if os.path.basename(expected) != os.path.basename(
                round_record["workdir"]):
            return False
        start = config_lib.with_values(
            base_experiment,
            {"backbone_weights": round_record["weights_identity"]})
    return True


def _one_round(base_experiment, seed, sets):
    experiment = stage_one_experiment(base_experiment, seed)
    workdir = experiment.workdir
    weights = os.path.join(workdir, backbone_lib.FINE_TUNED_WEIGHTS_FILE)
    # results.json is written after the weights: it marks a finished run.
    results_path = os.path.join(workdir, run_lib.RESULTS_FILE)
    if not os.path.exists(results_path):
        if sets is None:
            # Loaded only to train. Stage one's own seed would draw another
            # split, whose train rows hold about a third of stage two's
            # query and validation images: the base's seed draws the split.
            sets = retrieval_sets.load_retrieval_sets(
                base_experiment.data, base_experiment.model,
                base_experiment.train.seed, progress=True)
        run_lib.run_experiment(experiment, sets=sets)
    results = config_lib.read_json(results_path)
    # The digest names the flags, not the rows: an entry trained on another
    # split (the split seed is not a stage-one flag) must not pass as ours.
    if sets is not None and results.get("data") != sets.description:
        raise ValueError(
            f"stage one in {workdir} was trained on other data than the "
            f"sets given: it records {results.get('data')!r}, the sets are "
            f"{sets.description!r}; move the entry aside to train it again")
    return {
        "weights": weights,
        "weights_identity": backbone_lib.weights_identity(weights),
        "workdir": workdir,
        "seed": seed,
        "start_weights": backbone_lib.weights_identity(
            base_experiment.model.backbone_weights),
        "commit": results.get("commit"),
        "recipe": config_lib.FINE_TUNE_RECIPE,
        "experiment": experiment.to_dict(),
        # The sets stage one trained on, for checks that cannot load them.
        "stage_one_data": results.get("data"),
        **{k: results.get(k) for k in (
            "validation_map", "validation_map_1000", "validation_p_100",
            "steps", "wall_time_s", "resumed_from_step")},
    }
