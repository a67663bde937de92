"""Do the learned codes beat the strongest cheap references? Over seeds.

    python benchmarks/quality.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --seeds=3
    python benchmarks/quality.py --flagfile=configs/fashion_mnist.flags \
        --seeds=3
    python benchmarks/quality.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --seeds=3 --code_lengths=64 \
        --split=ssdh_lists --class_decay=0.7071 --name=cifar10_imbalanced
    python benchmarks/quality.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --seeds=3 --code_lengths=64 \
        --classes=0,1,2,3,4 --name=cifar10_5class
    python benchmarks/quality.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --seeds=3 --fine_tuned_backbone \
        --stage_two_stock_features "--product=Ours (product)" \
        --name=cifar10_fine_tuned_stock_graph --reference_cells=cifar10 \
        "--methods=<the cifar10 entry's>"

On one split of the flag file's collection, for each code length and seed:
the product recipe with and without gradient attention, and every code
reference of `tables.REFERENCES` (ITQ raw / on unit rows / fitted on the
database, spectral embedding + ITQ, k-means pseudo-labels + least squares,
the last two on the 20-NN and on the 10-NN graph),
plus cosine ranking of raw and of centred float features. With
--fine_tuned_backbone the product rows are the two-stage recipe: per seed,
stage one fine-tunes the backbone end to end (`config.FINE_TUNE_RECIPE`,
about 45 minutes on 2 cores, stored under <cache_dir>/fine_tuned/ and its
record beside the cells as stage_one_s<seed>.json) and the product trains
on the fine-tuned backbone's features (with --stage_two_stock_features,
the recipe, S's graph on the stock and the fine-tuned features side by
side); the references stay on the stock features (--fine_tune_rounds=2
repeats stage one from its own backbone, S rebuilt: measured, not
adopted). The database is
stored in one seed-shuffled order and MAP@ALL is the tie-aware one (no label
can move it); MAP@1000 and P@100 are computed on that order. "ITQ (best)"
is the ITQ variant with the best *validation* MAP at that length (the query
set never chooses anything). Cells are stored under
--results_dir/cells/<name>/ (benchmarks/results/cells/<name>/ by default, not
docs/results/cells/ where `python -m uhga_tf.reproduce` keeps its own: the two
run rows such as ITQ from different flags, and in one folder each made the
other's cells stale) and reread only when their recorded inputs match;
`python benchmarks/check_cells.py` counts the cells a rerun would read back.

JSON (merged into --out under --name): ``<metric>.<method>.<bits>.mean``
for metric in map_all, map_1000, p_100 (and map_all_stable);
``margin_over_best_reference_min.<metric>`` (min over lengths of the
product's mean minus the best reference's: for map_all every reference,
float cosine included; for map_1000 and p_100 the best code reference);
``map_1000_minus_cosine_min_64_128``.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_env  # noqa: E402

from uhga_tf import config  # noqa: E402
from uhga_tf import flags_util  # noqa: E402
from uhga_tf import io_utils  # noqa: E402

flags_util.define_config_flags()
flags.DEFINE_integer("seeds", 3, "Training seeds per cell (0 .. seeds-1).")
flags.DEFINE_list("code_lengths", ["16", "32", "64", "128"], "Code lengths.")
flags.DEFINE_list(
    "methods",
    ["Ours (product)", "Ours+GA (product)", "ITQ", "ITQ (unit)",
     "ITQ (unit, database)", "Spectral+ITQ", "k-means+LS",
     "Spectral+ITQ (k=10)", "k-means+LS (k=10)"],
    "Rows (table methods).")
flags.DEFINE_string("product", "Ours+GA (product)",
                    "The row whose margins are reported.")
flags.DEFINE_bool(
    "fine_tuned_backbone", False,
    "Two-stage recipe: the product rows train on the features of a backbone "
    "fine-tuned for their seed (uhga_tf/training/fine_tune.py, stored under "
    "<cache_dir>/fine_tuned/); every reference and cosine row stays on the "
    "stock backbone's features, as a user would run them.")
flags.DEFINE_integer(
    "fine_tune_rounds", 1,
    "With --fine_tuned_backbone: rounds of stage one, each from the previous "
    "round's backbone with S rebuilt on its features.")
flags.DEFINE_bool(
    "stage_two_stock_features", False,
    "With --fine_tuned_backbone: stage two builds S's kNN graph on the "
    "stock and the fine-tuned features side by side "
    "(similarity_stock_features); the head reads the fine-tuned ones.")
flags.DEFINE_string("name", "", "Entry name in --out (default: dataset).")
flags.DEFINE_string(
    "reference_cells", "",
    "Read and write the reference rows' cells under "
    "<results_dir>/cells/<this>/ (default: --name's folder): an entry whose "
    "references run on another entry's flags and data shares their cells "
    "(each still reread only when its recorded inputs match).")
flags.DEFINE_string("results_dir", "benchmarks/results",
                    "Cells live under <results_dir>/cells/<name>/.")
flags.DEFINE_string(
    "out", "benchmarks/results/quality.json", "JSON to merge into.")
FLAGS = flags.FLAGS
METRICS = ("map_all", "map_all_stable", "map_1000", "p_100")
COSINE = ("cosine (raw)", "cosine (centred)")


def cell_metrics(result):
    """The reported numbers of one stored cell."""
    at = result.get("map_at", {})
    precision = result.get("precision_at_n", {})
    return {
        "map_all": result["map_tie_aware"],
        "map_all_stable": result["map"],
        "map_1000": at.get("1000", at.get(1000)),
        "p_100": precision.get("100", precision.get(100)),
        "validation_map": result.get("validation_map"),
    }


def _stats(values):
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()),
            "values": values.tolist()}


def group(cells, results):
    """{metric: {method: {bits: stats}}} and training seconds."""
    grouped, seconds = {}, {}
    for cell, result in zip(cells, results):
        k = str(cell.code_length)
        for metric, value in cell_metrics(result).items():
            grouped.setdefault(metric, {}).setdefault(
                cell.method, {}).setdefault(k, []).append(value)
        seconds.setdefault(cell.method, {}).setdefault(k, []).append(
            result.get("wall_time_s", result.get("cell_wall_time_s")))
    return {
        metric: {m: {k: _stats(v) for k, v in d.items()}
                 for m, d in per_method.items()}
        for metric, per_method in grouped.items()
    }, seconds


def add_best_itq(table):
    """"ITQ (best)": per length, the ITQ variant best on validation MAP."""
    from uhga_tf import tables

    chosen = {}
    variants = [m for m in tables.ITQ_VARIANTS
                if m in table["validation_map"]]
    if not variants:
        return chosen
    for k in table["validation_map"][variants[0]]:
        best = max(variants,
                   key=lambda m: table["validation_map"][m][k]["mean"])
        chosen[k] = best
        for metric in METRICS:
            table[metric].setdefault("ITQ (best)", {})[k] = (
                table[metric][best][k])
    return chosen


def cosine_rows(sets, table, code_lengths):
    """Cosine ranking of raw and centred features (seed- and K-free)."""
    from uhga_tf.evaluation import cosine

    mean = sets.features["train"].mean(axis=0)
    out = {}
    for name, centre in zip(COSINE, (0.0, mean)):
        out[name] = cosine.cosine_metrics(
            sets.features["query"], sets.features["database"],
            sets.labels["query"], sets.labels["database"], mean=centre)
        for metric in METRICS:
            value = out[name]["map_all" if metric == "map_all_stable"
                              else metric]
            table[metric][name] = {
                str(k): {"mean": value, "std": 0.0, "values": [value]}
                for k in code_lengths}
    return out


def margins(table, product, code_lengths):
    """Product minus best reference, per metric and length (see docstring)."""
    from uhga_tf import tables

    code_refs = [m for m in (*tables.ITQ_VARIANTS, "ITQ (best)",
                             *tables.STRUCTURAL_REFERENCES)
                 if m in table["map_all"]]
    out = {}
    for metric in ("map_all", "map_1000", "p_100"):
        refs = code_refs + (list(COSINE) if metric == "map_all" else [])
        per_length = {}
        for k in map(str, code_lengths):
            best = max(refs, key=lambda m: table[metric][m][k]["mean"])
            per_length[k] = {
                "best_reference": best,
                "margin": table[metric][product][k]["mean"]
                - table[metric][best][k]["mean"],
            }
        out[metric] = per_length
    return out


def summarise(table, product, code_lengths, cosine_out):
    margin = margins(table, product, code_lengths)
    entry = {
        **{metric: table[metric] for metric in METRICS},
        "validation_map": table["validation_map"],
        "margins": margin,
        "margin_over_best_reference_min": {
            metric: min(v["margin"] for v in per.values())
            for metric, per in margin.items()
        },
        "cosine": cosine_out,
    }
    long_codes = [str(k) for k in code_lengths if k >= 64]
    if long_codes:
        cosine_1000 = max(cosine_out[n]["map_1000"] for n in COSINE)
        entry["map_1000_minus_cosine_min_64_128"] = min(
            table["map_1000"][product][k]["mean"] - cosine_1000
            for k in long_codes)
    return entry


def print_table(name, entry, code_lengths, seeds):
    for metric in ("map_all", "map_1000", "p_100"):
        label = "MAP@ALL (tie-aware)" if metric == "map_all" else metric
        print(f"\n{name}: {label}, mean ± std over {seeds} seeds")
        print(f"{'method':<24}" + "".join(f"{str(k) + ' bits':>18}"
                                          for k in code_lengths))
        for method, per_length in entry[metric].items():
            row = f"{method:<24}"
            for k in map(str, code_lengths):
                e = per_length.get(k)
                row += (f"{e['mean']:>10.4f} ±{e['std']:.4f}" if e
                        else f"{'–':>18}")
            print(row)
    print("\nmargin over the best reference (min over lengths): "
          + ", ".join(f"{m} {v:+.4f}" for m, v in
                      entry["margin_over_best_reference_min"].items()))


def two_stage_inputs(base, sets, seed, cells_dir):
    """Flags and sets of stage two for `seed`: stage one trained (or read
    back) on the stock `sets`, its record stored beside the cells."""
    from uhga_tf.data import retrieval_sets
    from uhga_tf.training import fine_tune

    record = fine_tune.fine_tuned_backbone(
        base, seed, sets, rounds=FLAGS.fine_tune_rounds)
    tuned = stage_two_experiment(
        base, record["weights"], FLAGS.stage_two_stock_features)
    tuned_sets = retrieval_sets.load_retrieval_sets(
        tuned.data, tuned.model, base.train.seed, progress=True)
    # What benchmarks/check_cells.py needs to check stage two's cells
    # without the (uncommitted) weights file.
    record = {**record, "data": tuned_sets.description}
    io_utils.write_json_atomic(
        os.path.join(cells_dir, stage_one_file(seed)), record, indent=1)
    return tuned, tuned_sets, {
        k: v for k, v in record.items() if k != "experiment"}


def stage_two_experiment(base, weights, stock_features):
    """Stage two's flags: the base on the fine-tuned backbone `weights`
    (a path or its sha256 identity), S's graph also on the stock features
    when `stock_features`."""
    # At its default the added field leaves the digest as it was, so the
    # entries run before it existed keep their cells.
    return config.with_values(base, {
        "backbone_weights": weights,
        "similarity_stock_features": bool(stock_features)})


def stage_one_file(seed):
    return f"stage_one_s{seed}.json"


def merge_into_out(name, entry):
    """Replace `name`'s entry in --out, keeping the other datasets."""
    payload = {}
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            payload = json.load(f)
    payload[name] = entry
    io_utils.write_json_atomic(FLAGS.out, payload, indent=1)


