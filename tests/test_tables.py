"""Table reproduction and the evaluate entry point, on synthetic features."""

import ast
import dataclasses
import glob
import hashlib
import json
import os
import subprocess
import sys
import types

import pytest

from train_fixtures import write_feature_file
from uhga_tf import config
from uhga_tf import provenance
from uhga_tf import tables
from uhga_tf.data import retrieval_sets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(tmp_path, **overrides):
    features = tmp_path / "features.npz"
    if not features.exists():
        write_feature_file(str(features))
    values = dict(
        dataset="features", data_dir=str(features),
        cache_dir=str(tmp_path / "cache"), workdir=str(tmp_path / "run"),
        code_length=16, global_batch_size=32, epochs=2,
        eval_every_epochs=2, positive_weight="auto", progress=False,
    )
    values.update(overrides)
    return config.experiment_from_flat(values)


def test_table3_cells_markdown_json_and_resume(tmp_path):
    experiment = _experiment(tmp_path)
    results_dir = str(tmp_path / "results")
    methods = ["LSH", "ITQ", "Ours"]
    markdown, summary = tables.reproduce_table(
        3, experiment, [16], 1, results_dir, methods=methods,
        command="test", progress=False,
    )
    stored = json.loads(
        (tmp_path / "results" / "features_table3.json").read_text())
    for cell in stored["cells"]:
        # JSON, Markdown and the per-cell files hold the same numbers.
        assert summary[cell["method"]][16]["values"] == [cell["map"]]
        assert f"{cell['map']:.4f} ± 0.0000" in markdown
        assert 0.0 < cell["map"] <= 1.0
    assert [c["method"] for c in stored["cells"]] == methods
    # Each cell file records the code commit once, in its provenance.
    cell_files = glob.glob(os.path.join(results_dir, "cells", "*", "*.json"))
    assert len(cell_files) == len(methods)
    for path in cell_files:
        with open(path) as f:
            cell = json.load(f)
        assert "commit" not in cell, path
        assert cell["provenance"]["commit"] == provenance.git_sha()
    assert os.path.exists(
        os.path.join(results_dir, "features_table3_map_vs_code_length.png"))
    assert os.path.exists(
        os.path.join(results_dir, "features_table3_pr_16.png"))

    # A rerun reads every finished cell instead of recomputing it.
    calls = []
    original = tables.shallow_codes
    tables.shallow_codes = lambda *a, **k: calls.append(a) or original(*a)
    try:
        again, _ = tables.reproduce_table(
            3, experiment, [16], 1, results_dir, methods=methods,
            command="test", progress=False,
        )
    finally:
        tables.shallow_codes = original
    assert calls == []
    assert again.split("\n", 6)[6] == markdown.split("\n", 6)[6]


