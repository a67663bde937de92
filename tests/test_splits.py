"""Tests for uhga_tf.data.splits on the real CIFAR-10 labels and fixtures."""

import json
import os
import zipfile

import numpy as np
import pytest
from conftest import shared_data_dir

from uhga_tf.data import datasets, splits


@pytest.fixture(scope="module")
def cifar_labels():
    """Labels and partition of the CIFAR-10 zip in the dataset's order.

    Read from the zip listing (no decoding): train then test, classes in
    CIFAR-10 order, files in ascending number.
    """
    root = shared_data_dir()
    path = root and os.path.join(root, "cifar10", datasets.CIFAR10_ZIP)
    if not path or not os.path.isfile(path):
        pytest.skip(
            "CIFAR-10 zip not found under ../shared/data or UHGA_DATA_DIR"
        )
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".jpg")]
    labels, partition = [], []
    for part in ("train", "test"):
        for c, cls in enumerate(datasets.CIFAR10_CLASSES):
            count = sum(n.startswith(f"{part}/{cls}/") for n in names)
            labels += [c] * count
            partition += [part] * count
    return np.array(labels, np.int64), np.array(partition, dtype=object)


def _per_class(labels, indices):
    return np.bincount(labels[indices], minlength=10).tolist()


def _check_common(split, labels):
    for name in splits.SPLIT_SETS:
        values = getattr(split, name)
        assert values.dtype == np.int64, name
        assert np.all(np.diff(values) > 0), f"{name} must be sorted, unique"
    assert not np.intersect1d(split.validation, split.train).size
    assert not np.intersect1d(split.validation, split.query).size
    assert np.isin(split.validation, split.database).all()


# Single-label protocols on CIFAR-10 (seed 0): split sizes and the sets
# whose per-class counts are fixed.
CIFAR_PROTOCOLS = {
    "uhga": (
        {"query": 1000, "train": 5000, "database": 59000, "validation": 1000},
        {"query": 100, "train": 500, "validation": 100},
    ),
    "disjoint54k": (
        {"query": 1000, "train": 5000, "database": 54000, "validation": 1000},
        {"query": 100, "train": 500, "database": 5400},
    ),
    "ssdh_lists": (
        {"query": 10000, "train": 5000, "database": 50000,
         "validation": 1000},
        {},
    ),
    "demo": (
        {"query": 500, "train": 2000, "database": 10000, "validation": 200},
        {"query": 50, "train": 200, "database": 1000, "validation": 20},
    ),
}


@pytest.mark.parametrize("protocol", sorted(CIFAR_PROTOCOLS))
def test_sizes_and_class_balance(cifar_labels, protocol):
    labels, partition = cifar_labels
    split = splits.make_split(protocol, labels, partition, seed=0)
    sizes, per_class = CIFAR_PROTOCOLS[protocol]
    assert split.sizes() == sizes
    _check_common(split, labels)
    for name, count in per_class.items():
        assert _per_class(labels, getattr(split, name)) == [count] * 10, name
    assert split.protocol == protocol and split.seed == 0


@pytest.mark.parametrize("protocol", ["uhga", "demo"])
def test_test_part_queries_outside_a_database_holding_train(cifar_labels,
                                                           protocol):
    labels, partition = cifar_labels
    split = splits.make_split(protocol, labels, partition, seed=0)
    assert (partition[split.query] == "test").all()
    assert not np.intersect1d(split.query, split.database).size
    assert np.isin(split.train, split.database).all()


def test_uhga_database_is_every_non_query_image(cifar_labels):
    labels, partition = cifar_labels
    split = splits.make_split("uhga", labels, partition, seed=0)
    np.testing.assert_array_equal(
        np.union1d(split.query, split.database), np.arange(60000)
    )


def test_uhga_query_pool_all(cifar_labels):
    labels, partition = cifar_labels
    split = splits.make_split("uhga", labels, partition, 0, query_pool="all")
    assert _per_class(labels, split.query) == [100] * 10
    # 5/6 of the images are in the train part: about 833 queries expected.
    assert 750 < (partition[split.query] == "train").sum() < 920
    assert len(split.database) == 59000


def test_uhga_on_fashion_mnist_sizes():
    # Fashion-MNIST's structure: 6,000/class train then 1,000/class test.
    labels = np.r_[
        np.repeat(np.arange(10), 6000), np.repeat(np.arange(10), 1000)
    ]
    partition = np.array(["train"] * 60000 + ["test"] * 10000, dtype=object)
    split = splits.make_split("uhga", labels, partition, seed=3)
    assert split.sizes() == {
        "query": 1000,
        "train": 5000,
        "database": 69000,
        "validation": 1000,
    }
    assert (split.query >= 60000).all()
    assert np.isin(split.train, split.database).all()


