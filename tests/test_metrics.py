"""Metrics of protocol §3 against the §4 worked example and brute force.

Worked example (protocol.md §4), K = 4, one query (+1,+1,+1,+1) of class A
and six database items with distances 2, 1, 0, 1, 2, 3 and relevance
1, 0, 1, 1, 0, 1. Stable order 2, 1, 3, 0, 4, 5 -> relevance 1, 0, 1, 1, 0, 1:
AP@ALL = (1 + 2/3 + 3/4 + 4/6)/4 = 37/48; tie-aware AP = 127/160;
AP@3 = (1 + 2/3)/2 = 5/6 (retrieved) and (1 + 2/3)/3 = 5/9 (min_rk);
P@3 = 2/3; within radius 2: P = 3/5, R = 3/4. A second query of class C
(no relevant item): MAP = 37/96 and tie-aware 127/320 under
empty_query=zero, 37/48 under skip.
"""

import itertools
import json
import os
from fractions import Fraction

import numpy as np
import pytest

import hamming_oracle
import protocol_example
from uhga_tf.evaluation import metrics
from uhga_tf.evaluation import plots
from uhga_tf.evaluation import ranking

DATABASE = protocol_example.DATABASE
DATABASE_LABELS = protocol_example.DATABASE_LABELS
QUERY = protocol_example.QUERY
QUERY_LABELS = protocol_example.QUERY_LABELS
TWO_QUERIES = np.ones((2, 4), dtype=np.int8)
TWO_QUERY_LABELS = np.array([0, 2])
EXACT = 1e-12


def _f(numerator, denominator):
    return float(Fraction(numerator, denominator))


# --------------------------------------------------------------------------
# Worked example
# --------------------------------------------------------------------------


def test_worked_example_map_and_tie_aware():
    data = (QUERY, DATABASE, QUERY_LABELS, DATABASE_LABELS)
    assert metrics.mean_average_precision(*data) == pytest.approx(
        _f(37, 48), abs=EXACT)
    assert metrics.tie_aware_map(*data) == pytest.approx(
        _f(127, 160), abs=EXACT)
    assert metrics.mean_average_precision(*data, top_k=3) == pytest.approx(
        _f(5, 6), abs=EXACT)
    assert metrics.mean_average_precision(
        *data, top_k=3, ap_denominator="min_rk") == pytest.approx(
            _f(5, 9), abs=EXACT)
    # Z = R = 4 under "all" at k = 3.
    assert metrics.mean_average_precision(
        *data, top_k=3, ap_denominator="all") == pytest.approx(
            _f(5, 12), abs=EXACT)


def test_worked_example_precision_and_pr_curve():
    data = (QUERY, DATABASE, QUERY_LABELS, DATABASE_LABELS)
    assert metrics.precision_at_n(*data, n_values=[3])[3] == pytest.approx(
        _f(2, 3), abs=EXACT)
    within = metrics.precision_recall_within_radius(*data, hamming_radius=2)
    assert within["precision"] == pytest.approx(0.6, abs=EXACT)
    assert within["recall"] == pytest.approx(0.75, abs=EXACT)
    assert within["empty_radius_share"] == 0.0
    curve = metrics.precision_recall_curve(*data)
    assert curve["hamming_radius"] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(
        curve["recall"], [0.25, 0.5, 0.75, 1.0, 1.0], atol=EXACT)
    np.testing.assert_allclose(
        curve["precision"], [1.0, _f(2, 3), 0.6, _f(2, 3), _f(2, 3)],
        atol=EXACT)