def _legacy_inputs(experiment, description):
    """The digest cells were keyed by before locations were normalised
    (and before `config.ADDED_FIELDS` existed)."""
    from uhga_tf.evaluation import metrics

    values = experiment.to_dict()
    for section, names in config.ADDED_FIELDS.items():
        for name in names:
            del values[section][name]
    text = json.dumps({
        "data": description, "experiment": values,
        "product_recipe": config.PRODUCT_RECIPE,
        "protocol": metrics.PROTOCOL_VERSION,
    }, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_cell_inputs_ignore_where_a_run_is_written(tmp_path):
    sets = types.SimpleNamespace(description="toy data, seed-shuffled")
    experiment = _experiment(tmp_path)
    digest = tables.cell_provenance(experiment, sets)["inputs"]
    moved = dataclasses.replace(
        experiment, workdir=str(tmp_path / "elsewhere"), logdir="tb",
        progress=True,
        data=dataclasses.replace(experiment.data, data_dir="other.npz",
                                 cache_dir="/tmp/other_cache"))
    assert tables.cell_provenance(moved, sets)["inputs"] == digest
    # Everything else still counts, bookkeeping that can move numbers too.
    for section, field, value in (
        ("train", "learning_rate", 1e-3),
        ("train", "checkpoint_every_steps", 7),
        ("train", "eval_every_epochs", 1),
        ("eval", "hamming_radius", 3),
        ("data", "skip_corrupt", True),
        ("model", "feature_runtime", "tflite"),  # an added field, off default
    ):
        changed = dataclasses.replace(experiment, **{
            section: dataclasses.replace(getattr(experiment, section),
                                         **{field: value})})
        assert tables.cell_provenance(changed, sets)["inputs"] != digest, (
            field)
    ladder = dataclasses.replace(experiment, similarity=dataclasses.replace(
        experiment.similarity, similarity="coassociation"))
    learned = dataclasses.replace(ladder, similarity=dataclasses.replace(
        ladder.similarity, similarity_learned_share=0.5))
    assert (tables.cell_provenance(learned, sets)["inputs"]
            != tables.cell_provenance(ladder, sets)["inputs"])
    assert tables.cell_provenance(
        experiment, types.SimpleNamespace(description="other data")
    )["inputs"] != digest
    # At the default locations the digest is the one cells already carry.
    default = config.at_default_locations(experiment)
    assert default.workdir == "workdir" and default.data.cache_dir == "cache"
    assert default.data.data_dir == "" and default.logdir == ""
    assert default.progress is True
    assert digest == _legacy_inputs(default, sets.description)
    assert digest != _legacy_inputs(experiment, sets.description)


def test_a_product_cell_hashes_the_centring_resolved_at_its_length(
        tmp_path, monkeypatch):
    sets = types.SimpleNamespace(description="toy data, seed-shuffled")
    base = _experiment(tmp_path, code_length=64)
    product = tables.Cell(3, "Ours (product)", 16, 0)
    reference = tables.Cell(3, "ITQ", 16, 0)
    # A recipe that follows the code length (the shipped one fixes c).
    monkeypatch.setitem(tables.DEEP_METHODS, "Ours (product)", {
        **tables.DEEP_METHODS["Ours (product)"],
        "similarity_centring": "auto"})
    # The base resolves `auto` at its own 64 bits; the cell at its 16.
    assert tables.cell_experiment(product, base).similarity \
        .similarity_centring == 0.0
    assert tables.cell_experiment(
        dataclasses.replace(product, code_length=64), base
    ).similarity.similarity_centring == 0.5
    assert tables.cell_experiment(reference, base) is None

    def inputs(cell):
        return tables.cell_provenance(base, sets, cell)["inputs"]

    before = inputs(product), inputs(reference)
    assert tables.cell_provenance(base, sets)["inputs"] not in before
    # Another rule for `auto` stales the product cell it changes, and only it.
    monkeypatch.setattr(config, "centring_for_code_length", lambda k: 0.75)
    assert inputs(product) != before[0]
    assert inputs(reference) == before[1]


def test_a_reference_cell_hashes_its_options_defaults_included(
        tmp_path, monkeypatch):
    from uhga_tf.baselines import structural

    sets = types.SimpleNamespace(description="toy data, seed-shuffled")
    base = _experiment(tmp_path)
    cells = [tables.Cell(3, method, 16, 0)
             for method in ("k-means+LS", "ITQ (unit)", "ITQ")]
    before = [tables.cell_provenance(base, sets, c)["inputs"] for c in cells]
    assert len(set(before)) == 3
    settings = tables.reference_settings("ITQ (unit, database)")
    assert settings["fit_set"] == "database"
    assert settings["options"]["unit_rows"] is True
    # A changed default of one hasher stales that reference's cells only.
    monkeypatch.setattr(structural.KMeansLS, "DEFAULT_OPTIONS", {
        **structural.KMeansLS.DEFAULT_OPTIONS, "knn": 7})
    after = [tables.cell_provenance(base, sets, c)["inputs"] for c in cells]
    assert after[0] != before[0] and after[1:] == before[1:]


def test_a_cell_is_reread_from_another_workdir(tmp_path, monkeypatch):
    experiment = _experiment(tmp_path)
    sets = retrieval_sets.load_retrieval_sets(
        experiment.data, experiment.model, experiment.train.seed,
        progress=False)
    # The sets name the split they were drawn with (stage two reads the
    # stock features on it).
    assert sets.split_seed == experiment.train.seed
    cell = tables.Cell(3, "LSH", 16, 0)
    cells_dir = str(tmp_path / "cells")
    # As stored: JSON turns the int keys of precision_at_n into strings.
    first = json.loads(json.dumps(
        tables.run_cell(cell, experiment, sets, cells_dir)))
    monkeypatch.setattr(tables, "shallow_codes", None)  # no recomputation
    moved = dataclasses.replace(
        experiment, workdir=str(tmp_path / "run2"), progress=True,
        data=dataclasses.replace(experiment.data,
                                 cache_dir=str(tmp_path / "cache2")))
    assert tables.run_cell(cell, moved, sets, cells_dir) == first


def _results_dir_default(path):
    """The default of --results_dir in a command's source."""
    tree = ast.parse(open(os.path.join(REPO, path)).read())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call)
                and getattr(node.func, "attr", "") == "DEFINE_string"
                and node.args[0].value == "results_dir"):
            return node.args[1].value
    raise AssertionError(f"no --results_dir in {path}")


