"""The training entry point: bad input, end-to-end run, kill and resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train_fixtures import write_feature_file

# Long enough (7 steps per epoch) that the kill lands mid-run.
EPOCHS = 60
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "uhga_tf.train", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _tiny_args(tmp_path, workdir="run", **overrides):
    features = tmp_path / "features.npz"
    if not features.exists():
        write_feature_file(str(features))
    values = {
        "dataset": "features",
        "data_dir": str(features),
        "cache_dir": str(tmp_path / "cache"),
        "workdir": str(tmp_path / workdir),
        "code_length": 16,
        "global_batch_size": 32,
        "epochs": 3,
        "eval_every_epochs": 1,
        "checkpoint_every_steps": 3,
        "learning_rate": 0.01,
        "positive_weight": "auto",
        "noprogress": None,
    }
    values.update(overrides)
    return [
        f"--{k}" if v is None else f"--{k}={v}" for k, v in values.items()
    ]


@pytest.mark.parametrize(
    "flag, fragment",
    [
        ("--code_length=12", "code_length must be a multiple of 8"),
        ("--code_length=2000", "code_length must be a multiple of 8"),
        ("--learning_rate=0", "learning_rate must be > 0"),
        ("--attention_learning_rate=-0.1", "attention_learning_rate"),
        ("--global_batch_size=1", "global_batch_size must be >= 2"),
        ("--strategy=ring", "strategy must be one of"),
        ("--loss=hinge", "loss must be one of"),
        ("--similarity=spectral", "similarity must be one of"),
        ("--similarity_clusters=1", "similarity_clusters must be >= 2"),
        ("--similarity_knn=0", "similarity_knn must be > 0"),
        ("--similarity_dissimilar_quantile=1.5",
         "similarity_dissimilar_quantile must be in (0, 1)"),
        ("--balance_weight=-1", "balance_weight must be >= 0"),
    ],
)
def test_bad_flag_is_one_line_and_writes_nothing(tmp_path, flag, fragment):
    workdir = tmp_path / "run"
    result = _train([f"--workdir={workdir}", flag])
    assert result.returncode == 1, result.stderr
    assert fragment in result.stderr.strip().splitlines()[-1]
    assert result.stderr.strip().splitlines()[-1].startswith("uhga_tf.train:")
    assert not workdir.exists()


def test_missing_flagfile_fails(tmp_path):
    result = _train([f"--flagfile={tmp_path / 'nope.flags'}"])
    assert result.returncode != 0
    assert "nope.flags" in result.stderr


def test_malformed_tf_config_fails(tmp_path):
    workdir = tmp_path / "run"
    result = _train(
        [f"--workdir={workdir}", "--strategy=multi_worker"],
        env={"TF_CONFIG": "{not json"},
    )
    assert result.returncode == 1
    assert "TF_CONFIG must be JSON" in result.stderr
    assert not workdir.exists()


def _assert_tensorboard_tags(logdir):
    from tensorboard.backend.event_processing import event_accumulator

    tags = set()
    for sub in ("codes", "train"):
        events = event_accumulator.EventAccumulator(
            str(logdir / sub), size_guidance={"tensors": 0})
        events.Reload()
        tags |= set(events.Tags()["tensors"])
    expected = {
        "relaxed_codes", "attention_weights", "bits_flipped",
        "validation_map", "bit_balance", "quantization_gap",
        "epoch_pair_loss",
        "epoch_lookahead_loss", "epoch_attention_loss",
        "epoch_attention_mean", "epoch_attention_std", "epoch_learning_rate",
    }
    assert expected <= tags, expected - tags


def test_train_resume_and_foreign_checkpoint(tmp_path):
    """Train, kill mid-run after a checkpoint, resume to the same weights."""
    import keras

    from uhga_tf.models import hash_layer  # noqa: F401 (registers HashLayer)

    # Uninterrupted reference run.
    done = _train(_tiny_args(tmp_path, workdir="reference", epochs=EPOCHS))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MAP@ALL" in done.stdout
    reference = tmp_path / "reference"
    config = json.loads((reference / "config.json").read_text())
    assert config["model"]["code_length"] == 16
    lines = (reference / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(
        range(1, EPOCHS + 1)
    )
    assert "validation_map" in json.loads(lines[-1])
    _assert_tensorboard_tags(reference / "logs")
    results = json.loads((reference / "results.json").read_text())
    # 120 train rows / 16 per branch = 7 steps per epoch.
    assert results["steps"] == 7 * EPOCHS
    assert results["resumed_from_step"] == 0
    # Four well-separated clusters: cosine ranking scores 0.93, chance 0.25.
    assert results["map"] > 0.8

    # Killed run: SIGKILL once a checkpoint past step 10 exists.
    args = _tiny_args(tmp_path, workdir="killed", epochs=EPOCHS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uhga_tf.train", *args], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    ckpt_index = tmp_path / "killed" / "checkpoints" / "checkpoint"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        # Parse the latest number: a substring test for "ckpt-12" misses
        # once 12 is rotated out, and the run then finishes unkilled.
        latest = re.search(
            r'^model_checkpoint_path: "ckpt-(\d+)"',
            ckpt_index.read_text() if ckpt_index.exists() else "", re.M)
        if latest and int(latest[1]) >= 12:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "killed" / "results.json").exists()

    resumed = _train(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(re.search(r"resuming from step (\d+)", resumed.stderr)[1])
    assert step >= 12
    results = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert results["resumed_from_step"] == step
    assert results["steps"] == 7 * EPOCHS
    a = keras.saving.load_model(str(reference / "hasher.keras"))
    b = keras.saving.load_model(str(tmp_path / "killed" / "hasher.keras"))
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=0, atol=1e-6)

    # The same workdir with another code length is refused, untouched.
    before = (reference / "config.json").read_text()
    foreign = _train(_tiny_args(tmp_path, workdir="reference", code_length=32))
    assert foreign.returncode == 1
    assert "holds a checkpoint of another model" in foreign.stderr
    assert (reference / "config.json").read_text() == before


def test_hasher_init_does_not_depend_on_a_feature_cache_hit(tmp_path):
    """A backbone built for extraction must not shift the hasher's init."""
    import keras

    from uhga_tf import config
    from uhga_tf.data import retrieval_sets
    from uhga_tf.training import run as run_lib

    def experiment(name):
        flat = {}
        for arg in _tiny_args(tmp_path, workdir=name, epochs=1):
            key, _, value = arg[2:].partition("=")
            flat[key] = value
        flat.pop("noprogress")
        return config.experiment_from_flat(dict(
            flat, code_length=16, global_batch_size=32, epochs=1,
            eval_every_epochs=1, checkpoint_every_steps=3,
            learning_rate=0.01, progress=False,
        ))

    cached = run_lib.run_experiment(experiment("cached"))
    original = retrieval_sets.load_retrieval_sets

    def extracting(*args, **kwargs):
        keras.layers.Dense(7).build((None, 5))  # what extraction draws
        return original(*args, **kwargs)

    retrieval_sets.load_retrieval_sets = extracting
    try:
        fresh = run_lib.run_experiment(experiment("fresh"))
    finally:
        retrieval_sets.load_retrieval_sets = original
    assert fresh["map"] == cached["map"]
    a = keras.saving.load_model(str(tmp_path / "cached" / "hasher.keras"))
    b = keras.saving.load_model(str(tmp_path / "fresh" / "hasher.keras"))
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"similarity": "knn", "similarity_knn": 120},
         "similarity_knn must be in [1, N) = [1, 120)"),
        ({"similarity": "manifold", "similarity_clusters": 121},
         "or in [2, N] = [2, 120]"),
    ],
)
def test_structured_similarity_parameters_checked_against_n(
    tmp_path, overrides, fragment
):
    result = _train(_tiny_args(tmp_path, **overrides))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("uhga_tf.train:") and fragment in last
    assert not (tmp_path / "run").exists()


