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
