"""Structured similarity matrices (knn, cluster, manifold): recovery of
clusters, determinism, O(N k) memory, the pair rule, and bad input."""

import numpy as np
import pytest

from train_fixtures import sphere_blobs
from uhga_tf.similarity import entries
from uhga_tf.similarity import structured as ss

MODES = ("knn", "cluster", "manifold")


def _build(mode, features, **kwargs):
    defaults = dict(
        similarity_knn=10, similarity_clusters=5, similarity_runs=3,
        similarity_dissimilar_quantile=0.5,
    )
    defaults.update(kwargs)
    return ss.build_structured_similarity(
        features, similarity=mode, seed=0, **defaults
    )


def _dense(structure):
    rows = np.arange(structure.num_items)
    return structure.block(rows, rows).numpy()


@pytest.mark.parametrize("mode", MODES)
def test_recovers_clusters_of_blobs(mode):
    x, labels = sphere_blobs()
    s = _dense(_build(mode, x))
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    similar, dissimilar = (s == 1) & off, s == -1
    # Not a vacuous S: most of the k partners kept (knn, manifold; k = 10),
    # most same-cluster pairs found (cluster).
    minimum = 0.5 * len(labels) * 10 if mode == "knn" else 0.5 * (
        same & off).sum()
    assert similar.sum() >= minimum
    assert same[similar].mean() >= 0.95
    assert (~same[dissimilar]).mean() >= 0.95
    np.testing.assert_array_equal(s, s.T)
    assert np.all(np.diag(s) == 1)


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_gives_identical_structure(mode):
    x, _ = sphere_blobs(seed=3)
    a, b = _build(mode, x), _build(mode, x)
    np.testing.assert_array_equal(_dense(a), _dense(b))
    assert a.fractions == b.fractions


@pytest.mark.parametrize("mode", MODES)
def test_memory_is_linear_in_items(mode):
    x, _ = sphere_blobs(n_per=80)
    structure = _build(mode, x)
    n, dim = x.shape
    if mode in ("cluster", "manifold"):
        assert structure.nbytes == n * 3 * 4  # int32 ids per run
    else:
        # int32 partner lists [N, k], float32 radius [N] and unit features.
        assert structure.nbytes == n * 10 * 4 + n * 4 + n * dim * 4
    assert structure.nbytes < n * n  # never an N x N int8 matrix


def test_pair_rule_on_a_hand_made_structure():
    # Items 0,1 mutual partners; 2 alone. Features: 0,1 close, 2 opposite.
    structure = ss.StructuredSimilarity(
        mode="knn",
        neighbours=np.array([[1], [0], [-1]], np.int32),
        radius=np.array([0.5, 0.5, 0.5], np.float32),
        unit_features=np.array([[1, 0], [0.8, 0.6], [-1, 0]], np.float32),
    )
    np.testing.assert_array_equal(
        _dense(structure), [[1, 1, -1], [1, 1, -1], [-1, -1, 1]]
    )
    clusters = ss.StructuredSimilarity(
        mode="cluster",
        assignments=np.array([[0, 1], [0, 1], [0, 2], [1, 2]], np.int32),
    )
    # Same cluster in both runs -> +1, in none -> -1, in one -> 0.
    np.testing.assert_array_equal(
        _dense(clusters),
        [[1, 1, 0, -1], [1, 1, 0, -1], [0, 0, 1, 0], [-1, -1, 0, 1]],
    )


def test_mutual_partners_keeps_only_reciprocated_pairs():
    ids = np.array([[1, 2], [0, 2], [3, 1], [2, 0]])
    np.testing.assert_array_equal(
        ss.mutual_partners(ids), [[1, -1], [0, 2], [3, 1], [2, -1]]
    )


def test_label_agreement_counts_single_and_multi_label():
    block = np.array([[1, -1], [0, 1]])
    out = entries.label_agreement(block, np.array([0, 1]), np.array([0, 1]))
    assert out["p_same_given_similar"] == 1.0
    assert out["p_different_given_dissimilar"] == 1.0
    assert out["p_same_base_rate"] == 0.5
    multi = np.array([[1, 1, 0], [0, 0, 1]], np.uint8)
    out = entries.label_agreement(block, multi, multi[::-1])
    assert out["p_same_given_similar"] == 0.0
    assert out["p_different_given_dissimilar"] == 0.0


