"""Clusterings learned from the kNN graph (`similarity_learned_share`):
recovery of blobs, determinism, which ladder scales they replace, and bad
input."""

import numpy as np
import pytest

from train_fixtures import sphere_blobs
from uhga_tf import config
from uhga_tf.baselines import structural
from uhga_tf.similarity import learned_clusters
from uhga_tf.similarity import structured


def _purity(labels, assigned):
    table = np.zeros((labels.max() + 1, assigned.max() + 1))
    np.add.at(table, (labels, assigned), 1)
    return table.max(axis=0).sum() / len(labels)


@pytest.fixture(scope="module")
def blobs():
    x, labels = sphere_blobs(n_per=100, clusters=4, dim=16, spread=0.3)
    ids, _ = structured.nearest_neighbours(x, 10)
    return x, labels, ids


def test_heads_recover_blobs_and_repeat_with_their_seed(blobs):
    x, labels, ids = blobs
    assigned = learned_clusters.learned_assignments(x, ids, [4, 4, 2], 0)
    assert assigned.shape == (400, 3) and assigned.dtype == np.int32
    # Both 4-cluster runs find the 4 blobs; the 2-cluster head splits them
    # 2 + 2 (no blob cut in half).
    assert _purity(labels, assigned[:, 0]) >= 0.98
    assert _purity(labels, assigned[:, 1]) >= 0.98
    halves = np.array([np.bincount(assigned[labels == b, 2], minlength=2)
                       for b in range(4)])
    assert (halves.max(axis=1) >= 95).all()
    assert sorted(halves.argmax(axis=1)) == [0, 0, 1, 1]
    np.testing.assert_array_equal(
        assigned, learned_clusters.learned_assignments(x, ids, [4, 4, 2], 0))


def test_learned_share_replaces_only_the_coarsest_scales(blobs):
    x, labels, ids = blobs
    scales = [2, 4, 8]
    k_means = structured.multiscale_assignments(ids, scales, 3, 5)
    mixed = structured.multiscale_assignments(
        ids, scales, 3, 5, features=x, learned_share=0.5)
    # ceil(0.5 x 3) = 2 learned scales (2 and 4 clusters, 3 heads each);
    # the 8-cluster k-means columns are the ones the plain ladder draws.
    assert mixed.shape == k_means.shape == (400, 9)
    np.testing.assert_array_equal(mixed[:, 6:], k_means[:, 6:])
    assert mixed[:, :3].max() <= 1 and mixed[:, 3:6].max() <= 3
    assert min(_purity(labels, mixed[:, h]) for h in (3, 4, 5)) >= 0.98
    learned_all = structured.multiscale_assignments(
        ids, scales, 1, 5, features=x, learned_share=1.0)
    assert [int(c.max()) + 1 for c in learned_all.T] == [2, 4, 8]


def test_coassociation_with_learned_share_joins_blobs(blobs, monkeypatch):
    x, labels, _ = blobs
    # The ladder of 2, 4 and 8 clusters (400 items would reach 32).
    monkeypatch.setattr(structured, "FINEST_SCALE", 8)
    s = structured.build_structured_similarity(
        x, similarity="coassociation", similarity_knn=10,
        similarity_runs=2, similarity_cluster_size=40,
        similarity_learned_share=0.5, seed=0)
    rows = np.arange(len(x))
    block = s.block(rows, rows).numpy()
    same = labels[:, None] == labels[None, :]
    # Same-blob pairs are joined at every scale but the finest (8
    # k-means clusters over 4 blobs): S = 2 a - 1 >= 1/3 for most of them.
    assert np.mean(block[same] >= 1 / 3 - 1e-6) >= 0.9
    assert np.mean(block[~same] <= -1 / 3 + 1e-6) >= 0.95


def test_start_with_learned_share_is_a_valid_hash_map(blobs):
    x, _, _ = blobs
    centred = x - x.mean(axis=0)
    kernel, bias = structural.structure_hash_map(
        centred, 8, 0, learned_share=0.5, knn=10, cluster_size=40, runs=2)
    plain, _ = structural.structure_hash_map(
        centred, 8, 0, knn=10, cluster_size=40, runs=2)
    assert kernel.shape == (16, 8) and bias.shape == (8,)
    codes = np.sign(centred @ kernel + bias)
    np.testing.assert_allclose(np.std(centred @ kernel + bias, axis=0), 1.0,
                               rtol=1e-4)
    assert np.abs(codes.mean(axis=0)).max() < 0.9
    assert not np.allclose(kernel, plain)
    # The reference itself never learns its clusters.
    assert structural.KMeansLS(8).learned_share == 0.0


@pytest.mark.parametrize("values, fragment", [
    ({"similarity": "coassociation", "similarity_learned_share": 1.5},
     "similarity_learned_share must be in [0, 1]"),
    ({"similarity": "coassociation", "similarity_learned_share": -0.1},
     "similarity_learned_share must be in [0, 1]"),
    ({"similarity": "knn", "similarity_learned_share": 0.5},
     "needs similarity=multiscale or coassociation"),
])
def test_bad_learned_share_names_the_flag(values, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")
                       .replace("]", r"\]")):
        config.experiment_from_flat(values)


def test_learned_share_at_its_default_keeps_stored_digests():
    plain = config.experiment_from_flat({"similarity": "coassociation"})
    assert "similarity_learned_share" not in config.digest_dict(
        plain)["similarity"]
    learned = config.experiment_from_flat(
        {"similarity": "coassociation", "similarity_learned_share": 0.5})
    assert config.digest_dict(learned)["similarity"][
        "similarity_learned_share"] == 0.5


def test_bad_arguments_are_refused(blobs):
    x, _, ids = blobs
    with pytest.raises(ValueError, match="cluster counts must be in"):
        learned_clusters.learned_assignments(x, ids, [1], 0)
    with pytest.raises(ValueError, match="one N"):
        learned_clusters.learned_assignments(x[:10], ids, [2], 0)
    with pytest.raises(ValueError, match="needs the features"):
        structured.multiscale_assignments(ids, [2, 4], 1, 0,
                                          learned_share=0.5)