def main(argv):
    del argv
    from tqdm import tqdm

    from uhga_tf import tables
    from uhga_tf.data import retrieval_sets

    code_lengths = [int(k) for k in FLAGS.code_lengths]
    base = flags_util.exit_on_user_error(
        "quality", config.experiment_from_flat, flags_util.config_values())
    name = FLAGS.name or base.data.dataset
    # Checked before the features load: a misspelt method costs nothing.
    cells = flags_util.exit_on_user_error(
        "quality", tables.table_cells, 3, code_lengths, FLAGS.seeds,
        FLAGS.methods)
    sets = retrieval_sets.load_retrieval_sets(
        base.data, base.model, base.train.seed, progress=True)
    cells_dir = os.path.join(FLAGS.results_dir, "cells", name)
    reference_dir = os.path.join(
        FLAGS.results_dir, "cells", FLAGS.reference_cells or name)
    start = time.time()
    stage_two = {}  # seed -> (flags, sets, stage-one record)

    def run(cell):
        if cell.method in tables.REFERENCES:
            return tables.run_cell(cell, base, sets, reference_dir)
        if not (FLAGS.fine_tuned_backbone and tables.is_product(cell.method)):
            return tables.run_cell(cell, base, sets, cells_dir)
        if cell.seed not in stage_two:
            stage_two[cell.seed] = two_stage_inputs(
                base, sets, cell.seed, cells_dir)
        tuned, tuned_sets, _ = stage_two[cell.seed]
        return tables.run_cell(cell, tuned, tuned_sets, cells_dir)

    results = [run(cell) for cell in tqdm(cells, desc="quality", unit="cell")]
    table, seconds = group(cells, results)
    chosen = add_best_itq(table)
    cosine_out = cosine_rows(sets, table, code_lengths)
    entry = summarise(table, FLAGS.product, code_lengths, cosine_out)
    entry.update(
        product=FLAGS.product,
        itq_best_chosen_on_validation=chosen,
        fine_tuned_backbone={seed: record for seed, (_, _, record)
                             in sorted(stage_two.items())} or None,
        train_seconds=seconds,
        seeds=FLAGS.seeds,
        data=sets.description,
        recipe=config.PRODUCT_RECIPE,
        cell_commits=sorted({r.get("provenance", {}).get("commit") or ""
                             for r in results}),
        command="python benchmarks/quality.py " + " ".join(sys.argv[1:]),
        wall_time_s=time.time() - start,
        **bench_env.provenance(),
    )
    print_table(name, entry, code_lengths, FLAGS.seeds)
    merge_into_out(name, entry)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