@pytest.mark.parametrize(
    "mode, kwargs, words",
    [
        ("knn", {"similarity_knn": 0}, "similarity_knn must be in [1, N)"),
        ("knn", {"similarity_knn": 300}, "similarity_knn must be in [1, N)"),
        ("cluster", {"similarity_clusters": 1}, "similarity_clusters"),
        ("cluster", {"similarity_clusters": 301}, "similarity_clusters"),
        ("manifold", {"similarity_clusters": 1}, "similarity_clusters"),
        ("knn", {"similarity_dissimilar_quantile": 1.0},
         "similarity_dissimilar_quantile"),
    ],
)
def test_bad_parameters_name_the_flag(mode, kwargs, words):
    x, _ = sphere_blobs()
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace(
            "(", r"\(").replace(")", r"\)")):
        _build(mode, x, **kwargs)


def test_bad_feature_rows_are_refused():
    x, _ = sphere_blobs()
    x[7] = np.nan
    with pytest.raises(ValueError, match="NaN or inf .*row 7"):
        _build("knn", x)
    x, _ = sphere_blobs()
    x[4] = 0.0
    with pytest.raises(ValueError, match="all-zero rows .*row 4"):
        _build("cluster", x)


def test_an_s_without_dissimilar_pairs_names_the_flags():
    x, _ = sphere_blobs()
    # One run with 300 clusters of one item each: no pair is similar.
    with pytest.raises(ValueError, match="no similar pair.*similarity_"):
        _build("cluster", x, similarity_clusters=300, similarity_runs=1)


def _hierarchy(groups=4, subgroups=4, per=25, dim=32, seed=0):
    """Blobs inside blobs: (x, group ids, subgroup ids), shuffled."""
    rng = np.random.default_rng(seed)
    tops = rng.normal(size=(groups, dim))
    subs = tops[:, None, :] + 0.25 * rng.normal(size=(groups, subgroups, dim))
    group = np.repeat(np.arange(groups), subgroups * per)
    sub = np.tile(np.repeat(np.arange(subgroups), per), groups)
    x = subs[group, sub] + 0.25 * rng.normal(size=(len(group), dim))
    order = rng.permutation(len(group))
    return x[order].astype(np.float32), group[order], sub[order]


def test_multiscale_ladder_follows_n_never_a_class_count():
    # Clusters of at least 80: the shipped recipe's 20,000 items reach 128.
    assert ss.cluster_scales(20000, 80) == [2, 4, 8, 16, 32, 64, 128]
    assert ss.cluster_scales(40000, 80)[-1] == 256
    # A larger cluster size never stops the ladder short of 128.
    assert ss.cluster_scales(20000, 160)[-1] == 128
    # A smaller collection still reaches 128 while its clusters keep 10
    # items on average (5,000 // 128 = 39 each), and never goes finer.
    assert ss.cluster_scales(5000, 40) == [2, 4, 8, 16, 32, 64, 128]
    assert ss.cluster_scales(5000, 20)[-1] == 128
    assert ss.cluster_scales(1279, 80)[-1] == 64
    assert ss.cluster_scales(1280, 80)[-1] == 128
    assert ss.cluster_scales(39, 40) == [2]
    assert ss.cluster_scales(40, 40) == [2, 4]
    features, _, _ = _hierarchy()
    a = _dense(_build("multiscale", features, similarity_clusters=2,
                      similarity_cluster_size=10))
    b = _dense(_build("multiscale", features, similarity_clusters=50,
                      similarity_cluster_size=10))
    np.testing.assert_array_equal(a, b)  # similarity_clusters is unused


def test_multiscale_grades_pairs_by_how_fine_they_stay_together():
    features, group, sub = _hierarchy()
    structure = _build("multiscale", features, similarity_cluster_size=10,
                       similarity_runs=2, similarity_positive_share=0.5,
                       similarity_negative_share=0.25, similarity_grading=1.0)
    # N = 400, 10 per cluster: 2, 4, ..., 32 clusters, 2 runs each.
    assert structure.assignments.shape == (400, 10)
    s = _dense(structure)
    assert s.dtype == np.float32 and s.min() >= -1.0 and s.max() <= 1.0
    np.testing.assert_array_equal(np.diag(s), np.ones(400, np.float32))
    same_group = group[:, None] == group[None, :]
    same_sub = same_group & (sub[:, None] == sub[None, :])
    off = ~np.eye(400, dtype=bool)
    fine = s[same_sub & off].mean()
    coarse = s[same_group & ~same_sub].mean()
    apart = s[~same_group].mean()
    # Same subgroup > same group only > different groups, by clear steps.
    assert fine > coarse + 0.2 and coarse > apart + 0.2, (fine, coarse, apart)
    assert fine > 0.5 and apart < -0.5
    fractions = structure.fractions
    assert fractions["positive"] + fractions["negative"] == pytest.approx(
        1 - fractions["unlabeled"])