def test_worked_example_empty_query():
    data = (TWO_QUERIES, DATABASE, TWO_QUERY_LABELS, DATABASE_LABELS)
    assert metrics.mean_average_precision(*data) == pytest.approx(
        _f(37, 96), abs=EXACT)
    assert metrics.tie_aware_map(*data) == pytest.approx(
        _f(127, 320), abs=EXACT)
    assert metrics.mean_average_precision(
        *data, empty_query="skip") == pytest.approx(_f(37, 48), abs=EXACT)
    assert metrics.tie_aware_map(*data, empty_query="skip") == pytest.approx(
        _f(127, 160), abs=EXACT)
    result = metrics.evaluate_codes(*data, precision_at=(3,))
    assert result["map"] == pytest.approx(_f(37, 96), abs=EXACT)
    assert result["map_tie_aware"] == pytest.approx(_f(127, 320), abs=EXACT)
    assert result["num_empty_queries"] == 1
    assert result["precision_at_n"][3] == pytest.approx(_f(1, 3), abs=EXACT)
    # Recall of the empty query counts as 0 (empty_query=zero): 3/4 / 2.
    assert result["recall_radius"] == pytest.approx(0.375, abs=EXACT)
    skipped = metrics.evaluate_codes(*data, empty_query="skip",
                                     precision_at=(3,))
    assert skipped["map"] == pytest.approx(_f(37, 48), abs=EXACT)
    assert skipped["recall_radius"] == pytest.approx(0.75, abs=EXACT)


def test_tie_aware_matches_the_four_tie_orders():
    # protocol §4: the four tie orders give 37/48, 41/48, 11/15 and 49/60.
    values = [_f(37, 48), _f(41, 48), _f(11, 15), _f(49, 60)]
    assert np.mean(values) == pytest.approx(_f(127, 160), abs=EXACT)
    assert _enumerated_tie_aware_ap(
        np.array([2, 1, 0, 1, 2, 3]), np.array([1, 0, 1, 1, 0, 1], bool)
    ) == pytest.approx(_f(127, 160), abs=EXACT)


# --------------------------------------------------------------------------
# Brute-force references, written plainly
# --------------------------------------------------------------------------


def _reference_ap(dist_row, rel_row, top_k, ap_denominator):
    """(AP, empty) by stable argsort and cumulative precision."""
    order = np.argsort(dist_row, kind="stable")
    ranked = rel_row[order][:top_k]
    hits = 0
    total = 0.0
    for t, relevant in enumerate(ranked, start=1):
        if relevant:
            hits += 1
            total += hits / t
    num_relevant = int(rel_row.sum())
    z = {"retrieved": hits, "min_rk": min(num_relevant, top_k),
         "all": num_relevant}[ap_denominator]
    return (0.0 if z == 0 else total / z), z == 0


def _reference_map(query, database, query_labels, database_labels, top_k,
                   ap_denominator, empty_query):
    dist = hamming_oracle.hamming_distance(query, database)
    rel = _reference_relevance(query_labels, database_labels)
    aps = []
    for q in range(query.shape[0]):
        ap, empty = _reference_ap(dist[q], rel[q], top_k or database.shape[0],
                                  ap_denominator)
        if empty and empty_query == "skip":
            continue
        aps.append(ap)
    return float(np.mean(aps)) if aps else float("nan")


def _reference_relevance(query_labels, database_labels):
    rel = np.zeros((len(query_labels), len(database_labels)), bool)
    for q, a in enumerate(query_labels):
        for n, b in enumerate(database_labels):
            if np.ndim(a) == 0:
                rel[q, n] = a == b
            else:
                rel[q, n] = bool(np.any(np.logical_and(a, b)))
    return rel


def _enumerated_tie_aware_ap(dist_row, rel_row):
    """Mean AP@ALL over every order within each distance group."""
    groups = [np.flatnonzero(dist_row == d) for d in np.unique(dist_row)]
    num_relevant = rel_row.sum()
    if num_relevant == 0:
        return 0.0
    values = []
    for choice in itertools.product(
        *[list(itertools.permutations(g)) for g in groups]
    ):
        ranked = rel_row[np.concatenate(choice)]
        hits = np.cumsum(ranked)
        values.append(
            np.sum(ranked * hits / np.arange(1, len(ranked) + 1))
            / num_relevant
        )
    return float(np.mean(values))


