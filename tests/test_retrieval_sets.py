"""The database order and sub-collections of `retrieval_sets`."""

import numpy as np
import pytest

from uhga_tf.data import retrieval_sets


def test_database_is_one_seeded_permutation_and_nothing_else_moves():
    sets = {"train": np.arange(5), "query": np.arange(100, 103),
            "validation": np.arange(7, 9), "database": np.arange(200)}
    a = retrieval_sets.shuffle_database(sets, seed=0)
    b = retrieval_sets.shuffle_database(sets, seed=0)
    c = retrieval_sets.shuffle_database(sets, seed=1)
    np.testing.assert_array_equal(a["database"], b["database"])
    np.testing.assert_array_equal(np.sort(a["database"]), np.arange(200))
    assert not np.array_equal(a["database"], np.arange(200))
    assert not np.array_equal(a["database"], c["database"])
    for name in ("train", "query", "validation"):
        assert a[name] is sets[name]


def test_collection_subset_keeps_classes_and_decays_sizes():
    labels = np.repeat(np.arange(4), 1000)
    rows, suffix = retrieval_sets.collection_subset(labels, "1,3", 1.0, 0)
    assert suffix == "-classes1_3"
    np.testing.assert_array_equal(np.unique(labels[rows]), [1, 3])
    assert len(rows) == 2000
    rows, suffix = retrieval_sets.collection_subset(labels, "", 0.5, 0)
    assert suffix == "-decay0.5"
    sizes = np.bincount(labels[rows])
    np.testing.assert_array_equal(sizes, [1000, 500, 250, 125])
    again, _ = retrieval_sets.collection_subset(labels, "", 0.5, 0)
    np.testing.assert_array_equal(rows, again)
    rows, suffix = retrieval_sets.collection_subset(labels, "", 1.0, 0)
    assert suffix == "" and len(rows) == 4000
    with pytest.raises(ValueError, match="no images: \\[7\\]"):
        retrieval_sets.collection_subset(labels, "1,7", 1.0, 0)


def test_train_from_database_is_a_label_blind_seeded_draw():
    sets = {"train": np.arange(5), "query": np.arange(300, 310),
            "validation": np.arange(20, 40), "database": np.arange(300)}
    same, note = retrieval_sets.train_from_database(sets, 0, seed=0)
    assert same is sets and note == ""
    drawn, note = retrieval_sets.train_from_database(sets, 100, seed=0)
    again, _ = retrieval_sets.train_from_database(sets, 100, seed=0)
    other, _ = retrieval_sets.train_from_database(sets, 100, seed=1)
    train = drawn["train"]
    assert len(train) == 100 and len(np.unique(train)) == 100
    # From the database, never a validation query; sorted, seeded.
    assert not np.isin(train, sets["validation"]).any()
    assert np.isin(train, sets["database"]).all()
    np.testing.assert_array_equal(train, np.sort(train))
    np.testing.assert_array_equal(train, again["train"])
    assert not np.array_equal(train, other["train"])
    assert note == ", train = 100 images drawn from the database"
    for name in ("query", "validation", "database"):
        assert drawn[name] is sets[name]
    # A collection smaller than train_size is used whole (280 rows).
    whole, note = retrieval_sets.train_from_database(sets, 10_000, seed=0)
    np.testing.assert_array_equal(
        whole["train"], np.setdiff1d(np.arange(300), np.arange(20, 40)))
    assert note == ", train = 280 images drawn from the database"


def test_description_names_the_feature_runtime_only_off_tensorflow():
    from uhga_tf import config

    data = config.DataConfig(dataset="cifar10", split="uhga")
    model = config.ModelConfig(image_size=160)
    note = ", train = 20000 images drawn from the database"
    source = "zip:/data/cifar10-jpeg.zip"
    # Word for word what the stored cells record (their digests cover it).
    assert retrieval_sets._describe(
        data, model, source, 0, "", note, True) == (
        "cifar10 (zip:/data/cifar10-jpeg.zip), split=uhga seed=0, "
        "backbone=efficientnet_lite0 weights=default image_size=160, "
        "database in seed-shuffled order, train = 20000 images drawn from "
        "the database"
    )
    lite = config.ModelConfig(image_size=160, feature_runtime="tflite")
    assert "image_size=160 runtime=tflite, database" in (
        retrieval_sets._describe(data, lite, source, 0, "", note, True))
    with pytest.raises(ValueError, match="feature_runtime"):
        config.ModelConfig(feature_runtime="onnx")