def test_disjoint54k_sets_partition_all_images(cifar_labels):
    labels, partition = cifar_labels
    split = splits.make_split("disjoint54k", labels, partition, seed=0)
    every = np.concatenate([split.query, split.train, split.database])
    np.testing.assert_array_equal(np.sort(every), np.arange(60000))
    # Drawn from all 60k: queries come from both parts.
    assert 0 < (partition[split.query] == "test").sum() < 1000


def test_ssdh_lists_follow_the_official_parts(cifar_labels):
    labels, partition = cifar_labels
    split = splits.make_split("ssdh_lists", labels, partition, seed=0)
    np.testing.assert_array_equal(split.query, np.arange(50000, 60000))
    np.testing.assert_array_equal(split.database, np.arange(50000))
    assert np.isin(split.train, split.database).all()
    counts = _per_class(labels, split.train)
    # Not class-balanced: binomial(5000, 0.1) spread, std about 21.
    assert len(set(counts)) > 1 and min(counts) > 420 and max(counts) < 580


def test_same_seed_identical_other_seed_different(cifar_labels):
    labels, partition = cifar_labels
    a = splits.make_split("uhga", labels, partition, seed=7)
    b = splits.make_split("uhga", labels, partition, seed=7)
    c = splits.make_split("uhga", labels, partition, seed=8)
    for name in splits.SPLIT_SETS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ("query", "train", "validation"):
        overlap = np.intersect1d(getattr(a, name), getattr(c, name)).size
        # Random overlap of two draws: query ~ 1000 * 0.1, far below 1000.
        assert overlap < 0.5 * len(getattr(a, name)), name


def test_ga_lists(cifar_labels, tmp_path):
    labels, partition = cifar_labels
    onehot = lambda c: " ".join("1" if k == c else "0" for k in range(10))
    lines = {
        "test.txt": [
            f"./data/cifar/test/ship/0123.jpg {onehot(8)}",
            f"./data/cifar/train/airplane/0000.jpg {onehot(0)}",
        ],
        "train.txt": [f"/x/train/cat/0017.jpg {onehot(3)}"],
        "database.txt": [
            f"train\\truck\\4999.jpg {onehot(9)}",
            f"test/truck/0999.jpg {onehot(9)}",
            f"./data/cifar/train/airplane/0000.jpg {onehot(0)}",
        ],
    }
    for fname, rows in lines.items():
        (tmp_path / fname).write_text("\n".join(rows) + "\n")
    split = splits.make_split(
        "ga_lists",
        labels,
        partition,
        0,
        list_dir=str(tmp_path),
        per_class={"validation": 0},
    )
    np.testing.assert_array_equal(split.query, [0, 58123])
    np.testing.assert_array_equal(split.train, [15017])
    np.testing.assert_array_equal(split.database, [0, 49999, 59999])
    assert len(split.validation) == 0

    (tmp_path / "train.txt").write_text(
        f"./data/cifar/train/1_690.jpg {onehot(0)}\n"
    )
    with pytest.raises(ValueError, match="binary batch order"):
        splits.make_split(
            "ga_lists", labels, partition, 0, list_dir=str(tmp_path)
        )
    with pytest.raises(FileNotFoundError, match="list_dir=None"):
        splits.make_split("ga_lists", labels, partition, 0)


def _multi_hot(n=6000, concepts=4, seed=0):
    rng = np.random.default_rng(seed)
    probs = np.array([0.2, 0.5, 0.35, 0.3])[:concepts]
    labels = (rng.random((n, concepts)) < probs).astype(np.uint8)
    return labels


def test_nus_wide21_sizes_and_draw_rule():
    labels = _multi_hot()
    partition = np.full(len(labels), "train", dtype=object)
    split = splits.make_split("nus_wide21", labels, partition, seed=0)
    assert split.sizes() == {
        "query": 400,
        "train": 2000,
        "database": 5600,
        "validation": 1000,
    }
    _check_common(split, labels)
    assert not np.intersect1d(split.query, split.train).size
    assert not np.intersect1d(split.query, split.database).size
    assert np.isin(split.train, split.database).all()
    # The most frequent concept (column 1) is drawn first: its 100 queries
    # all carry it, so at least 100 queries have column 1.
    assert labels[split.query, 1].sum() >= 100
    # Images with no label can never be picked for query/train.
    empty = np.flatnonzero(labels.sum(1) == 0)
    assert not np.isin(empty, np.r_[split.query, split.train]).any()
    with pytest.raises(ValueError, match=r"concept 3 .*need 600, received"):
        splits.make_split("nus_wide21", labels[:3000], partition[:3000], 0)
    smaller = splits.make_split(
        "nus_wide21",
        labels,
        partition,
        0,
        per_class={"query": 10, "train": 20, "validation": 30},
    )
    assert smaller.sizes() == {
        "query": 40,
        "train": 80,
        "database": 5960,
        "validation": 30,
    }