def _random_case(seed, num_query, num_database, code_length, multi_label):
    rng = np.random.default_rng(seed)
    query = hamming_oracle.random_codes(rng, num_query, code_length)
    database = hamming_oracle.random_codes(rng, num_database, code_length)
    if multi_label:
        query_labels = (rng.random((num_query, 4)) < 0.25).astype(np.int64)
        database_labels = (rng.random((num_database, 4)) < 0.25).astype(
            np.int64)
    else:
        # Class 5 is never in the database: those queries are empty.
        query_labels = rng.integers(0, 6, num_query)
        database_labels = rng.integers(0, 5, num_database)
    return query, database, query_labels, database_labels


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_equals_brute_force(seed, multi_label, monkeypatch):
    # A tiny batch budget forces several query batches.
    monkeypatch.setattr(ranking, "BATCH_BYTES", 40 * 70 * 4)
    case = _random_case(seed, 25, 70, 5, multi_label)  # 6 distances: ties
    rel = _reference_relevance(case[2], case[3])
    assert (rel.sum(1) == 0).any() or multi_label
    for top_k in (None, 1, 6, 33, 70):
        for ap_denominator in metrics.AP_DENOMINATORS:
            for empty_query in metrics.EMPTY_QUERY_RULES:
                ours = metrics.mean_average_precision(
                    *case, top_k=top_k, ap_denominator=ap_denominator,
                    empty_query=empty_query)
                expected = _reference_map(*case, top_k, ap_denominator,
                                          empty_query)
                assert ours == pytest.approx(expected, abs=EXACT), (
                    top_k, ap_denominator, empty_query)


@pytest.mark.parametrize("seed", range(6))
def test_tie_aware_equals_enumeration(seed):
    case = _random_case(seed, 4, 7, 3, multi_label=seed % 2 == 1)
    query, database, query_labels, database_labels = case
    dist = (3 - query.astype(int) @ database.T.astype(int)) // 2
    rel = _reference_relevance(query_labels, database_labels)
    per_query = [_enumerated_tie_aware_ap(dist[q], rel[q]) for q in range(4)]
    assert metrics.tie_aware_map(*case) == pytest.approx(
        np.mean(per_query), abs=EXACT)
    kept = [v for v, r in zip(per_query, rel.sum(1)) if r > 0]
    assert metrics.tie_aware_map(*case, empty_query="skip") == pytest.approx(
        np.mean(kept), abs=EXACT)


@pytest.mark.parametrize("seed", [3, 4])
def test_curves_equal_brute_force(seed):
    case = _random_case(seed, 20, 60, 6, multi_label=seed == 4)
    query, database, query_labels, database_labels = case
    dist = (6 - query.astype(int) @ database.T.astype(int)) // 2
    rel = _reference_relevance(query_labels, database_labels)
    num_relevant = rel.sum(1)
    for empty_radius in ("zero", "skip"):
        for empty_query in ("zero", "skip"):
            curve = metrics.precision_recall_curve(
                *case, empty_radius=empty_radius, empty_query=empty_query)
            for rho in range(7):
                inside = dist <= rho
                n = inside.sum(1)
                tp = (inside & rel).sum(1)
                p = [tp[q] / n[q] if n[q] else 0.0 for q in range(20)
                     if n[q] or empty_radius == "zero"]
                r = [tp[q] / num_relevant[q] if num_relevant[q] else 0.0
                     for q in range(20)
                     if num_relevant[q] or empty_query == "zero"]
                expected_p = np.mean(p) if p else np.nan
                np.testing.assert_allclose(curve["precision"][rho],
                                           expected_p, atol=EXACT)
                np.testing.assert_allclose(curve["recall"][rho], np.mean(r),
                                           atol=EXACT)
                within = metrics.precision_recall_within_radius(
                    *case, hamming_radius=rho, empty_radius=empty_radius,
                    empty_query=empty_query)
                np.testing.assert_allclose(within["precision"], expected_p,
                                           atol=EXACT)
                assert within["empty_radius_share"] == pytest.approx(
                    np.mean(n == 0), abs=EXACT)
    order = np.argsort(dist, axis=1, kind="stable")
    ranked = np.take_along_axis(rel, order, axis=1)
    result = metrics.precision_at_n(*case, n_values=[1, 5, 60])
    for n in (1, 5, 60):
        assert result[n] == pytest.approx(ranked[:, :n].mean(), abs=EXACT)


