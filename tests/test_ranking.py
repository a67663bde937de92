"""Hamming ranking: stable (distance, index) tie rule and relevance."""

import numpy as np
import pytest

import hamming_oracle
import protocol_example
from uhga_tf.evaluation import ranking

EXAMPLE_DATABASE = protocol_example.DATABASE
EXAMPLE_QUERY = protocol_example.QUERY


def test_worked_example_order():
    indices, distances = ranking.hamming_ranking(EXAMPLE_QUERY,
                                                 EXAMPLE_DATABASE)
    assert indices.tolist() == [[2, 1, 3, 0, 4, 5]]
    assert distances.tolist() == [[0, 1, 1, 2, 2, 3]]
    indices, distances = ranking.hamming_ranking(EXAMPLE_QUERY,
                                                 EXAMPLE_DATABASE, top_k=3)
    assert indices.tolist() == [[2, 1, 3]]
    assert distances.tolist() == [[0, 1, 1]]


@pytest.mark.parametrize("code_length", [6, 16, 300])
def test_matches_stable_argsort_with_ties(code_length, monkeypatch):
    # Small batches force several query batches; 300 bits uses uint16.
    monkeypatch.setattr(ranking, "BATCH_BYTES", 40 * 150 * 3)
    rng = np.random.default_rng(0)
    query = hamming_oracle.random_codes(rng, 11, code_length)
    database = hamming_oracle.random_codes(rng, 150, code_length)
    database[50:60] = database[0]  # exact duplicates: ties at every query
    dist = hamming_oracle.hamming_distance(query, database)
    expected = np.argsort(dist, axis=1, kind="stable")
    for top_k in (None, 1, 17, 150):
        indices, distances = ranking.hamming_ranking(query, database, top_k)
        k = top_k or 150
        np.testing.assert_array_equal(indices, expected[:, :k])
        np.testing.assert_array_equal(
            distances, np.take_along_axis(dist, expected[:, :k], axis=1)
        )
        assert indices.dtype == np.int64 and distances.dtype == np.int32


@pytest.mark.parametrize("code_length", [4, 64, 65, 128, 256, 300])
@pytest.mark.parametrize("use_popcount", [True, False])
def test_distance_kernel_equals_brute_force_distance(code_length,
                                                     use_popcount):
    # Popcount on 64-bit words (1, 2, 4, 5 words) and the float32 matmul
    # fallback both equal the bit-by-bit count; 256 bits needs uint16.
    rng = np.random.default_rng(1)
    query = hamming_oracle.random_codes(rng, 7, code_length)
    database = hamming_oracle.random_codes(rng, 40, code_length)
    database[0] = -query[0]  # distance = code_length
    kernel = ranking.DistanceKernel(database, use_popcount=use_popcount)
    distances = kernel(query)
    np.testing.assert_array_equal(
        distances, hamming_oracle.hamming_distance(query, database))
    assert distances[0, 0] == code_length
    assert distances.dtype == (np.uint8 if code_length <= 255 else np.uint16)


def test_relevance_single_and_multi_label():
    single = ranking.relevance(np.array([0, 2]), np.array([0, 1, 2, 0]))
    assert single.tolist() == [[True, False, False, True],
                               [False, False, True, False]]
    query = np.array([[1, 0, 1], [0, 0, 0]])
    database = np.array([[0, 0, 1], [0, 1, 0], [1, 1, 1]])
    multi = ranking.relevance(query, database)
    assert multi.tolist() == [[True, False, True], [False, False, False]]


@pytest.mark.parametrize(
    "query, database, match",
    [
        (np.zeros((1, 4), np.int8), EXAMPLE_DATABASE, "only -1 and \\+1"),
        (EXAMPLE_QUERY * 2, EXAMPLE_DATABASE, "only -1 and \\+1"),
        (np.ones((1, 5), np.int8), EXAMPLE_DATABASE, "same code_length"),
        (EXAMPLE_QUERY, np.ones((0, 4), np.int8), "at least one code"),
        (np.ones((1, 0), np.int8), np.ones((2, 0), np.int8),
         "code_length >= 1"),
        (np.ones(4, np.int8), EXAMPLE_DATABASE, "2-D"),
    ],
)
def test_bad_codes_raise(query, database, match):
    with pytest.raises(ValueError, match=match):
        ranking.hamming_ranking(query, database)


@pytest.mark.parametrize("top_k", [0, -1, 7, 2.5, True])
def test_bad_top_k_raises(top_k):
    with pytest.raises(ValueError, match="top_k must be None or an int"):
        ranking.hamming_ranking(EXAMPLE_QUERY, EXAMPLE_DATABASE, top_k=top_k)


@pytest.mark.parametrize(
    "query_labels, database_labels, match",
    [
        (np.array([0]), np.array([[0, 1]]), "both be 1-D"),
        (np.array([[1, 0]]), np.array([[1, 0, 0]]), "same number of label"),
        (np.array([[2, 0]]), np.array([[1, 0]]), "multi-hot"),
        (np.zeros((1, 1, 1)), np.zeros(3), "1-D class ids or a 2-D"),
    ],
)
def test_bad_labels_raise(query_labels, database_labels, match):
    with pytest.raises(ValueError, match=match):
        ranking.relevance(query_labels, database_labels)


def test_label_length_checked():
    with pytest.raises(ValueError, match="database_labels must have one row"):
        ranking.validate_label_pair(np.zeros(2), np.zeros(3), 2, 4)


def test_unlabelled_items_have_no_relevance():
    with pytest.raises(ValueError, match="unlabelled collection"):
        ranking.validate_label_pair([-1, -1], [-1, -1, -1])
