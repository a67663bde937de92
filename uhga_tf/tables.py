"""Codes from any method, evaluated on one set of features; the paper's tables.

`encode_sets` turns a trained UHGA workdir, an exported SavedModel or a
shallow baseline into query/database codes on the same `RetrievalSets`;
`evaluate_method` adds the protocol.md metrics; `reproduce_table` runs every
cell of Table 1, 2 or 3 (resumable: each finished cell is a JSON file that a
rerun reads instead of recomputing) and writes the Markdown table, JSON and
plots beside the paper's numbers.
"""

import dataclasses
import json
import os
import time

import numpy as np
from absl import logging

from uhga_tf import codes as codes_lib
from uhga_tf import config as config_lib
from uhga_tf import io_utils
from uhga_tf import provenance
# Re-exported: the table cells and benchmarks/quality.py name the code
# references through this module.
from uhga_tf.baselines.references import ITQ_VARIANTS  # noqa: F401
from uhga_tf.baselines.references import REFERENCES
from uhga_tf.baselines.references import SHALLOW_METHODS  # noqa: F401
from uhga_tf.baselines.references import STRUCTURAL_REFERENCES  # noqa: F401
from uhga_tf.baselines.references import Reference  # noqa: F401
from uhga_tf.baselines.references import reference_settings
from uhga_tf.baselines.references import shallow_codes

CODE_LENGTHS = (16, 32, 64, 128)
LAMBDAS = tuple(round(0.1 * i, 1) for i in range(10))
DEEP_METHODS = {
    # method -> config overrides (method.md §14).
    "SSDH": {"loss": "ssdh_l2", "attention": False, "ssdh_alpha": 2.0,
             "ssdh_beta": 2.0, "scale_schedule": "none"},
    "SSDH+GA": {"loss": "ssdh_l2", "attention": True, "ssdh_alpha": 2.0,
                "ssdh_beta": 2.0, "scale_schedule": "none"},
    "Ours": {"loss": "ga_logistic", "attention": False},
    "Ours+GA": {"loss": "ga_logistic", "attention": True},
    # The product recipe (config.PRODUCT_RECIPE), with and without GA.
    "Ours (product)": {"loss": "ga_logistic", "attention": False,
                       **config_lib.PRODUCT_RECIPE},
    "Ours+GA (product)": {"loss": "ga_logistic", "attention": True,
                          **config_lib.PRODUCT_RECIPE},
}
TABLE_METHODS = {
    2: ("SSDH", "SSDH+GA", "Ours", "Ours+GA"),
    3: ("LSH", "PCAH", "SH", "SpH", "ITQ", "DSH", "SSDH", "SSDH+GA", "Ours",
        "Ours+GA"),
}
# protocol.md §8, CIFAR-10 MAP@ALL at 16/32/64/128 bits.
PAPER_CIFAR10 = {
    "SH": (.1621, .1575, .1549, .1548),
    "SpH": (.1664, .1745, .1931, .1992),
    "ITQ": (.1999, .2098, .2229, .2312),
    "DSH": (.1686, .1846, .1955, .2071),
    "HashGAN": (.2457, .2678, .3077, .3422),
    "USDH": (.2613, .3021, .3122, .3241),
    "SSDH": (.2172, .2313, .2405, .2351),
    "SSDH+GA": (.2827, .3018, .3219, .3462),
    "Ours": (.2704, .3133, .3240, .3452),
    "Ours+GA": (.2936, .3233, .3499, .3661),
}
PAPER_TABLE1_CIFAR10 = {
    0.0: (.1015, .3091, .3744, .3739), 0.1: (.1015, .3080, .3413, .3668),
    0.2: (.2940, .3204, .3464, .3704), 0.3: (.2841, .3283, .3508, .3688),
    0.4: (.2854, .3309, .3470, .3653), 0.5: (.2837, .3195, .3404, .3629),
    0.6: (.2822, .3096, .3276, .3347), 0.7: (.2199, .2428, .2650, .2993),
    0.8: (.1677, .2008, .2380, .2900), 0.9: (.1576, .1932, .2334, .2888),
}
# GA's defaults per code length (method.md §10.3, CIFAR-10).
CIFAR_RATES = {16: (1e-3, 0.08), 32: (1e-3, 0.08), 64: (5e-4, 0.05),
               128: (5e-4, 0.05)}


def paper_value(table, method, code_length, dataset):
    """The paper's CIFAR-10 number for a cell, or None."""
    if dataset != "cifar10" or code_length not in CODE_LENGTHS:
        return None
    column = CODE_LENGTHS.index(code_length)
    if table == 1:
        row = PAPER_TABLE1_CIFAR10.get(method)
    else:
        row = PAPER_CIFAR10.get(method)
    return None if row is None else row[column]


