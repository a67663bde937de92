"""A fitted reference as a Keras hasher and a workdir that exports."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import model_fixtures
from train_fixtures import write_feature_file
from uhga_tf import codes as codes_lib
from uhga_tf import saved_model
from uhga_tf.baselines import base
from uhga_tf.models import hash_layer


def test_feature_centring_normalises_rows_first(tmp_path):
    layer = hash_layer.FeatureCentring(
        mean=np.array([0.8, 0.4], np.float32), unit_rows=True)
    out = np.asarray(layer(np.array([[3.0, 4.0], [2.0, 0.0]], np.float32)))
    # Unit rows (0.6, 0.8) and (1, 0), minus the mean (0.8, 0.4).
    np.testing.assert_allclose(out, [[-0.2, 0.4], [0.2, -0.4]], atol=1e-6)
    assert hash_layer.FeatureCentring.from_config(
        layer.get_config()).unit_rows


def _clustered(seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.0, 1.0, size=(4, 16))
    labels = np.repeat(np.arange(4), 60)
    return np.maximum(
        centers[labels] + 0.25 * rng.normal(size=(240, 16)), 0.0)


@pytest.mark.parametrize("name,options", [
    ("itq", {"unit_rows": True}),
    ("kmeans_ls", {"knn": 5, "cluster_size": 10}),
])
def test_linear_hasher_gives_the_reference_codes(name, options):
    features = _clustered()
    hasher = base.get_hasher(name, 8, **options).fit(features, seed=0)
    model = hash_layer.linear_hasher(
        hasher.linear_map(), hasher.mean, hasher.options["unit_rows"])
    codes = codes_lib.binarize(np.asarray(model(features.astype("float32"))))
    np.testing.assert_array_equal(codes, hasher.encode(features))


def test_spectral_hashing_has_no_linear_map():
    hasher = base.get_hasher("sh", 8).fit(_clustered(), seed=0)
    with pytest.raises(ValueError, match="one matrix product"):
        hasher.linear_map()


def test_unit_row_hasher_travels_inside_the_saved_model(tmp_path):
    backbone, _ = model_fixtures.tiny_models(8)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(5, model_fixtures.IMAGE_SIZE,
                                        model_fixtures.IMAGE_SIZE, 3),
                          dtype=np.uint8)
    features = np.asarray(backbone(saved_model.preprocess_images(
        pixels, model_fixtures.IMAGE_SIZE)))
    kernel = rng.normal(size=(model_fixtures.FEATURE_DIM, 8))
    mean = rng.normal(size=model_fixtures.FEATURE_DIM) * 0.1
    hasher = hash_layer.linear_hasher(kernel, mean, unit_rows=True)
    path = str(tmp_path / "hasher.keras")
    hasher.save(path)
    reloaded = keras.models.load_model(path)
    # Scaling a row leaves unit-row codes unchanged.
    expected = codes_lib.binarize(np.asarray(reloaded(features)))
    np.testing.assert_array_equal(
        codes_lib.binarize(np.asarray(reloaded(7.0 * features))), expected)
    out_dir = saved_model.export_saved_model(
        backbone, reloaded, str(tmp_path / "model"),
        image_size=model_fixtures.IMAGE_SIZE)
    served = tf.saved_model.load(out_dir).signatures["encode_features"](
        features=tf.constant(features))["codes"].numpy()
    np.testing.assert_array_equal(served, expected)


def _experiment(tmp_path, data, workdir="ref"):
    from uhga_tf import config

    return config.experiment_from_flat(dict(
        dataset="features", data_dir=str(data),
        cache_dir=str(tmp_path / "cache"), workdir=str(tmp_path / workdir),
        code_length=8, progress=False))


def test_fit_reference_workdir_writes_what_export_reads(tmp_path):
    from uhga_tf import config
    from uhga_tf.baselines import reference_workdir
    from uhga_tf.baselines.references import shallow_codes
    from uhga_tf.data import retrieval_sets
    from uhga_tf.saved_model import checkpoint
    from uhga_tf.training import run as run_lib

    # 360 train rows: the 10-NN reference (cluster size 80) gets scales
    # of 2 and 4 clusters, 18 target columns for 8 bits.
    data = write_feature_file(str(tmp_path / "features.npz"), num_classes=12)
    experiment = _experiment(tmp_path, data)
    result = reference_workdir.fit_reference_workdir(
        experiment, "k-means+LS (k=10)")
    workdir = experiment.workdir
    stored = config.load_experiment(
        workdir, required=checkpoint.CHECKPOINT_CONFIG_KEYS)
    assert stored.model.code_length == 8
    with open(os.path.join(workdir, "reference.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["settings"]["options"]["knn"] == 10
    # The workdir's hasher gives the reference's own codes and the stored
    # validation metrics.
    sets = retrieval_sets.load_retrieval_sets(
        experiment.data, experiment.model, experiment.train.seed,
        progress=False)
    hasher = keras.saving.load_model(os.path.join(workdir, "hasher.keras"))
    database_codes = run_lib.encode(hasher, sets.features["database"])
    _, reference_codes = shallow_codes(
        "k-means+LS (k=10)", 8, sets, experiment.train.seed)
    np.testing.assert_array_equal(database_codes, reference_codes)
    assert result["bit_agreement_with_reference"] == 1.0
    metrics = run_lib.validation_metrics(
        run_lib.encode(hasher, sets.features["validation"]), database_codes,
        sets)
    assert metrics["validation_map"] == pytest.approx(
        result["validation_map"], abs=0)
    # Twelve balanced classes: chance is about 1/12.
    assert 0.3 < result["validation_map"] <= 1.0
    with pytest.raises(ValueError, match="already holds config.json"):
        reference_workdir.fit_reference_workdir(
            experiment, "k-means+LS (k=10)")


def test_fit_reference_workdir_names_an_unknown_reference(tmp_path):
    from uhga_tf.baselines import reference_workdir

    experiment = _experiment(tmp_path, tmp_path / "none.npz")
    with pytest.raises(ValueError, match="method must be one of"):
        reference_workdir.fit_reference_workdir(experiment, "kmeans")
    assert not os.path.exists(experiment.workdir)


def test_fit_reference_refuses_a_reference_with_no_linear_map(tmp_path):
    from uhga_tf.baselines import reference_workdir

    experiment = _experiment(tmp_path, tmp_path / "none.npz")
    with pytest.raises(ValueError, match="one matrix product.*k-means\\+LS"):
        reference_workdir.fit_reference_workdir(experiment, "SH")
    assert not os.path.exists(experiment.workdir)


def test_fit_reference_cli_prints_the_validation_metrics(tmp_path):
    import subprocess
    import sys

    data = write_feature_file(str(tmp_path / "features.npz"), num_classes=12)
    command = [sys.executable, "-m", "uhga_tf.fit_reference",
               "--dataset=features", f"--data_dir={data}",
               f"--cache_dir={tmp_path / 'cache'}", "--code_length=8",
               f"--workdir={tmp_path / 'ref'}", "--noprogress"]
    done = subprocess.run(command, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "ref" / "reference.json") as f:
        stored = json.load(f)
    assert (f"MAP@ALL (tie-aware) {stored['validation_map']:.4f}"
            in done.stdout)
    again = subprocess.run(command, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1].startswith(
        "uhga_tf.fit_reference: workdir")


def test_fit_reference_on_an_unlabelled_collection(tmp_path):
    import subprocess
    import sys

    labelled = write_feature_file(str(tmp_path / "labelled.npz"),
                                  num_classes=12)
    with np.load(labelled) as npz:
        np.savez(tmp_path / "photos.npz", features=npz["features"])
    command = [sys.executable, "-m", "uhga_tf.fit_reference",
               "--dataset=features", f"--data_dir={tmp_path / 'photos.npz'}",
               "--split=collection", f"--cache_dir={tmp_path / 'cache'}",
               "--code_length=8", f"--workdir={tmp_path / 'ref'}",
               "--noprogress"]
    done = subprocess.run(command, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "ref" / "reference.json") as f:
        stored = json.load(f)
    assert stored["labelled"] is False and "validation_map" not in stored
    assert 0 < stored["distinct_codes_share"] <= 1
    assert (f"{stored['distinct_codes_share']:.1%} of them distinct"
            in done.stdout)
    assert "no MAP without labels" in done.stdout


def test_structure_init_fits_on_the_similarity_graph_options():
    """hash_init=structure passes the kNN graph's k and the cluster size
    through: the start map gives those k-means+LS codes, not the defaults'."""
    from uhga_tf.baselines import structural

    x = _clustered(seed=4) + 0.05
    mean, scale = hash_layer.centring_statistics(x, unit_rows=True)
    centring = hash_layer.FeatureCentring(mean, scale, unit_rows=True)
    layer_input = np.asarray(centring(x.astype("float32")), np.float64)
    kernel, bias = structural.structure_hash_map(
        layer_input, 8, 3, knn=5, cluster_size=10)
    start = codes_lib.binarize(layer_input @ kernel + bias)
    reference = base.get_hasher(
        "kmeans_ls", 8, knn=5, cluster_size=10, unit_rows=False).fit(
            layer_input, 3)
    np.testing.assert_array_equal(start, reference.encode(layer_input))
    defaults = base.get_hasher("kmeans_ls", 8, unit_rows=False).fit(
        layer_input, 3)
    assert not np.array_equal(start, defaults.encode(layer_input))


def test_feature_unit_rows_needs_feature_centring():
    from uhga_tf import config

    with pytest.raises(ValueError, match="feature_unit_rows needs"):
        config.ModelConfig(feature_unit_rows=True)
    assert config.ModelConfig(feature_unit_rows=True,
                              feature_centring=True).feature_unit_rows