def _constant_feature_file(path, nan_row=None):
    """Every row the same vector: no pair can be told apart."""
    write_feature_file(str(path))
    data = dict(np.load(path))
    data["features"] = np.ones_like(data["features"])
    if nan_row is not None:
        data["features"][nan_row] = np.nan
    np.savez(path, **data)
    return path


def test_s_without_dissimilar_pairs_names_the_flags(tmp_path):
    features = _constant_feature_file(tmp_path / "same.npz")
    result = _train(_tiny_args(
        tmp_path, data_dir=str(features), similarity="cluster",
        similarity_clusters=4, similarity_runs=1,
    ))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "no dissimilar pair" in last and "similarity_clusters" in last
    assert not (tmp_path / "run").exists()


def test_nan_feature_rows_are_refused(tmp_path):
    features = _constant_feature_file(tmp_path / "nan.npz", nan_row=15)
    result = _train(_tiny_args(
        tmp_path, data_dir=str(features), similarity="knn",
        similarity_knn=5,
    ))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("uhga_tf.train:") and "NaN" in last
    assert not (tmp_path / "run").exists()


def test_collapsed_run_stops_instead_of_reporting_map(tmp_path):
    # Identical features give identical codes whatever is learned.
    features = _constant_feature_file(tmp_path / "same.npz")
    result = _train(_tiny_args(
        tmp_path, data_dir=str(features), positive_weight="10", epochs=1,
        noattention=None,
    ))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "training collapsed" in last
    assert "MAP@ALL" not in result.stdout


def test_unlabelled_collection_trains_and_says_why_there_is_no_map(tmp_path):
    with np.load(write_feature_file(str(tmp_path / "labelled.npz"))) as npz:
        np.savez(tmp_path / "photos.npz", features=npz["features"])
    args = _tiny_args(tmp_path, data_dir=str(tmp_path / "photos.npz"),
                      epochs=1)
    refused = _train(args)
    assert refused.returncode == 1
    assert "split=collection" in refused.stderr.strip().splitlines()[-1]
    result = _train(args + ["--split=collection"])
    assert result.returncode == 0, result.stderr
    # 240 rows: 24 queries held out, 216 database codes.
    assert result.stdout.startswith(
        "unlabelled collection (Ours+GA, 16 bits): no MAP without labels; "
        "216 database codes,")
    with open(tmp_path / "run" / "results.json") as f:
        stored = json.load(f)
    assert stored["labelled"] is False and stored["num_database"] == 216