def workdir_codes(workdir, sets):
    """Codes from a trained UHGA workdir (`hasher.keras`)."""
    import keras

    from uhga_tf.models import hash_layer  # noqa: F401 (registers HashLayer)

    path = os.path.join(workdir, "hasher.keras")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no hasher.keras in {workdir!r}: training has not finished there"
        )
    hasher = keras.saving.load_model(path)
    experiment = config_lib.load_experiment(workdir)
    if experiment.model.trainable_backbone:
        # A fine-tuned backbone: the cached features are stale, encode images.
        from uhga_tf.training import image_inputs

        encoder = image_inputs.ImageEncoder(
            hasher, sets, sets.image_dataset,
            int(hasher.input_shape[1]),
        )
        return tuple(
            codes_lib.binarize(encoder(name)) for name in ("query", "database")
        )
    from uhga_tf.training import run as run_lib

    return tuple(
        run_lib.encode(hasher, sets.features[name])
        for name in ("query", "database")
    )


def saved_model_codes(model_dir, sets):
    """Codes from an exported SavedModel's `encode_features` signature."""
    import tensorflow as tf

    from uhga_tf.saved_model import wire_names

    signature = tf.saved_model.load(model_dir).signatures[
        wire_names.SIGNATURE_FEATURES
    ]
    out = []
    for name in ("query", "database"):
        features = sets.features[name]
        parts = [
            signature(
                **{wire_names.INPUT_FEATURES: tf.constant(features[i:i + 4096])}
            )[wire_names.OUTPUT_CODES]
            for i in range(0, len(features), 4096)
        ]
        out.append(np.concatenate([p.numpy() for p in parts]))
    return tuple(out)


