"""Label-free structure of the stock and a fine-tuned backbone's features.

    python benchmarks/feature_structure.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data \
        --fine_tuned_weights=<stage one's backbone.weights.h5> --name=cifar10

A diagnostic for the question the two-stage recipe leaves open (README,
Train): which collections gain from fine-tuning? Nothing here reads a
label, and nothing is chosen by it. On the train rows of the flags' split,
as S sees them (unit rows of the raw features), for the stock backbone and
for the one given:

* ``kmeans_explained_<k>``: the share of the rows' variance that spherical
  k-means (the ladder's clustering, `structured.cluster_assignments`) at
  k = 8, 16, 32 explains: how clustered the features are;
* ``top16_variance``: the share of variance in the top 16 principal axes;
* ``mutual_10nn``: the share of 10-NN links that are mutual (S's graph);
* ``nn10_overlap`` (the pair): the mean share of each row's 10 nearest
  neighbours that both backbones agree on.

Merges ``<name>`` into ``benchmarks/results/feature_structure.json`` with
the commit, flags and both data descriptions.
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
flags.DEFINE_string("fine_tuned_weights", None,
                    "Backbone weights of a stage one (backbone.weights.h5).")
flags.DEFINE_string("name", None, "Key of this collection in the JSON.")
flags.DEFINE_string("out", "benchmarks/results/feature_structure.json",
                    "JSON to merge this collection's row into.")
flags.mark_flags_as_required(["fine_tuned_weights", "name"])
FLAGS = flags.FLAGS

CLUSTERS = (8, 16, 32)
NEIGHBOURS = 10


def explained_by_clusters(unit, assigned):
    """1 - within-cluster over total sum of squares, for one assignment."""
    counts = np.bincount(assigned, minlength=assigned.max() + 1)
    sums = np.zeros((len(counts), unit.shape[1]))
    np.add.at(sums, assigned, unit)
    centroids = sums / np.maximum(counts, 1)[:, None]
    within = ((unit - centroids[assigned]) ** 2).sum()
    return float(1.0 - within / ((unit - unit.mean(axis=0)) ** 2).sum())


def structure(unit, seed):
    """The single-backbone statistics and the rows' 10-NN ids."""
    from uhga_tf.similarity import structured

    row = {}
    for k in CLUSTERS:
        assigned = structured.cluster_assignments(unit, k, 1, seed)[:, 0]
        row[f"kmeans_explained_{k}"] = explained_by_clusters(unit, assigned)
    spectrum = np.linalg.svd(
        unit - unit.mean(axis=0), compute_uv=False) ** 2
    row["top16_variance"] = float(spectrum[:16].sum() / spectrum.sum())
    ids, _ = structured.nearest_neighbours(unit, NEIGHBOURS)
    row["mutual_10nn"] = float(
        (structured.mutual_partners(ids) >= 0).mean())
    return row, ids


def main(argv):
    del argv
    from uhga_tf import config
    from uhga_tf.data import retrieval_sets
    from uhga_tf.models import backbone as backbone_lib
    from uhga_tf.similarity import features as features_lib

    if not os.path.isfile(FLAGS.fine_tuned_weights):
        raise app.UsageError(
            f"--fine_tuned_weights: no file {FLAGS.fine_tuned_weights!r}")
    values, stock, stock_sets = bench_env.flag_experiment("feature_structure")
    tuned = config.with_values(
        stock, {"backbone_weights": FLAGS.fine_tuned_weights})
    tuned_sets = retrieval_sets.load_retrieval_sets(
        tuned.data, tuned.model, stock.train.seed, progress=True)
    seed = stock.train.seed
    rows, neighbours = {}, {}
    for name, sets in (("stock", stock_sets), ("fine_tuned", tuned_sets)):
        rows[name], neighbours[name] = structure(
            features_lib.unit_rows(sets.features["train"]), seed)
    shared = [len(np.intersect1d(a, b)) for a, b in
              zip(neighbours["stock"], neighbours["fine_tuned"])]
    rows["nn10_overlap"] = float(np.mean(shared) / NEIGHBOURS)

    print(f"\n{FLAGS.name}: train rows, label-free")
    for key in rows["stock"]:
        print(f"{key:<22}{rows['stock'][key]:>8.4f}"
              f"{rows['fine_tuned'][key]:>8.4f}")
    print(f"{'nn10_overlap':<22}{rows['nn10_overlap']:>8.4f}")
    bench_env.merge_entry(FLAGS.out, FLAGS.name, {
        **rows,
        "fine_tuned_weights_identity": backbone_lib.weights_identity(
            FLAGS.fine_tuned_weights),
        "data": stock_sets.description,
        "fine_tuned_data": tuned_sets.description,
    }, values)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
