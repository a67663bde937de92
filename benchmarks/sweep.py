"""Grid sweep on the validation split: pick defaults without the query set.

    python benchmarks/sweep.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --noattention --epochs=15 \
        --grid="similarity=cluster,knn;similarity_clusters=20,50" \
        --name=cifar_s_modes

Every cell is the base config (flags) with one combination of the grid's
values; ``--grid`` is ``field=v1,v2;field=v1,...`` over any config field.
Cells share the loaded features, are stored one JSON each under
``<out_dir>/sweeps/<name>/cells/`` as they finish (a rerun skips them:
resumable), and the table is sorted by validation MAP (tie-aware MAP@ALL
of the validation queries from database minus train, protocol.md §1.3;
validation MAP@1000 and P@100 beside it). The query-set MAP is shown but
never used to rank. Writes ``<out_dir>/sweeps/<name>.json`` and prints the
table.
"""

import dataclasses
import hashlib
import itertools
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
flags.DEFINE_string("grid", "", "field=v1,v2;field=v1,... (config fields).")
flags.DEFINE_string("name", "sweep", "Sweep name (folder and JSON name).")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where to write.")
FLAGS = flags.FLAGS


def parse_grid(text):
    """'a=1,2;b=x' -> [("a", ["1", "2"]), ("b", ["x"])] (validated names)."""
    known = {name for name, *_ in config.flag_specs()}
    grid = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, values = part.partition("=")
        name = name.strip()
        if not sep or name not in known or not values.strip():
            raise ValueError(
                f"--grid part {part!r} must be field=v1,v2 with a config "
                "field name"
            )
        grid.append((name, [v.strip() for v in values.split(",")]))
    return grid


def _typed(name, text):
    kinds = {name: kind for name, _, kind, _ in config.flag_specs()}
    kind = kinds[name]
    if kind is bool:
        return text.lower() in ("1", "true", "yes")
    return kind(text)


def cells(base_values, grid):
    """Yield (overrides, flat values) for every grid combination."""
    names = [name for name, _ in grid]
    for combo in itertools.product(*(values for _, values in grid)):
        overrides = {n: _typed(n, v) for n, v in zip(names, combo)}
        yield overrides, {**base_values, **overrides}


def cell_id(values):
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_cell(overrides, experiment, sets, sweep_dir, key):
    """Train cell `key`; its row (validation and query MAP) or its error."""
    from uhga_tf.training import run as run_lib

    experiment = dataclasses.replace(
        experiment, workdir=os.path.join(sweep_dir, "runs", key),
        progress=False,
    )
    start = time.time()
    try:
        result = run_lib.run_experiment(experiment, sets=sets)
    except ValueError as e:  # a cell the grid makes invalid
        return {"overrides": overrides, "error": str(e)}
    return {
        "overrides": overrides,
        "validation_map": result["validation_map"],
        "validation_map_1000": result.get("validation_map_1000"),
        "validation_p_100": result.get("validation_p_100"),
        "map": result["map"],
        "similarity_fractions": result["similarity_fractions"],
        "similarity_diagnostics": result["similarity_diagnostics"],
        "wall_time_s": time.time() - start,
    }


def run_cells(experiments, sweep_dir, split_seed):
    """Rows of every cell: read back when stored, else trained and stored.

    Every cell shares one split, drawn with `split_seed` (the base flags'
    seed), as benchmarks/quality.py does: a grid over ``seed`` varies the
    training seed only. Cells with the same data and feature config share
    their loaded sets; a grid over a data field (e.g. ``train_size``) loads
    each value's own. A split drawn with another seed has other
    validation queries, and some of them are the base split's reported
    queries.
    """
    from tqdm import tqdm

    from uhga_tf.data import retrieval_sets

    cells_dir = os.path.join(sweep_dir, "cells")
    os.makedirs(cells_dir, exist_ok=True)
    loaded = {}  # the sets of each data and feature config in the grid
    rows = []
    for overrides, experiment in tqdm(experiments, desc="sweep", unit="cell"):
        key = cell_id(config.digest_dict(experiment))
        path = os.path.join(cells_dir, key + ".json")
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
            continue
        # A grid over e.g. train_size or image_size needs its own sets.
        sets_key = retrieval_sets.sets_identity(
            experiment.data, experiment.model)
        if sets_key not in loaded:
            loaded[sets_key] = retrieval_sets.load_retrieval_sets(
                experiment.data, experiment.model, split_seed, progress=True)
        row = run_cell(overrides, experiment, loaded[sets_key], sweep_dir,
                       key)
        io_utils.write_json_atomic(path, row)
        rows.append(row)
    return rows


def print_table(ranked, failed):
    print(f"\n{'validation MAP':>14} {'@1000':>7} {'P@100':>7} "
          f"{'query MAP':>10} {'P(same|S+)':>10} {'P(diff|S-)':>10}  cell")
    for r in ranked:
        diag = r.get("similarity_diagnostics") or {}
        print(
            f"{r['validation_map']:14.4f} "
            f"{r.get('validation_map_1000') or float('nan'):7.4f} "
            f"{r.get('validation_p_100') or float('nan'):7.4f} "
            f"{r['map']:10.4f} "
            f"{diag.get('p_same_given_similar', float('nan')):10.3f} "
            f"{diag.get('p_different_given_dissimilar', float('nan')):10.3f}"
            f"  {r['overrides']}"
        )
    for r in failed:
        print(f"{'error':>14}  {r['overrides']}: {r['error']}")


def main(argv):
    del argv
    grid = flags_util.exit_on_user_error("sweep", parse_grid, FLAGS.grid)
    base = flags_util.config_values()
    sweep_dir = os.path.join(FLAGS.out_dir, "sweeps", FLAGS.name)
    experiments = [
        (overrides, flags_util.exit_on_user_error(
            "sweep", config.experiment_from_flat, values))
        for overrides, values in cells(base, grid)
    ]
    rows = run_cells(experiments, sweep_dir, base["seed"])
    ranked = sorted(
        (r for r in rows if "error" not in r),
        key=lambda r: -r["validation_map"],
    )
    failed = [r for r in rows if "error" in r]
    print_table(ranked, failed)
    out = {
        "command": " ".join(sys.argv),
        "grid": FLAGS.grid,
        "base": base,
        "ranked_by": "validation_map",
        "cells": ranked + failed,
        **bench_env.provenance(),
    }
    path = os.path.join(FLAGS.out_dir, "sweeps", FLAGS.name + ".json")
    # default=str: the flat base config may hold values JSON cannot spell.
    text = json.dumps(out, indent=2, sort_keys=True, default=str)
    io_utils.write_bytes_atomic(path, (text + "\n").encode("utf-8"))
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