def test_quality_and_reproduce_keep_their_cells_apart():
    """Both store cells under <results_dir>/cells/<collection>/ and both
    have ITQ rows: their default folders differ, and every stored cell
    folder is where its own command looks."""
    assert _results_dir_default("uhga_tf/reproduce.py") == "docs/results"
    assert _results_dir_default("benchmarks/quality.py") == (
        "benchmarks/results")
    with open(os.path.join(REPO, "benchmarks/results/quality.json")) as f:
        quality_entries = set(json.load(f))
    table_datasets = {
        name.split("_table")[0]
        for name in os.listdir(os.path.join(REPO, "docs/results"))
        if "_table" in name and name.endswith(".json")
    }
    assert set(os.listdir(os.path.join(REPO, "docs/results/cells"))) <= (
        table_datasets)
    assert set(os.listdir(os.path.join(REPO, "benchmarks/results/cells"))) <= (
        quality_entries)


def test_paper_numbers_sit_beside_ours():
    assert tables.paper_value(3, "Ours+GA", 64, "cifar10") == 0.3499
    assert tables.paper_value(1, 0.2, 16, "cifar10") == 0.2940
    assert tables.paper_value(3, "LSH", 64, "cifar10") is None
    assert tables.paper_value(3, "ITQ", 64, "fashion_mnist") is None


@pytest.mark.parametrize(
    "table, methods, fragment",
    [(4, None, "table must be 1, 2 or 3"),
     (3, ["KNN"], r"unknown method\(s\) \['KNN'\]; choose from \[[^;]*\]$"),
     # What absl makes of --methods=ITQ (unit, database) without quotes.
     (3, ["ITQ (unit", "database)"],
      r"unknown method.*a name with a comma goes in double quotes")],
)
def test_bad_table_or_method(table, methods, fragment):
    with pytest.raises(ValueError, match=fragment):
        tables.table_cells(table, [16], 1, methods)


def test_evaluate_cli_baseline_writes_metrics_and_plots(tmp_path):
    features = write_feature_file(str(tmp_path / "features.npz"))
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "uhga_tf.evaluate", "--baseline=itq",
         "--dataset=features", f"--data_dir={features}", "--code_length=16",
         f"--cache_dir={tmp_path / 'cache'}", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"MAP {metrics['map']:.4f}" in result.stdout
    assert metrics["num_query"] == 40 and metrics["code_length"] == 16
    assert (out / "pr.png").exists() and (out / "precision_at_n.png").exists()

    bad = subprocess.run(
        [sys.executable, "-m", "uhga_tf.evaluate", "--baseline=knn",
         "--dataset=features", f"--data_dir={features}",
         f"--cache_dir={tmp_path / 'cache'}", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 1
    assert "baseline must be one of" in bad.stderr
