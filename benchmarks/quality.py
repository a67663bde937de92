"""Do the learned codes beat the cheap alternatives? MAP over seeds.

    python benchmarks/quality.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --seeds=3
    python benchmarks/quality.py --flagfile=configs/fashion_mnist.flags \
        --seeds=3

On one split of the flag file's dataset, for each code length and training
seed: the product recipe with and without gradient attention
(`config.PRODUCT_RECIPE`), ITQ fitted on the same train features, and cosine
ranking of the float features. MAP@ALL and MAP@1000 on the query set
(defaults were picked on the validation split, never here). Cells are the
table cells of `uhga_tf.reproduce` (stored under --results_dir/cells, read
back on a rerun). Prints a table and merges
``<dataset>: {map_all, map_1000, cosine, itq, margin_over_itq_min, ...}``
into benchmarks/results/quality.json.

Targets (issue 10): CIFAR-10, mean of 3 seeds: Ours+GA (product) >= ITQ +
0.05 at every code length and above cosine ranking; 64 bits >= 0.42.
Fashion-MNIST: above ITQ at every length.
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
    "methods", ["ITQ", "Ours (product)", "Ours+GA (product)"],
    "Rows (table methods).")
flags.DEFINE_string("results_dir", "docs/results", "Cells live under here.")
flags.DEFINE_string(
    "out", "benchmarks/results/quality.json", "JSON to merge into.")
FLAGS = flags.FLAGS
PRODUCT = "Ours+GA (product)"


def _stats(values):
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()),
            "values": values.tolist()}


def _group(cells, results):
    """MAP@ALL, MAP@1000 and training seconds per method and code length."""
    map_all, map_1000, seconds = {}, {}, {}
    for cell, result in zip(cells, results):
        k = str(cell.code_length)
        map_all.setdefault(cell.method, {}).setdefault(k, []).append(
            result["map"])
        at = result.get("map_at", {})
        value = at.get("1000", at.get(1000))
        if value is not None:
            map_1000.setdefault(cell.method, {}).setdefault(k, []).append(
                value)
        seconds.setdefault(cell.method, {}).setdefault(k, []).append(
            result.get("wall_time_s", result.get("cell_wall_time_s")))
    map_all = {m: {k: _stats(v) for k, v in d.items()}
               for m, d in map_all.items()}
    map_1000 = {m: {k: _stats(v) for k, v in d.items()}
                for m, d in map_1000.items()}
    return map_all, map_1000, seconds


def _cosine(sets):
    """Cosine ranking of the float features: (MAP@ALL, MAP@1000)."""
    from uhga_tf.evaluation import cosine

    queries, database = sets.features["query"], sets.features["database"]
    labels = (sets.labels["query"], sets.labels["database"])
    return (cosine.cosine_map(queries, database, *labels),
            cosine.cosine_map(queries, database, *labels, top_k=1000))


def _add_margins(entry, map_all, cosine_all):
    """Margin of the product recipe over ITQ, and over cosine ranking."""
    if PRODUCT not in map_all or "ITQ" not in map_all:
        return
    margins = {
        k: map_all[PRODUCT][k]["mean"] - map_all["ITQ"][k]["mean"]
        for k in map_all[PRODUCT] if k in map_all["ITQ"]
    }
    entry["margin_over_itq"] = margins
    entry["margin_over_itq_min"] = min(margins.values())
    entry["above_cosine_every_length"] = all(
        map_all[PRODUCT][k]["mean"] > cosine_all for k in margins)


def _print_table(dataset, entry):
    map_all, map_1000 = entry["map_all"], entry["map_1000"]
    cosine_all = entry["cosine"]["map_all"]
    cosine_1000 = entry["cosine"]["map_1000"]
    print(f"\n{dataset}: MAP@ALL (MAP@1000), mean ± std over "
          f"{FLAGS.seeds} seeds; cosine ranking {cosine_all:.4f} "
          f"({cosine_1000:.4f})")
    print(f"{'method':<20}" + "".join(f"{k + ' bits':>24}"
                                      for k in FLAGS.code_lengths))
    for method, per_length in map_all.items():
        row = f"{method:<20}"
        for k in FLAGS.code_lengths:
            e = per_length.get(k)
            e1000 = map_1000.get(method, {}).get(k)
            row += (
                f"{e['mean']:>10.4f} ±{e['std']:.4f} ({e1000['mean']:.4f})"
                if e and e1000 else f"{'–':>24}"
            )
        print(row)
    if "margin_over_itq_min" in entry:
        print(f"margin over ITQ (min over lengths): "
              f"{entry['margin_over_itq_min']:+.4f}")


def _merge_into_out(dataset, entry):
    """Replace `dataset`'s entry in --out, keeping the other datasets."""
    payload = {}
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            payload = json.load(f)
    payload[dataset] = entry
    io_utils.write_json_atomic(FLAGS.out, payload, indent=1)


def main(argv):
    del argv
    from tqdm import tqdm

    from uhga_tf import tables
    from uhga_tf.data import retrieval_sets

    code_lengths = [int(k) for k in FLAGS.code_lengths]
    base = flags_util.exit_on_user_error(
        "quality", config.experiment_from_flat, flags_util.config_values())
    dataset = base.data.dataset
    sets = retrieval_sets.load_retrieval_sets(
        base.data, base.model, base.train.seed, progress=True)
    cells = tables.table_cells(3, code_lengths, FLAGS.seeds, FLAGS.methods)
    cells_dir = os.path.join(FLAGS.results_dir, "cells", dataset)
    start = time.time()
    results = [
        tables.run_cell(cell, base, sets, cells_dir)
        for cell in tqdm(cells, desc="quality", unit="cell")
    ]
    map_all, map_1000, seconds = _group(cells, results)
    cosine_all, cosine_1000 = _cosine(sets)
    entry = {
        "map_all": map_all,
        "map_1000": map_1000,
        "itq": map_all.get("ITQ"),
        "cosine": {"map_all": cosine_all, "map_1000": cosine_1000},
        "train_seconds": seconds,
        "seeds": FLAGS.seeds,
        "data": sets.description,
        "recipe": config.PRODUCT_RECIPE,
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]),
        "wall_time_s": time.time() - start,
        **bench_env.provenance(),
    }
    _add_margins(entry, map_all, cosine_all)
    _print_table(dataset, entry)
    _merge_into_out(dataset, entry)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