def test_evaluate_codes_agrees_with_the_functions():
    case = _random_case(7, 30, 80, 8, multi_label=False)
    result = metrics.evaluate_codes(*case, precision_at=(10, 20, 500))
    json.dumps(result)  # JSON-serialisable
    assert result["map"] == metrics.mean_average_precision(*case)
    assert result["map_tie_aware"] == pytest.approx(
        metrics.tie_aware_map(*case), abs=EXACT)
    assert result["precision_at_n"] == metrics.precision_at_n(
        *case, n_values=[10, 20])  # 500 > database size: dropped
    assert result["pr_curve"] == metrics.precision_recall_curve(*case)
    within = metrics.precision_recall_within_radius(*case)
    assert result["precision_radius"] == within["precision"]
    assert result["recall_radius"] == within["recall"]
    assert result["empty_radius_share"] == within["empty_radius_share"]
    assert (result["top_k"], result["code_length"], result["num_query"],
            result["num_database"]) == (80, 8, 30, 80)
    at_k = metrics.evaluate_codes(*case, top_k=10, precision_at=())
    assert at_k["map"] == metrics.mean_average_precision(*case, top_k=10)
    assert at_k["map_tie_aware"] is None  # defined for MAP@ALL only


# --------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------


def test_perfect_codes_give_map_one():
    rng = np.random.default_rng(0)
    class_codes = hamming_oracle.random_codes(rng, 10, 16)
    database_labels = np.arange(200) % 10
    query_labels = np.arange(30) % 10
    data = (class_codes[query_labels], class_codes[database_labels],
            query_labels, database_labels)
    assert metrics.mean_average_precision(*data) == 1.0
    assert metrics.tie_aware_map(*data) == pytest.approx(1.0, abs=EXACT)


def test_random_codes_give_chance_map():
    # 10 balanced classes, random 32-bit codes: MAP ~ 0.1 (measured 0.1025,
    # tie-aware 0.1025).
    rng = np.random.default_rng(0)
    query = hamming_oracle.random_codes(rng, 200, 32)
    database = hamming_oracle.random_codes(rng, 3000, 32)
    data = (query, database, np.arange(200) % 10, np.arange(3000) % 10)
    assert abs(metrics.mean_average_precision(*data) - 0.1) < 0.02
    assert abs(metrics.tie_aware_map(*data) - 0.1) < 0.02


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

GOOD = (TWO_QUERIES, DATABASE, TWO_QUERY_LABELS, DATABASE_LABELS)