def test_round_trip_and_refusal(cifar_labels, tmp_path, monkeypatch):
    labels, partition = cifar_labels
    split = splits.load_or_create_split(
        str(tmp_path), "cifar10", "uhga", labels, partition, 0
    )
    digest = splits.labels_fingerprint(labels, partition)[:12]
    folder = tmp_path / f"cifar10_uhga_seed0_{digest}"
    assert sorted(os.listdir(tmp_path)) == [folder.name]
    assert sorted(os.listdir(folder)) == [
        "database.txt",
        "query.txt",
        "split.json",
        "train.txt",
        "validation.txt",
    ]
    meta = json.loads((folder / "split.json").read_text())
    assert meta["sizes"] == split.sizes() and meta["seed"] == 0
    assert meta["labels_fingerprint"] == splits.labels_fingerprint(
        labels, partition
    )
    first = (folder / "query.txt").read_text().split()[0]
    assert int(first) == split.query[0]

    # Later calls only read: drawing again would fail.
    def no_draw(*args, **kwargs):
        raise AssertionError("make_split called for a stored split")

    monkeypatch.setattr(splits, "make_split", no_draw)
    again = splits.load_or_create_split(
        str(tmp_path), "cifar10", "uhga", labels, partition, 0
    )
    for name in splits.SPLIT_SETS:
        np.testing.assert_array_equal(
            getattr(again, name), getattr(split, name)
        )

    changed = labels.copy()
    changed[0] = 1
    # Other data gets its own folder, drawn afresh, not refused (issue 18).
    with pytest.raises(AssertionError, match="make_split called"):
        splits.load_or_create_split(
            str(tmp_path), "cifar10", "uhga", changed, partition, 0
        )
    with pytest.raises(ValueError, match="options"):
        splits.load_or_create_split(
            str(tmp_path),
            "cifar10",
            "uhga",
            labels,
            partition,
            0,
            query_pool="all",
        )
    (folder / "query.txt").write_text("1\n2\n")
    with pytest.raises(
        ValueError, match=r"query\.txt holds 2 indices, expected 1000"
    ):
        splits.load_or_create_split(
            str(tmp_path), "cifar10", "uhga", labels, partition, 0
        )


def test_bad_inputs(cifar_labels):
    labels, partition = cifar_labels
    with pytest.raises(ValueError, match=r"protocol='cifar'.*'uhga'"):
        splits.make_split("cifar", labels, partition, 0)
    with pytest.raises(
        ValueError,
        match=r"too few images for query of class 0 .*need 1001, received 1000",
    ):
        splits.make_split(
            "uhga", labels, partition, 0, per_class={"query": 1001}
        )
    with pytest.raises(ValueError, match=r"per_class keys .*\['database'\]"):
        splits.make_split(
            "uhga", labels, partition, 0, per_class={"database": 5}
        )
    with pytest.raises(ValueError, match=r"query_pool="):
        splits.make_split("uhga", labels, partition, 0, query_pool="train")
    with pytest.raises(ValueError, match=r"query_pool applies"):
        splits.make_split("ssdh_lists", labels, partition, 0, query_pool="all")
    with pytest.raises(ValueError, match=r"needs multi-hot labels"):
        splits.make_split("nus_wide21", labels, partition, 0)
    with pytest.raises(ValueError, match=r"needs single-label"):
        splits.make_split("uhga", _multi_hot(), partition[:6000], 0)
    with pytest.raises(
        ValueError, match=r"partition must have shape \(60000,\)"
    ):
        splits.make_split("uhga", labels, partition[:10], 0)
    with pytest.raises(
        ValueError, match=r"too few images for class 2: need at least 700"
    ):
        small = np.r_[np.repeat([0, 1], 800), np.full(600, 2)]
        splits.make_split("disjoint54k", small, np.full(2200, "train"), 0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        splits.make_split("uhga", labels, partition, -1)


def test_collection_split_never_reads_a_label():
    """The same draw whatever the labels, none included; counts capped for
    small collections; protocols that draw by class refuse no labels."""
    n = 60_000
    unlabelled = np.full(n, -1, np.int64)
    partition = np.full(n, "train", dtype=object)
    split = splits.make_split("collection", unlabelled, partition, 0)
    assert split.sizes() == {"query": 1000, "train": 5000,
                             "database": 59000, "validation": 1000}
    _check_common(split, unlabelled)
    assert np.isin(split.train, split.database).all()
    np.testing.assert_array_equal(
        np.union1d(split.query, split.database), np.arange(n))
    labels = np.random.default_rng(1).integers(0, 10, n)
    other = splits.make_split("collection", labels, partition, 0)
    for name in splits.SPLIT_SETS:
        np.testing.assert_array_equal(getattr(split, name),
                                      getattr(other, name))
    small = splits.make_split("collection", unlabelled[:2_000],
                              partition[:2_000], 0)
    assert small.sizes() == {"query": 200, "train": 1600,
                             "database": 1800, "validation": 200}
    with pytest.raises(ValueError, match="at least 10 images"):
        splits.make_split("collection", unlabelled[:9], partition[:9], 0)
    with pytest.raises(ValueError, match="no labels; use split=collection"):
        splits.make_split("uhga", unlabelled, partition, 0)
