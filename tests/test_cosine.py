"""Cosine ranking: a hand-worked toy set, the pre-refactor numbers, and the
Hamming metrics as an oracle.

Toy set: database d0 = (1, 0), d1 = (0, 1), d2 = (1, 1), d3 = (-1, 0),
d4 = (2, 0) with classes 0, 1, 0, 1, 1; queries (1, 0), (0, 1), (-1, 0)
of classes 0, 1, 2.
- q0: similarities 1, 0, .71, -1, 1; d0 and d4 tie at 1 and the lower
  index goes first: order d0 d4 d2 d1 d3, relevance 1 0 1 0 0,
  AP@ALL = (1 + 2/3)/2 = 5/6 (7/12 if the tie went the other way),
  AP@2 = 1, P@1 = 1, P@3 = 2/3.
- q1: order d1 d2 then the tie at 0 in index order d0 d3 d4, relevance
  1 0 0 1 1: AP@ALL = (1 + 2/4 + 3/5)/3 = 7/10, AP@2 = 1, P@1 = 1,
  P@3 = 1/3.
- q2: class 2 has no item: AP 0 and P@n 0 (the query stays in the mean).
MAP@ALL = (5/6 + 7/10)/3 = 23/45, MAP@2 = 2/3, P@1 = 2/3, P@3 = 1/3.
"""

from fractions import Fraction

import numpy as np
import pytest

import hamming_oracle
from uhga_tf.evaluation import cosine
from uhga_tf.evaluation import metrics

DATABASE = np.array([[1, 0], [0, 1], [1, 1], [-1, 0], [2, 0]], np.float64)
DATABASE_LABELS = np.array([0, 1, 0, 1, 1])
QUERY = np.array([[1, 0], [0, 1], [-1, 0]], np.float64)
QUERY_LABELS = np.array([0, 1, 2])
EXACT = 1e-12


def _f(numerator, denominator):
    return float(Fraction(numerator, denominator))


def test_toy_set_by_hand():
    out = cosine.cosine_metrics(QUERY, DATABASE, QUERY_LABELS,
                                DATABASE_LABELS, map_at=(2,),
                                precision_at=(1, 3))
    assert list(out) == ["map_2", "map_all", "p_1", "p_3"]
    expected = {"map_2": _f(2, 3), "map_all": _f(23, 45),
                "p_1": _f(2, 3), "p_3": _f(1, 3)}
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=EXACT), key
    data = (QUERY, DATABASE, QUERY_LABELS, DATABASE_LABELS)
    assert cosine.cosine_map(*data) == pytest.approx(_f(23, 45), abs=EXACT)
    assert cosine.cosine_map(*data, top_k=2) == pytest.approx(
        _f(2, 3), abs=EXACT)
    # A cut-off past the database is MAP@ALL.
    assert cosine.cosine_map(*data, top_k=50) == pytest.approx(
        _f(23, 45), abs=EXACT)


def _random_case(rng):
    query = rng.normal(size=(40, 8))
    database = rng.normal(size=(120, 8))
    return (query, database, rng.integers(0, 4, 40),
            rng.integers(0, 4, 120))


def test_equals_the_previous_implementation():
    """Numbers of the cosine module before it used `metrics` (own AP sums,
    batches of 256 queries), on seeded data: centred single-label with a
    cut-off past the database, and multi-label multi-hot."""
    rng = np.random.default_rng(0)
    query, database, query_labels, database_labels = _random_case(rng)
    out = cosine.cosine_metrics(
        query, database, query_labels, database_labels,
        mean=database.mean(axis=0), map_at=(10, 1000), precision_at=(5, 50),
        batch_size=16)
    previous = {"map_10": 0.420386078042328, "map_all": 0.28187913813600296,
                "p_5": 0.21500000000000002, "p_50": 0.25250000000000006}
    assert out == pytest.approx(previous, abs=EXACT)
    assert cosine.cosine_map(
        query, database, query_labels, database_labels, top_k=10
    ) == pytest.approx(0.41378439153439145, abs=EXACT)
    query_labels = (rng.random((30, 5)) < 0.3).astype(int)
    database_labels = (rng.random((90, 5)) < 0.3).astype(int)
    out = cosine.cosine_metrics(query[:30], database[:90], query_labels,
                                database_labels, map_at=(20,),
                                precision_at=(10,))
    previous = {"map_20": 0.481148174224577, "map_all": 0.4278294287334086,
                "p_10": 0.4433333333333333}
    assert out == pytest.approx(previous, abs=EXACT)


def test_codes_as_features_give_the_hamming_metrics():
    """+-1 codes as float features: cosine = 1 - 2 d / K orders the
    database exactly as the Hamming distance d, ties included (K = 16 keeps
    the unit rows +-1/4, so every similarity is exact), so the numbers are
    the Hamming metrics' bit for bit."""
    rng = np.random.default_rng(1)
    query_codes = hamming_oracle.random_codes(rng, 30, 16)
    database_codes = hamming_oracle.random_codes(rng, 200, 16)
    query_labels = rng.integers(0, 3, 30)
    database_labels = rng.integers(0, 3, 200)
    out = cosine.cosine_metrics(
        query_codes.astype(np.float64), database_codes.astype(np.float64),
        query_labels, database_labels, map_at=(10,), precision_at=(5, 50))
    data = (query_codes, database_codes, query_labels, database_labels)
    assert out["map_all"] == metrics.mean_average_precision(*data)
    assert out["map_10"] == metrics.mean_average_precision(*data, top_k=10)
    assert [out["p_5"], out["p_50"]] == list(
        metrics.precision_at_n(*data, n_values=(5, 50)).values())
    # Ties matter here: a reversed tie rule would give another MAP@10.
    assert out["map_10"] != pytest.approx(metrics.mean_average_precision(
        query_codes, database_codes[::-1], query_labels,
        database_labels[::-1], top_k=10), abs=1e-6)


def test_precision_past_the_database_is_refused():
    with pytest.raises(ValueError, match="n_values must be"):
        cosine.cosine_metrics(QUERY, DATABASE, QUERY_LABELS,
                              DATABASE_LABELS, precision_at=(6,))