def evaluate_method(query_codes, database_codes, sets, eval_config):
    """protocol.md metrics (dict) for codes on the sets' labels."""
    from uhga_tf.evaluation import metrics

    return metrics.evaluate_codes(
        query_codes, database_codes,
        sets.labels["query"], sets.labels["database"],
        top_k=eval_config.top_k or None,
        ap_denominator=eval_config.ap_denominator,
        empty_query=eval_config.empty_query,
        hamming_radius=eval_config.hamming_radius,
    )


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (method or lambda, code_length, seed) entry of a table."""

    table: int
    method: str
    code_length: int
    seed: int

    @property
    def key(self):
        # Tables 2 and 3 share their deep rows: one stored cell serves both.
        row = f"lambda{self.method}" if self.table == 1 else self.method
        if is_product(self.method):
            # A changed recipe must not read the old recipe's cells.
            row = row.replace(" (product)", "_product_" + recipe_digest())
        return f"{row}_{self.code_length}_s{self.seed}"


def is_product(method):
    return method.endswith("(product)")


def recipe_digest():
    return provenance.short_hash(config_lib.PRODUCT_RECIPE)[:8]


def table_cells(table, code_lengths, seeds, methods=None):
    """Every cell a table needs, in the order they run."""
    if table not in (1, 2, 3):
        raise ValueError(f"table must be 1, 2 or 3; received table={table}")
    if table == 1:
        rows = [f"{value:.1f}" for value in LAMBDAS]
    else:
        rows = list(methods or TABLE_METHODS[table])
        unknown = [
            m for m in rows if m not in DEEP_METHODS and m not in
            REFERENCES
        ]
        if unknown:
            known = sorted(DEEP_METHODS) + sorted(REFERENCES)
            # absl splits a list flag at every comma outside double quotes.
            split = any(m.startswith(u) for u in unknown for m in known
                        if "," in m)
            raise ValueError(
                f"unknown method(s) {unknown}; choose from {known}"
                + ('; a name with a comma goes in double quotes inside the '
                   'list, e.g. --methods=ITQ,"ITQ (unit, database)"'
                   if split else "")
            )
    return [
        Cell(table, row, code_length, seed)
        for code_length in code_lengths
        for row in rows
        for seed in range(seeds)
    ]


def run_cell(cell, base_experiment, sets, cells_dir, progress=False):
    """Run one cell (or read its stored result); return the result dict."""
    path = os.path.join(cells_dir, cell.key + ".json")
    record = cell_provenance(base_experiment, sets, cell)
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("provenance", {}).get("inputs") == record["inputs"]:
            return stored
        logging.info("%s: stored cell is stale (other inputs); rerun", path)
    start = time.time()
    from uhga_tf.training import run as run_lib

    experiment = cell_experiment(cell, base_experiment, cells_dir, progress)
    if experiment is None:
        query_codes, database_codes, validation_codes = shallow_codes(
            cell.method, cell.code_length, sets, cell.seed,
            encode=("query", "database", "validation"))
        result = evaluate_method(
            query_codes, database_codes, sets, base_experiment.eval)
        result.update(run_lib.validation_metrics(
            validation_codes, database_codes, sets))
    else:
        result = run_lib.run_experiment(experiment, sets=sets)
        # The cell's provenance records the commit, as for every other row.
        result.pop("commit", None)
    result.update(
        cell=dataclasses.asdict(cell), cell_wall_time_s=time.time() - start,
        provenance=record)
    io_utils.write_json_atomic(path, result, indent=1)
    return result


def cell_experiment(cell, base_experiment, cells_dir="", progress=False):
    """The experiment a deep cell trains; None for a code reference.

    The base flags with the method's overrides, the cell's code length and
    seed. Fields that follow the code length (``similarity_centring=auto``)
    are resolved here, per cell, and not at the base's length.
    """
    if cell.method in REFERENCES:
        return None
    flat = dict(
        workdir=os.path.join(cells_dir, "runs", cell.key),
        logdir="", progress=progress,
    )
    if cell.table == 1:
        flat.update(DEEP_METHODS["Ours+GA"])
        flat["similarity_lambda"] = float(cell.method)
    else:
        flat.update(DEEP_METHODS[cell.method])
    if not is_product(cell.method):
        learning_rate, attention_lr = CIFAR_RATES.get(
            cell.code_length, CIFAR_RATES[64])
        flat.update(learning_rate=learning_rate,
                    attention_learning_rate=attention_lr)
    flat.update(code_length=cell.code_length, seed=cell.seed)
    return config_lib.with_values(base_experiment, flat)


def cell_provenance(base_experiment, sets, cell=None):
    """What a stored cell came from; a cell whose inputs differ is rerun.

    ``inputs`` (the data and its database order, the experiment's flags,
    the product recipe and the evaluation protocol) decides staleness;
    ``commit`` records the code it ran on. The flags are hashed with
    `config.LOCATION_FIELDS` (workdir, logdir, progress, data_dir,
    cache_dir) at their defaults and a backbone weights file by its
    content (`provenance.experiment_digest`): where a run is written or its data read
    from does not change a cell, and cells run at the defaults keep the
    digest they had before. With a ``cell``, a deep cell also hashes the
    experiment it trains (`cell_experiment`), so a value resolved from its
    code length (``similarity_centring=auto``) is among its inputs, and a
    code reference hashes its hasher, options (defaults included) and fit
    set (`references.reference_settings`): a changed rule or default
    reruns the cells it changes.
    """
    from uhga_tf.evaluation import metrics

    inputs = {
        "data": sets.description,
        "experiment": provenance.experiment_digest(base_experiment),
        "product_recipe": config_lib.PRODUCT_RECIPE,
        "protocol": metrics.PROTOCOL_VERSION,
    }
    if cell is not None and cell.method in REFERENCES:
        inputs["reference"] = reference_settings(cell.method)
    elif cell is not None:
        inputs["cell_experiment"] = provenance.experiment_digest(
            cell_experiment(cell, base_experiment))
    return {
        "inputs": provenance.short_hash(inputs),
        "data": sets.description,
        "commit": provenance.git_sha(),
    }


def summarise(table, cells, results, dataset):
    """{row: {code_length: {mean, std, values, paper}}}."""
    summary = {}
    for cell, result in zip(cells, results):
        entry = summary.setdefault(cell.method, {}).setdefault(
            cell.code_length, {"values": []})
        entry["values"].append(result["map"])
    for method, per_length in summary.items():
        for code_length, entry in per_length.items():
            values = np.array(entry["values"])
            key = float(method) if table == 1 else method
            entry.update(
                mean=float(values.mean()), std=float(values.std()),
                paper=paper_value(table, key, code_length, dataset),
            )
    return summary


def markdown_table(table, summary, code_lengths, header_lines):
    """Markdown: mean ± std beside the paper's number in every cell."""
    first = "similarity_lambda" if table == 1 else "method"
    lines = list(header_lines) + [
        "",
        f"| {first} | " + " | ".join(f"{k} bits" for k in code_lengths)
        + " |",
        "|---|" + "---|" * len(code_lengths),
    ]
    for method, per_length in summary.items():
        cells = []
        for k in code_lengths:
            entry = per_length.get(k)
            if entry is None:
                cells.append("–")
                continue
            text = f"{entry['mean']:.4f} ± {entry['std']:.4f}"
            if entry["paper"] is not None:
                text += f" (paper {entry['paper']:.4f})"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reproduce_table(
    table, base_experiment, code_lengths, seeds, results_dir, methods=None,
    command="", progress=True,
):
    """Run (or resume) every cell of a table; write .md, .json and PNGs.

    Returns:
        (markdown text, summary dict).
    """
    from uhga_tf.data import retrieval_sets

    dataset = base_experiment.data.dataset
    cells = table_cells(table, code_lengths, seeds, methods)
    sets = retrieval_sets.load_retrieval_sets(
        base_experiment.data, base_experiment.model,
        base_experiment.train.seed, progress=progress,
    )
    start = time.time()
    results = _run_cells(
        table, cells, base_experiment, sets,
        os.path.join(results_dir, "cells", dataset), progress,
    )
    summary = summarise(table, cells, results, dataset)
    header = _table_header(
        table, base_experiment, seeds, command, sets, results,
        time.time() - start,
    )
    markdown = markdown_table(table, summary, code_lengths, header)
    stem = os.path.join(results_dir, f"{dataset}_table{table}")
    io_utils.write_bytes_atomic(stem + ".md", markdown.encode("utf-8"))
    io_utils.write_json_atomic(stem + ".json", {
        "table": table, "dataset": dataset, "command": command,
        "code_lengths": list(code_lengths), "seeds": seeds,
        "summary": summary,
        "cells": [
            {**dataclasses.asdict(c), "map": r["map"],
             "map_tie_aware": r.get("map_tie_aware")}
            for c, r in zip(cells, results)
        ],
        "data": sets.description,
    }, indent=1)
    _write_plots(table, summary, cells, results, code_lengths, dataset, stem)
    return markdown, summary


