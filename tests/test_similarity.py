"""Tests for uhga_tf.similarity (method.md §5)."""

import numpy as np
import pytest

from uhga_tf import similarity


def _features(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    # Non-negative, post-ReLU-like: distances spread over [0, 1] with the
    # mode well inside (bin ~44).
    return rng.random((n, d)) ** 2


def _dense_distances(features):
    f = features.astype(np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    d = 1.0 - f @ f.T
    np.fill_diagonal(d, 0.0)
    return d


def _brute_force_ssdh(features, alpha, beta):
    """Full N x N mirrored-Gaussian fit, written straight from §5."""
    d = _dense_distances(features).ravel()
    edges = -1e-8 + np.arange(101) / 100.0
    counts, _ = np.histogram(d, bins=edges)
    m = edges[np.argmax(counts)]
    # Mirror and fit: MLE mean is m by symmetry, variance is the mean square.
    left = d[d <= m]
    right = d[d > m]
    left_mirrored = np.concatenate([left, 2 * m - left])
    right_mirrored = np.concatenate([right, 2 * m - right])
    sigma_l = left_mirrored.std()
    sigma_r = right_mirrored.std()
    assert abs(left_mirrored.mean() - m) < 1e-12
    return m - alpha * sigma_l, m + beta * sigma_r, m


def test_ssdh_thresholds_equal_brute_force_fit():
    features = _features()
    for alpha, beta in [(0.2, 0.2), (2.0, 2.0), (0.5, 1.5)]:
        result = similarity.build_similarity_matrix(
            features,
            similarity_lambda=0.2,
            ssdh_alpha=alpha,
            ssdh_beta=beta,
            block_size=64,
        )
        tau_sim, tau_dis, m = _brute_force_ssdh(features, alpha, beta)
        assert result.distance_mode == pytest.approx(m, abs=1e-15)
        assert result.tau_sim == pytest.approx(tau_sim, rel=1e-9)
        assert result.tau_dis == pytest.approx(tau_dis, rel=1e-9)
        assert tau_sim < m < tau_dis
        d = _dense_distances(features)
        expected = np.where(d < tau_sim, 1, np.where(d > tau_dis, -1, 0))
        np.testing.assert_array_equal(result.similarity_matrix, expected)
        assert result.similarity_matrix.dtype == np.int8
        assert result.mode == "ssdh"


def test_blockwise_equals_dense_for_several_block_sizes():
    features = _features(n=150, seed=1)
    reference = similarity.build_similarity_matrix(
        features, block_size=150
    )
    for block_size in (1, 7, 64, 1024):
        result = similarity.build_similarity_matrix(
            features, block_size=block_size
        )
        np.testing.assert_array_equal(
            result.similarity_matrix, reference.similarity_matrix
        )
        assert result.tau_sim == pytest.approx(reference.tau_sim, rel=1e-12)
        assert result.tau_dis == pytest.approx(reference.tau_dis, rel=1e-12)
    histogram = similarity.cosine_distance_histogram(features, block_size=13)
    dense_counts, _ = np.histogram(
        _dense_distances(features).ravel(), bins=histogram.bin_edges
    )
    np.testing.assert_array_equal(histogram.counts, dense_counts)
    assert histogram.counts.sum() == 150 * 150


def test_lambda_zero_labels_every_pair_and_fractions_sum_to_one():
    features = _features(n=120, seed=2)
    result = similarity.build_similarity_matrix(
        features, similarity_lambda=0.0
    )
    assert result.fractions["unlabeled"] == pytest.approx(0.0, abs=1e-12)
    assert result.tau_sim == result.tau_dis == result.distance_mode
    wide = similarity.build_similarity_matrix(features, similarity_lambda=0.9)
    assert wide.fractions["unlabeled"] > 0.05
    for r in (result, wide):
        assert sum(r.fractions.values()) == pytest.approx(1.0, abs=1e-12)
        assert r.fractions["positive"] == pytest.approx(
            np.mean(r.similarity_matrix == 1)
        )
    # The diagonal (d = 0) is always similar when tau_sim > 0.
    assert np.all(np.diag(wide.similarity_matrix) == 1)


def test_threshold_mode():
    features = _features(n=80, seed=3)
    d = _dense_distances(features)
    result = similarity.build_similarity_matrix(
        features,
        similarity="threshold",
        similarity_threshold=0.1,
        dissimilarity_threshold=0.3,
        block_size=16,
    )
    expected = np.where(d < 0.1, 1, np.where(d > 0.3, -1, 0))
    np.testing.assert_array_equal(result.similarity_matrix, expected)
    assert result.mode == "threshold"
    assert (result.tau_sim, result.tau_dis) == (0.1, 0.3)
    single = similarity.build_similarity_matrix(
        features, similarity="threshold", similarity_threshold=0.2
    )
    assert single.fractions["unlabeled"] == pytest.approx(
        np.mean(d == 0.2), abs=1e-12
    )


def test_resolve_positive_weight():
    matrix = np.array([[1, -1, -1], [-1, 1, 0], [-1, 0, 1]], np.int8)
    assert similarity.resolve_positive_weight("auto", matrix) == 4 / 3
    assert similarity.resolve_positive_weight(10, matrix) == 10.0
    wrapped = similarity.SimilarityMatrix(matrix, 0.1, 0.2, "ssdh", {})
    assert similarity.resolve_positive_weight("auto", wrapped) == 4 / 3
    with pytest.raises(ValueError, match="positive_weight"):
        similarity.resolve_positive_weight("median", matrix)
    with pytest.raises(ValueError, match="positive_weight"):
        similarity.resolve_positive_weight(-1.0, matrix)
    with pytest.raises(ValueError, match="0 positive"):
        similarity.resolve_positive_weight("auto", -np.ones((2, 2), np.int8))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"similarity": "knn"}, "similarity"),
        ({"similarity_lambda": -0.1}, "similarity_lambda"),
        ({"ssdh_beta": float("nan")}, "ssdh_beta"),
        ({"block_size": 0}, "block_size"),
        ({"similarity": "threshold"}, "similarity_threshold"),
        (
            {
                "similarity": "threshold",
                "similarity_threshold": 0.5,
                "dissimilarity_threshold": 0.2,
            },
            "dissimilarity_threshold",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        similarity.build_similarity_matrix(_features(n=10), **kwargs)


def test_bad_features_raise():
    with pytest.raises(ValueError, match="features"):
        similarity.build_similarity_matrix(np.zeros(5))
    with pytest.raises(ValueError, match="features"):
        similarity.build_similarity_matrix(np.full((3, 2), np.nan))