def test_coassociation_is_two_times_the_joined_share_minus_one():
    features, group, sub = _hierarchy()
    structure = _build("coassociation", features, similarity_cluster_size=10,
                       similarity_runs=2)
    ids = structure.assignments
    rows = np.arange(len(ids))
    joined = (ids[:, None, :] == ids[None, :, :]).mean(axis=-1)
    s = _dense(structure)
    np.testing.assert_allclose(s, 2.0 * joined - 1.0, atol=1e-6)
    # Every pair labelled; the hierarchy read without a count: same
    # subgroup > same group only > different groups.
    same_group = group[:, None] == group[None, :]
    same_sub = same_group & (sub[:, None] == sub[None, :])
    off = ~np.eye(len(rows), dtype=bool)
    fine = s[same_sub & off].mean()
    coarse = s[same_group & ~same_sub].mean()
    apart = s[~same_group].mean()
    assert fine > coarse + 0.2 and coarse > apart + 0.2, (fine, coarse, apart)
    assert apart < -0.7


def _ladder(features, **kwargs):
    """The coassociation S of `_hierarchy` features (2 runs per scale)."""
    return _build("coassociation", features, similarity_cluster_size=10,
                  similarity_runs=2, **kwargs)


def test_coassociation_cosine_mix_adds_centred_cosine():
    features, _, _ = _hierarchy()
    plain = _ladder(features)
    mixed = _ladder(features, similarity_cosine_mix=0.25)
    np.testing.assert_array_equal(plain.assignments, mixed.assignments)
    centred = features - features.mean(axis=0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    expected = 0.75 * _dense(plain) + 0.25 * unit @ unit.T
    np.testing.assert_allclose(_dense(mixed), expected, atol=1e-5)
    # The stored structure grows by the unit rows only (N x D float32).
    assert mixed.nbytes - plain.nbytes == unit.size * 4


def test_row_agreement_is_the_mean_cluster_share():
    # Column 0: clusters {0, 1}, {2, 3}; column 1: {0}, {1, 2, 3}.
    ids = np.array([[0, 0], [0, 1], [1, 1], [1, 1]])
    np.testing.assert_allclose(
        ss.row_agreement(ids), [(2 / 4 + 1 / 4) / 2, (2 / 4 + 3 / 4) / 2,
                                (2 / 4 + 3 / 4) / 2, (2 / 4 + 3 / 4) / 2])


def test_coassociation_centring_blends_the_chance_corrected_share():
    features, group, _ = _hierarchy()
    plain = _ladder(features)
    full = _ladder(features, similarity_centring=1.0)
    half = _ladder(features, similarity_centring=0.5)
    ids = plain.assignments
    np.testing.assert_array_equal(ids, full.assignments)
    joined = (ids[:, None, :] == ids[None, :, :]).mean(axis=-1)
    rows = ss.row_agreement(ids).astype(np.float64)
    chance = rows.mean()
    centred = (joined - rows[:, None] - rows[None, :] + chance) / (
        1 - chance)
    np.testing.assert_allclose(_dense(full), centred, atol=1e-5)
    np.testing.assert_allclose(
        _dense(half), 0.5 * (2 * joined - 1) + 0.5 * centred, atol=1e-5)
    # Doubly centred: every row and the whole S average to zero, where
    # 2 a - 1 averages far below (most pairs split at coarse scales); the
    # hierarchy's order survives (same group above different groups).
    s = _dense(full)
    np.testing.assert_allclose(s.mean(axis=1), 0.0, atol=1e-5)
    assert _dense(plain).mean() < -0.3
    same_group = group[:, None] == group[None, :]
    assert s[same_group].mean() > s[~same_group].mean() + 0.5
    assert full.nbytes - plain.nbytes == 4 * len(ids)


def test_modularity_of_two_triangles_joined_by_an_edge():
    # Edges: triangle 0-1-2, triangle 3-4-5, bridge 2-3 (m = 7). Split into
    # the triangles: each keeps 3 of 7 edges and half of the degree sum,
    # Q = 2 (3/7 - (1/2)^2) = 5/14; all in one cluster: Q = 1 - 1 = 0.
    ids = np.array([[1, 2], [0, 2], [0, 3], [4, 2], [3, 5], [3, 4]])
    graph = ss.knn_graph(ids)
    assert graph.sum() == 14  # 7 undirected edges, both directions
    assert ss.modularity(graph, [0, 0, 0, 1, 1, 1]) == pytest.approx(5 / 14)
    assert ss.modularity(graph, [0] * 6) == pytest.approx(0.0)
    assert ss.modularity(graph, [0, 1, 0, 1, 0, 1]) < 0


@pytest.mark.parametrize("clusters", [3, 6, 9])
def test_cluster_count_read_from_the_graph_is_the_number_of_blobs(clusters):
    x, _ = sphere_blobs(n_per=40, clusters=clusters, spread=0.15, seed=clusters)
    ids, _ = ss.nearest_neighbours(x, 10)
    count, scores, _ = ss.graph_cluster_count(ids, 30, seed=0)
    assert count == clusters
    assert set(scores) == set(ss.count_candidates(30))


def test_count_candidates_and_ensemble_counts():
    assert ss.count_candidates(5) == [2, 3, 4, 5]
    assert ss.count_candidates(64)[-9:] == [16, 19, 23, 28, 34, 41, 49, 59,
                                            64]
    assert ss.ensemble_counts(7, 1.0, 3) == [7, 7, 7]
    assert ss.ensemble_counts(10, 2.0, 5) == [10, 12, 14, 17, 20]
    assert ss.ensemble_counts(10, 2.0, 1) == [10]


@pytest.mark.parametrize("mode", ["cluster", "manifold"])
def test_auto_count_recovers_blobs_without_being_told_their_number(mode):
    x, labels = sphere_blobs(clusters=7)
    structure = _build(mode, x, similarity_clusters=0,
                       similarity_cluster_size=10,
                       similarity_cluster_span=1.5)
    summary = structure.summary()
    assert summary["cluster_counts"] == [7, 9, 10]
    assert max(summary["count_modularity"].items(),
               key=lambda kv: kv[1])[0] == "7"
    s = _dense(structure)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    similar = (s == 1) & off
    assert similar.sum() >= 0.5 * (same & off).sum()
    assert same[similar].mean() >= 0.95
    assert (~same[s == -1]).mean() >= 0.95


def test_a_fixed_count_with_span_one_keeps_its_old_structure():
    x, _ = sphere_blobs()
    structure = _build("manifold", x, similarity_cluster_span=1.0)
    ids, _ = ss.nearest_neighbours(x, 10)
    expected = ss.cluster_assignments(ss.spectral_embedding(ids, 5, 0), 5,
                                      3, 0)
    np.testing.assert_array_equal(structure.assignments, expected)
    with pytest.raises(ValueError, match="similarity_cluster_span"):
        _build("manifold", x, similarity_cluster_span=0.5)


def test_a_large_train_set_reads_its_count_from_a_row_sample(monkeypatch):
    x, labels = sphere_blobs(n_per=60, clusters=6)
    monkeypatch.setattr(ss, "COUNT_SAMPLE", 200)
    structure = _build("manifold", x, similarity_clusters=0,
                       similarity_cluster_size=10)
    assert structure.summary()["cluster_counts"] == [6, 6, 6]
    s = _dense(structure)
    same = labels[:, None] == labels[None, :]
    assert same[s == 1].mean() >= 0.95


def test_sampled_block_in_row_steps_equals_one_block(monkeypatch):
    """The fractions' sample is computed a few rows a step (memory); the
    block and the fractions equal those of one call."""
    features, _, _ = _hierarchy()
    structure = _ladder(features, similarity_centring=0.5)
    n = structure.num_items
    rows, cols = entries.sample_pairs(n, 0)
    whole = structure.block(rows, cols).numpy()
    monkeypatch.setattr(entries, "SAMPLE_ROWS_PER_STEP", 7)
    r, c, stepped = entries.sampled_block(structure, n, 0)
    np.testing.assert_array_equal(r, rows)
    np.testing.assert_array_equal(c, cols)
    np.testing.assert_array_equal(stepped, whole)
    assert n % 7 != 0 and stepped.shape == (len(rows), len(cols))
    assert ss.estimate_fractions(structure, 0) == structure.fractions


def test_the_build_benchmark_builds_the_product_s_with_numbers():
    """benchmarks/similarity_build.py reads the recipe's S values with
    `auto` resolved (a bare "auto" once broke the benchmark)."""
    import importlib.util
    import os

    from uhga_tf import config

    path = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "benchmarks", "similarity_build.py")
    spec = importlib.util.spec_from_file_location("similarity_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    values = module.MODE_PARAMS["coassociation"]
    assert isinstance(values["similarity_centring"], float)
    for key in ("similarity_runs", "similarity_knn",
                "similarity_cluster_size"):
        assert values[key] == config.PRODUCT_RECIPE[key]
    with_auto = config.experiment_from_flat(
        {**config.PRODUCT_RECIPE, "similarity_centring": "auto"})
    assert with_auto.similarity.similarity_centring == 0.5
    features, _, _ = _hierarchy()
    structure = ss.build_structured_similarity(
        features, similarity="coassociation", seed=0,
        **{**module.PARAMS, **values, "similarity_cluster_size": 10})
    assert structure.fractions["negative"] > 0