def _run_cells(table, cells, base_experiment, sets, cells_dir, progress):
    """Results of every cell, in order, with a progress bar."""
    from tqdm import tqdm

    results = []
    for cell in tqdm(cells, desc=f"table {table}", unit="cell",
                     disable=not progress):
        results.append(run_cell(cell, base_experiment, sets, cells_dir))
        logging.info("%s: MAP %.4f", cell.key, results[-1]["map"])
    return results


def _table_header(table, base_experiment, seeds, command, sets, results,
                  wall):
    """The Markdown lines above a table: command, data, budget, caveats."""
    dataset = base_experiment.data.dataset
    cell_seconds = sum(r.get("cell_wall_time_s", 0.0) for r in results)
    return [
        f"# {dataset} Table {table} (regenerated by uhga_tf)",
        "",
        f"- command: `{command}`",
        f"- data: {sets.description}",
        f"- epochs (deep methods): {base_experiment.train.epochs}; "
        f"seeds: {seeds}; metric: MAP@"
        f"{base_experiment.eval.top_k or 'ALL'} (stable ties by database "
        "index)",
        f"- compute time: {cell_seconds:.0f} s summed over the cells, each "
        f"timed when it ran (this invocation: {wall:.0f} s; stored cells "
        "are read, not rerun)",
        "- paper numbers: UHGA (Symmetry 2020), AlexNet fc7 features and "
        "the original CIFAR-10 binaries; ours use the backbone above and "
        "JPEG-re-encoded CIFAR-10, so compare rows, not absolute values",
    ]


def _write_plots(table, summary, cells, results, code_lengths, dataset,
                 stem):
    """Table 1: the lambda sweep; tables 2-3: MAP vs bits and PR curves."""
    from uhga_tf.evaluation import plots

    if table == 1:
        _plot_sweep(summary, code_lengths, dataset, stem + "_sweep.png")
        return
    plots.plot_map_vs_code_length(
        {m: {k: e["mean"] for k, e in v.items()}
         for m, v in summary.items()},
        stem + "_map_vs_code_length.png",
        paper={m: dict(zip(CODE_LENGTHS, PAPER_CIFAR10[m]))
               for m in summary if m in PAPER_CIFAR10}
        if dataset == "cifar10" else None,
    )
    pr_length = 64 if 64 in code_lengths else code_lengths[-1]
    plots.plot_pr_curves(
        {c.method: r["pr_curve"] for c, r in zip(cells, results)
         if c.code_length == pr_length and c.seed == 0},
        stem + f"_pr_{pr_length}.png",
    )


def _plot_sweep(summary, code_lengths, dataset, path):
    """MAP vs similarity_lambda, ours solid and the paper's dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    lambdas = sorted(summary, key=float)
    for code_length in code_lengths:
        ours = [summary[m][code_length]["mean"] for m in lambdas]
        line, = axes.plot([float(m) for m in lambdas], ours, marker="o",
                          label=f"ours, {code_length} bits")
        paper = [summary[m][code_length]["paper"] for m in lambdas]
        if dataset == "cifar10" and None not in paper:
            axes.plot([float(m) for m in lambdas], paper, linestyle="--",
                      marker="x", color=line.get_color(),
                      label=f"paper, {code_length} bits")
    axes.set_xlabel("similarity_lambda")
    axes.set_ylabel("MAP")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    with io_utils.atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(figure)
