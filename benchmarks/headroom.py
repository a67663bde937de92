"""How much room the frozen features leave above the label-free codes.

    python benchmarks/headroom.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data
    python benchmarks/headroom.py --flagfile=configs/fashion_mnist.flags \
        --data_dir=../shared/data

On the validation split of the flags' split seed (validation queries
against the database minus them, protocol.md §1.3), tie-aware MAP@ALL,
MAP@1000 and P@100 of:

* cosine ranking of the centred features (float, no learning; as
  benchmarks/quality.py's "cosine (centred)");
* k-means+LS (k=10) codes at the flags' code length (label-free, the start
  of the product's hash layer);
* a supervised linear map: ridge least squares from the centred unit rows
  to the train images' true one-hot labels, then cosine ranking of its
  outputs (float). It reads labels, so it is a ceiling for a linear head on
  these features, a diagnostic only: nothing is chosen by it.

The product's own validation metrics are stored beside its cells in
benchmarks/results/quality.json. Prints the table and merges
``<dataset>`` into ``benchmarks/results/headroom.json`` with the commit,
flags and data it came from.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_env  # noqa: E402

from uhga_tf import flags_util  # noqa: E402

flags_util.define_config_flags()
flags.DEFINE_string("out", "benchmarks/results/headroom.json",
                    "JSON to merge this dataset's rows into.")
FLAGS = flags.FLAGS

REFERENCE = "k-means+LS (k=10)"
RIDGE = 1e-2


def float_rows(sets):
    """Rows of the two float rankings on the validation split."""
    from uhga_tf.baselines import structural
    from uhga_tf.data import retrieval_sets
    from uhga_tf.evaluation import cosine
    from uhga_tf.similarity import features as features_lib

    keep = retrieval_sets.validation_database_mask(sets)
    # The supervised map reads what the product's hash layer reads:
    # centred unit rows.
    unit = {name: features_lib.unit_rows(sets.features[name])
            for name in ("train", "validation", "database")}
    mean = unit["train"].mean(axis=0)
    centred = {name: rows - mean for name, rows in unit.items()}
    labels = sets.labels["train"]
    one_hot = np.eye(int(labels.max()) + 1)[labels]
    supervised = structural.ridge_map(
        centred["train"], one_hot - one_hot.mean(axis=0), RIDGE)

    def ranked(validation, database, centre=0.0):
        out = cosine.cosine_metrics(
            validation, database[keep], sets.labels["validation"],
            sets.labels["database"][keep], mean=centre)
        return {"map_all": out["map_all"], "map_1000": out["map_1000"],
                "p_100": out["p_100"]}

    return {
        # The "cosine (centred)" of benchmarks/quality.py and the README:
        # raw features less their train mean.
        "cosine (centred)": ranked(
            sets.features["validation"], sets.features["database"],
            centre=sets.features["train"].mean(axis=0)),
        "supervised linear map (labels; ceiling)": ranked(
            centred["validation"] @ supervised,
            centred["database"] @ supervised),
    }


def reference_row(sets, code_length, seed):
    from uhga_tf.baselines import references
    from uhga_tf.training import run as run_lib

    validation, database = references.shallow_codes(
        REFERENCE, code_length, sets, seed,
        encode=("validation", "database"))
    out = run_lib.validation_metrics(validation, database, sets)
    return {"map_all": out["validation_map"],
            "map_1000": out["validation_map_1000"],
            "p_100": out["validation_p_100"]}


def main(argv):
    del argv
    values, experiment, sets = bench_env.flag_experiment("headroom")
    seed = experiment.train.seed
    code_length = experiment.model.code_length
    rows = float_rows(sets)
    rows[f"{REFERENCE}, {code_length} bits"] = reference_row(
        sets, code_length, seed)
    print(f"\n{experiment.data.dataset}, validation ({sets.description})")
    print(f"{'MAP@ALL':>8} {'MAP@1000':>9} {'P@100':>7}  ranking")
    for name, row in rows.items():
        print(f"{row['map_all']:8.4f} {row['map_1000']:9.4f} "
              f"{row['p_100']:7.4f}  {name}")
    bench_env.merge_entry(FLAGS.out, experiment.data.dataset, {
        "rows": rows, "data": sets.description}, values)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
