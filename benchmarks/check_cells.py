"""Which stored cells would a rerun of their recorded command read back?

    python benchmarks/check_cells.py

For every entry of benchmarks/results/quality.json (cells under
benchmarks/results/cells/<name>/) and every docs/results/<dataset>_table<N>.json
(cells under docs/results/cells/<dataset>/): rebuild the base experiment
from the recorded command's flags, digest it with the recorded data
description and each cell's own settings, as `tables.cell_provenance`
does, and count the cells the
command runs as `reread` (recorded inputs match), `stale` (other flags,
recipe or protocol), `unrecorded` (written before cells recorded their
inputs) or `missing`. Reads only: no data, no features, no training.
"""

import collections
import json
import os
import re
import sys
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import quality  # noqa: E402  (also defines its flags on flags.FLAGS)

from uhga_tf import config  # noqa: E402
from uhga_tf import flags_util  # noqa: E402
from uhga_tf import tables  # noqa: E402
from uhga_tf.training import fine_tune  # noqa: E402

# A stage-two cell whose stage one the command would train anew (another
# recipe or base since) or that trained on other rows than the command's
# split: whatever the cell recorded, a rerun replaces it.
STAGE_ONE_RETRAINED = "stage one retrained"


def _reproduce_flags():
    """uhga_tf.reproduce's flags, on their own FlagValues."""
    values = flags.FlagValues()
    flags_util.define_config_flags(values)
    flags.DEFINE_integer("table", None, "", flag_values=values)
    flags.DEFINE_list("code_lengths", ["16", "32", "64", "128"], "",
                      flag_values=values)
    flags.DEFINE_integer("seeds", 1, "", flag_values=values)
    flags.DEFINE_list("methods", [], "", flag_values=values)
    flags.DEFINE_string("results_dir", "docs/results", "",
                        flag_values=values)
    return values


def _parse(values, command):
    """Parse the flags of a recorded `python <script> --flag=value ...`.

    Commands are recorded as their arguments joined by spaces, unquoted
    (`--methods=Ours (product),ITQ`): each argument starts at a " --".
    """
    arguments = re.split(r" (?=--)", command)[1:]
    values.unparse_flags()
    values(["check_cells", *arguments])
    return values


def count(cells, cells_dir, base, description, stage_two=None):
    """Counter of reread / stale / unrecorded / missing over `cells`.

    `stage_two(cell)`, where given, returns the (base, description) of a
    cell trained on a fine-tuned backbone's features, STAGE_ONE_RETRAINED,
    or None.
    """
    counts = collections.Counter()
    for cell in cells:
        inputs = stage_two(cell) if stage_two else None
        if inputs == STAGE_ONE_RETRAINED:
            counts["stale"] += 1
            continue
        cell_base, cell_description = inputs or (base, description)
        sets = types.SimpleNamespace(description=cell_description)
        expected = tables.cell_provenance(cell_base, sets, cell)["inputs"]
        path = os.path.join(cells_dir, cell.key + ".json")
        if not os.path.exists(path):
            counts["missing"] += 1
            continue
        with open(path) as f:
            recorded = json.load(f).get("provenance", {}).get("inputs")
        counts["unrecorded" if recorded is None else
               "reread" if recorded == expected else "stale"] += 1
    return counts


def quality_rows():
    with open(os.path.join(HERE, "results", "quality.json")) as f:
        entries = json.load(f)
    for name, entry in entries.items():
        values = _parse(flags.FLAGS, entry["command"])
        base = config.experiment_from_flat(flags_util.config_values(values))
        cells = tables.table_cells(
            3, [int(k) for k in values.code_lengths], values.seeds,
            values.methods)
        cells_dir = os.path.join(HERE, "results", "cells", name)
        reference_dir = os.path.join(
            HERE, "results", "cells", values.reference_cells or name)
        stage_two = (_stage_two(base, cells_dir, entry["data"],
                                values.stage_two_stock_features)
                     if values.fine_tuned_backbone else None)
        counts = count(
            [c for c in cells if c.method not in tables.REFERENCES],
            cells_dir, base, entry["data"], stage_two)
        counts.update(count(
            [c for c in cells if c.method in tables.REFERENCES],
            reference_dir, base, entry["data"]))
        yield f"quality {name}", counts


def _stage_two(base, cells_dir, description, stock_features):
    """Product cells of a --fine_tuned_backbone entry: the base with the
    backbone its seed's stage one recorded (by content), and that
    backbone's data description, or STAGE_ONE_RETRAINED where the recorded
    stage one is not what the command would read back now on the stock
    sets of `description`; None for every other cell."""

    def inputs(cell):
        path = os.path.join(cells_dir, quality.stage_one_file(cell.seed))
        if not tables.is_product(cell.method) or not os.path.exists(path):
            return None
        with open(path) as f:
            record = json.load(f)
        if not fine_tune.record_is_current(
                base, {"seed": cell.seed, **record}, description):
            return STAGE_ONE_RETRAINED
        return (quality.stage_two_experiment(
            base, record["weights_identity"], stock_features),
            record["data"])

    return inputs


def table_rows():
    results = os.path.join(REPO, "docs", "results")
    values = _reproduce_flags()
    for file_name in sorted(os.listdir(results)):
        if "_table" not in file_name or not file_name.endswith(".json"):
            continue
        with open(os.path.join(results, file_name)) as f:
            stored = json.load(f)
        _parse(values, stored["command"])
        base = config.experiment_from_flat({
            **flags_util.config_values(values),
            "code_length": int(values.code_lengths[0])})
        cells = tables.table_cells(
            values.table, [int(k) for k in values.code_lengths],
            values.seeds, values.methods or None)
        cells_dir = os.path.join(results, "cells", stored["dataset"])
        # Cells record the description with the database order; a table
        # JSON written before that order existed records it without.
        yield file_name, count(cells, cells_dir, base, stored["data"])


def main():
    os.chdir(REPO)  # recorded commands name flag files from the root
    print(f"{'command':<32}{'reread':>8}{'stale':>8}{'unrecorded':>12}"
          f"{'missing':>9}")
    for name, counts in (*quality_rows(), *table_rows()):
        print(f"{name:<32}" + "".join(
            f"{counts[key]:>{width}}" for key, width in
            (("reread", 8), ("stale", 8), ("unrecorded", 12),
             ("missing", 9))))


if __name__ == "__main__":
    main()