@pytest.mark.parametrize(
    "fn",
    [metrics.mean_average_precision, metrics.tie_aware_map,
     metrics.precision_recall_curve, metrics.precision_recall_within_radius,
     metrics.precision_at_n, metrics.evaluate_codes],
)
@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((2, 4), np.int8),) + GOOD[1:], "only -1 and \\+1"),
        ((TWO_QUERIES * 3,) + GOOD[1:], "only -1 and \\+1"),
        ((TWO_QUERIES, DATABASE[:, :3]) + GOOD[2:], "same code_length"),
        (GOOD[:2] + (np.array([0, 1, 2]), DATABASE_LABELS),
         "query_labels must have one row per code"),
        (GOOD[:3] + (DATABASE_LABELS[:5],),
         "database_labels must have one row per code"),
    ],
)
def test_bad_input_raises(fn, args, match):
    kwargs = {"n_values": [1]} if fn is metrics.precision_at_n else {}
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 0}, "top_k must be None or an int in \\[1, 6\\]"),
        ({"top_k": 7}, "top_k must be None or an int in \\[1, 6\\]"),
        ({"ap_denominator": "mean"}, "ap_denominator must be one of"),
        ({"empty_query": "drop"}, "empty_query must be one of"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        metrics.mean_average_precision(*GOOD, **kwargs)
    with pytest.raises(ValueError, match=match):
        metrics.evaluate_codes(*GOOD, **kwargs)


def test_bad_radius_and_n_values_raise():
    with pytest.raises(ValueError, match="hamming_radius must be an int"):
        metrics.precision_recall_within_radius(*GOOD, hamming_radius=5)
    with pytest.raises(ValueError, match="empty_radius must be one of"):
        metrics.precision_recall_curve(*GOOD, empty_radius="none")
    for n_values in ([0], [7], [], [1.5]):
        with pytest.raises(ValueError, match="n_values must be"):
            metrics.precision_at_n(*GOOD, n_values=n_values)
    with pytest.raises(ValueError, match="empty_query must be one of"):
        metrics.tie_aware_map(*GOOD, empty_query="nan")


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


def test_plots_write_images(tmp_path):
    result = metrics.evaluate_codes(*GOOD, precision_at=(1, 3, 6))
    loaded = json.loads(json.dumps(result))  # str keys, None values
    paths = [
        plots.plot_pr_curves({"ours": loaded["pr_curve"]},
                             tmp_path / "pr.png"),
        plots.plot_precision_at_n({"ours": loaded["precision_at_n"]},
                                  tmp_path / "p_at_n.png"),
        plots.plot_map_vs_code_length(
            {"ITQ": {16: 0.2, 32: 0.25}, "ours": {"16": 0.3, "32": 0.4}},
            tmp_path / "map.png", paper={"ITQ": {16: 0.16, 32: 0.17}}),
    ]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["map.png", "p_at_n.png", "pr.png"]
    with pytest.raises(ValueError, match="pr_curves must be a non-empty dict"):
        plots.plot_pr_curves({}, tmp_path / "x.png")


def test_tie_aware_headline_equals_deterministic_map_without_ties():
    """One query, a database at Hamming distances 0..K (all distinct): no
    tie order exists, so the headline and the stable-rule MAP agree."""
    code_length = 16
    query = np.ones((1, code_length), np.int8)
    database = np.ones((code_length + 1, code_length), np.int8)
    for d in range(code_length + 1):
        database[d, :d] = -1
    order = np.random.default_rng(0).permutation(code_length + 1)
    database = database[order]
    labels = (np.arange(code_length + 1) % 3 == 0)[order].astype(np.int64)
    result = metrics.evaluate_codes(query, database, np.array([1]), labels,
                                    precision_at=(), map_at=())
    assert result["map_tie_aware"] == pytest.approx(result["map"], abs=1e-12)
    # Relevant at distances 0, 3, ..., 15: AP = mean(i / (3 i - 2)).
    expected = np.mean([i / (3 * i - 2) for i in range(1, 7)])
    assert result["map"] == pytest.approx(expected, abs=1e-12)


def test_map_at_in_one_pass_equals_separate_passes():
    """evaluate_codes computes every MAP@k in the pass of its top_k; each
    equals `mean_average_precision` at that k alone, bit for bit (a k past
    top_k widens the pass, one equal to it is not repeated)."""
    rng = np.random.default_rng(3)
    query_codes = hamming_oracle.random_codes(rng, 25, 16)
    database_codes = hamming_oracle.random_codes(rng, 300, 16)
    query_labels = rng.integers(0, 4, 25)
    database_labels = rng.integers(0, 4, 300)
    data = (query_codes, database_codes, query_labels, database_labels)
    for denominator in metrics.AP_DENOMINATORS:
        result = metrics.evaluate_codes(
            *data, top_k=50, map_at=(5, 50, 120, 300, 1000),
            ap_denominator=denominator, precision_at=(10,))
        assert list(result["map_at"]) == [5, 50, 120]
        for k in (5, 50, 120):
            assert result["map_at"][k] == metrics.mean_average_precision(
                *data, top_k=k, ap_denominator=denominator), (denominator, k)
        assert result["map"] == result["map_at"][50]
