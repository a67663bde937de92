"""No label reaches training: permuting the train and validation labels
leaves the learned weights and codes bit for bit the same."""

import numpy as np
import pytest

from train_fixtures import write_feature_file


def _permuted_copy(source, target, seed=3):
    """The same features and split, labels shuffled within train and within
    validation (the labels training could peek at)."""
    with np.load(source) as npz:
        arrays = {k: npz[k] for k in npz.files}
    labels = arrays["labels"].copy()
    rng = np.random.default_rng(seed)
    for name in ("train", "validation"):
        rows = arrays[name]
        labels[rows] = labels[rng.permutation(rows)]
    assert not np.array_equal(labels, arrays["labels"])
    np.savez(target, **{**arrays, "labels": labels})


def _run(tmp_path, data, name, attention):
    from uhga_tf import config
    from uhga_tf.training import run as run_lib

    experiment = config.experiment_from_flat(dict(
        dataset="features", data_dir=str(data),
        cache_dir=str(tmp_path / f"cache_{name}"),
        workdir=str(tmp_path / name), code_length=16,
        global_batch_size=32, epochs=2, eval_every_epochs=1,
        learning_rate=0.01, progress=False, attention=attention,
        # The product recipe's S and loss (no class count anywhere).
        similarity="coassociation", similarity_knn=10,
        similarity_cluster_size=10, similarity_runs=2, loss="l2",
        feature_centring=True, positive_weight="auto",
    ))
    result = run_lib.run_experiment(experiment)
    import keras

    hasher = keras.saving.load_model(str(tmp_path / name / "hasher.keras"))
    with np.load(data) as npz:
        codes = run_lib.encode(hasher, npz["features"])
    return result, hasher.get_weights(), codes


@pytest.mark.parametrize("attention", [False, True])
def test_permuted_labels_give_identical_weights_and_codes(tmp_path,
                                                          attention):
    original = write_feature_file(str(tmp_path / "original.npz"))
    permuted = str(tmp_path / "permuted.npz")
    _permuted_copy(original, permuted)
    result_a, weights_a, codes_a = _run(tmp_path, original, "a", attention)
    result_b, weights_b, codes_b = _run(tmp_path, permuted, "b", attention)
    assert len(weights_a) == len(weights_b) > 0
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(codes_a, codes_b)
    # The labels did change what evaluation sees: the guard is not vacuous.
    assert (result_a["similarity_diagnostics"]
            != result_b["similarity_diagnostics"])


def test_an_unlabelled_collection_trains_to_the_same_codes(tmp_path):
    """The same features and split with no labels at all: training is bit
    for bit the labelled run's, and the result holds the database codes'
    statistics in place of MAP (which needs labels)."""
    from uhga_tf import codes as codes_lib

    labelled = write_feature_file(str(tmp_path / "labelled.npz"))
    with np.load(labelled) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "labels"}
    unlabelled = str(tmp_path / "unlabelled.npz")
    np.savez(unlabelled, **arrays)
    result_a, weights_a, codes_a = _run(tmp_path, labelled, "a", False)
    result_b, weights_b, codes_b = _run(tmp_path, unlabelled, "b", False)
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(codes_a, codes_b)
    assert result_b["labelled"] is False
    assert not {"map", "map_tie_aware", "validation_map", "itq_map"} & set(
        result_b)
    assert result_b["similarity_diagnostics"] == {}
    assert result_a["similarity_diagnostics"]
    # The database codes' own statistics: 4 classes x 50 rows.
    database = codes_a[arrays["database"]]
    assert result_b["num_database"] == len(database) == 200
    expected = codes_lib.code_statistics(database)
    assert {k: result_b[k] for k in expected} == expected
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        assert "validation_map" not in f.read()


def test_an_unlabelled_feature_file_takes_the_collection_split(tmp_path):
    from uhga_tf import config
    from uhga_tf.data import retrieval_sets

    labelled = write_feature_file(str(tmp_path / "labelled.npz"))
    with np.load(labelled) as npz:
        features = npz["features"]
    bare = str(tmp_path / "bare.npz")
    np.savez(bare, features=features)  # no labels, no partition, no split
    data = config.DataConfig(dataset="features", data_dir=bare,
                             split="collection",
                             cache_dir=str(tmp_path / "cache"))
    sets = retrieval_sets.load_retrieval_sets(data, config.ModelConfig(), 0)
    assert not sets.labelled and sets.description.endswith(", unlabelled")
    # 240 rows: a tenth as query and as validation, train the rest of the
    # database beside the validation queries (under 5,000).
    assert {n: len(sets.indices[n]) for n in retrieval_sets.SETS} == {
        "train": 192, "query": 24, "database": 216, "validation": 24}
    np.testing.assert_array_equal(
        np.sort(np.concatenate([sets.indices["query"],
                                sets.indices["database"]])), np.arange(240))
    with pytest.raises(ValueError, match="split=collection"):
        retrieval_sets.load_retrieval_sets(
            config.DataConfig(dataset="features", data_dir=bare,
                              cache_dir=str(tmp_path / "cache")),
            config.ModelConfig(), 0)
