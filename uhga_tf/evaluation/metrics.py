"""Retrieval metrics of protocol.md §3, vectorised over query batches.

Conventions shared by every function here:

- Distances are Hamming distances d = (code_length - q . n) / 2 between
  int8 {-1, +1} codes; ranking ties are broken by database index (stable
  sort on (distance, index), `ranking.hamming_ranking`).
- Relevance: same class for 1-D labels; sharing >= 1 label for 2-D multi-hot
  labels (`ranking.relevance`).
- Distances come from `ranking.DistanceKernel` (popcount of packed 64-bit
  words). Queries are processed in batches sized so that one batch holds
  about `ranking.BATCH_BYTES` (32 MiB) of temporaries; only O(K) numbers
  per query are kept across batches, so 10,000 queries x 59,000 database
  items at 128 bits peak well under 2 GB (`evaluate_codes` measured with
  tracemalloc: 35 MiB at 2,000 x 59,000 x 128 bits, plus 2 x 8 x (K+1)
  bytes per query for the histograms).

Stable AP is computed from a stable counting sort of each query's distances
(O(N + K) per query), the positions t_i of its relevant items in that order,
and AP = (1/Z) sum_i i / t_i. Tie-aware AP (He et al., CVPR 2018) needs only
per-distance histograms and a harmonic-number table shared by all queries; it
uses no sort at all.
"""

import concurrent.futures
import math
import os

import numpy as np
from absl import logging

from uhga_tf import config
from uhga_tf.evaluation import ranking

AP_DENOMINATORS = config.AP_DENOMINATORS
EMPTY_QUERY_RULES = config.EMPTY_QUERY
EMPTY_RADIUS_RULES = ("zero", "skip")
# Bumped when a change of protocol (metric definitions, database order)
# makes stored results incomparable; stored table cells record it.
PROTOCOL_VERSION = 2
DEFAULT_PRECISION_AT = (100, 200, 300, 400, 500, 600, 700, 800, 900, 1000,
                        5000)


def _check_hamming_radius(hamming_radius, code_length):
    return ranking.check_int_in_range(
        "hamming_radius", hamming_radius, 0, code_length, "the code_length"
    )


def _check_n_values(n_values, num_database):
    values = np.atleast_1d(np.asarray(n_values))
    if (
        values.ndim != 1
        or values.size == 0
        or values.dtype.kind not in "iu"
        or values.min() < 1
        or values.max() > num_database
    ):
        raise ValueError(
            f"n_values must be a non-empty list of ints in [1, {num_database}]"
            f" (the database size); received n_values={n_values!r}"
        )
    return [int(v) for v in values]


class QueryBatches:
    """Query batches of one ranking: what the AP and P@n code here reads.

    A subclass defines `distances(start, stop)`: float or integer
    [stop - start, num_database], smaller first, sorted by
    `ranking.stable_order` (ties by database index). The Hamming metrics
    (`_Inputs`) and cosine ranking (`cosine`) differ only there, so MAP@k
    and P@n of both come from the same `_collect`.
    """

    def __init__(self, query_labels, database_labels, num_query,
                 num_database, batch_size=None):
        self.num_query = num_query
        self.num_database = num_database
        self.query_labels, self.database_labels = (
            ranking.validate_label_pair(
                query_labels, database_labels, num_query, num_database,
            )
        )
        self.batch_size = batch_size or ranking.query_batch_size(
            num_database)

    def spans(self):
        """(start, stop) of each query batch."""
        return [
            (start, min(start + self.batch_size, self.num_query))
            for start in range(0, self.num_query, self.batch_size)
        ]

    def batch(self, start, stop):
        """(distances, relevance bool) of queries [start, stop)."""
        rel = ranking.relevance_unchecked(
            self.query_labels[start:stop], self.database_labels
        )
        return self.distances(start, stop), rel

    def distances(self, start, stop):
        raise NotImplementedError


class _Inputs(QueryBatches):
    """Validated codes and labels plus the Hamming distance kernel."""

    def __init__(self, query_codes, database_codes, query_labels,
                 database_labels):
        self.query_codes, self.database_codes = ranking.validate_code_pair(
            query_codes, database_codes
        )
        super().__init__(query_labels, database_labels,
                         self.query_codes.shape[0],
                         self.database_codes.shape[0])
        self.code_length = self.query_codes.shape[1]
        self.kernel = ranking.DistanceKernel(self.database_codes)

    def distances(self, start, stop):
        return self.kernel(self.query_codes[start:stop])


def _histograms(distances, rel, code_length):
    """Per-query counts of all / relevant items at each distance 0..K."""
    num_rows = distances.shape[0]
    buckets = code_length + 1
    counts = np.empty((num_rows, buckets), dtype=np.int64)
    relevant = np.empty((num_rows, buckets), dtype=np.int64)
    # One bincount per query keeps the int64 temporaries in cache.
    for row in range(num_rows):
        counts[row] = np.bincount(distances[row], minlength=buckets)
        relevant[row] = np.bincount(distances[row][rel[row]],
                                    minlength=buckets)
    return counts, relevant


def _relevant_positions(rel_sorted):
    """Row ids, 1-based positions and 1-based relevant ranks of the hits."""
    width = rel_sorted.shape[1]
    flat = np.flatnonzero(rel_sorted)
    rows = flat // width
    positions = (flat - rows * width + 1).astype(np.float64)
    hits = np.bincount(rows, minlength=rel_sorted.shape[0])
    starts = np.cumsum(hits) - hits
    ranks = (np.arange(flat.size) - np.repeat(starts, hits) + 1).astype(
        np.float64
    )
    return hits, starts, ranks, positions


def _collect(inputs, *, map_at=(), histograms=False, precision_at=()):
    """One pass over the query batches; per-query raw statistics.

    Args:
        inputs: a `QueryBatches`.
        map_at: AP cut-offs k in [1, num_database] (each computed in this
            one pass; the AP sums of a k are bit for bit those of a pass
            with that k alone).

    Returns a dict with, per query: `num_relevant` [Q]; with map_at:
    `ap_sum` [Q, len(map_at)] (sum over relevant items in the top k of
    i / t_i) and `retrieved` [Q, len(map_at)] (relevant items in the top
    k); with histograms: `counts` and `relevant` [Q, K+1]; with
    precision_at: `hits_at` [Q, len(precision_at)] (relevant items among
    the first n).
    """
    num_query = inputs.num_query
    out = {"num_relevant": np.zeros(num_query, dtype=np.int64)}
    if map_at:
        out["ap_sum"] = np.zeros((num_query, len(map_at)), dtype=np.float64)
        out["retrieved"] = np.zeros((num_query, len(map_at)), dtype=np.int64)
    if histograms:
        shape = (num_query, inputs.code_length + 1)
        out["counts"] = np.zeros(shape, dtype=np.int64)
        out["relevant"] = np.zeros(shape, dtype=np.int64)
    if precision_at:
        out["hits_at"] = np.zeros((num_query, len(precision_at)), np.int64)
    deepest = max(map_at, default=0)
    width = max([deepest] + list(precision_at))

    def process(start, stop):
        distances, rel = inputs.batch(start, stop)
        if histograms:
            counts, relevant = _histograms(distances, rel, inputs.code_length)
            out["counts"][start:stop] = counts
            out["relevant"][start:stop] = relevant
            out["num_relevant"][start:stop] = relevant.sum(axis=1)
        else:
            out["num_relevant"][start:stop] = np.count_nonzero(rel, axis=1)
        if not width:
            return
        order = ranking.stable_order(distances)
        if width < order.shape[1]:
            order = order[:, :width]
        rel_sorted = np.empty(order.shape, dtype=bool)
        for row in range(order.shape[0]):
            np.take(rel[row], order[row], out=rel_sorted[row])
        if map_at:
            top = rel_sorted if deepest == width else rel_sorted[:, :deepest]
            _ap_columns(top, map_at, out, start, stop)
        if precision_at:
            cumulative = np.cumsum(rel_sorted[:, : max(precision_at)],
                                   axis=1, dtype=np.int64)
            columns = np.asarray(precision_at) - 1
            out["hits_at"][start:stop] = cumulative[:, columns]

    # Batches write disjoint rows, and NumPy's sorts, takes and popcounts
    # release the GIL, so threads use every core with no extra memory copy.
    spans = inputs.spans()
    workers = min(len(spans), os.cpu_count() or 1)
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda span: process(*span), spans))
    else:
        for span in spans:
            process(*span)
    return out


def _ap_columns(top, map_at, out, start, stop):
    """AP sums and retrieved counts of rows [start, stop) at every cut-off,
    from `top`, the rows' relevance in rank order down to max(map_at)."""
    deepest = top.shape[1]
    hits, starts, ranks, positions = _relevant_positions(top)
    precisions = ranks / positions
    ap_sum = out["ap_sum"]
    for column, top_k in enumerate(map_at):
        # The relevant items of the top k are the first `within` of the
        # row's hits: a shorter cut-off sums a prefix.
        within = hits if top_k >= deepest else np.count_nonzero(
            top[:, :top_k], axis=1)
        # np.sum per query keeps the summation order of a per-query
        # reference (sum of cumulative precisions) bit for bit.
        for row in np.flatnonzero(within):
            begin = starts[row]
            ap_sum[start + row, column] = np.sum(
                precisions[begin:begin + within[row]]
            )
        out["retrieved"][start:stop, column] = within


def _mean_over_queries(values, keep):
    """Mean of values[keep]; NaN (with a warning) when nothing is kept."""
    if not np.any(keep):
        logging.warning("every query was skipped; the mean is NaN")
        return float("nan")
    return float(np.mean(values[keep]))


def _average_precision(stats, column, top_k, ap_denominator, empty_query):
    """Per-query stable AP@top_k (`map_at[column]` of `_collect`), the kept
    mask and the number of empty queries."""
    num_relevant = stats["num_relevant"]
    if ap_denominator == "retrieved":
        denominator = stats["retrieved"][:, column]
    elif ap_denominator == "min_rk":
        denominator = np.minimum(num_relevant, top_k)
    else:
        denominator = num_relevant
    empty = denominator == 0
    ap = np.zeros(num_relevant.shape[0], dtype=np.float64)
    np.divide(stats["ap_sum"][:, column], denominator, out=ap,
              where=~empty)
    keep = ~empty if empty_query == "skip" else np.ones_like(empty)
    return ap, keep, int(np.count_nonzero(empty))


def mean_average_precision(query_codes, database_codes, query_labels,
                           database_labels, top_k=None,
                           ap_denominator="retrieved", empty_query="zero"):
    """MAP@top_k under the stable tie rule (protocol §3.1).

    Convention: the database is ranked by (Hamming distance, database index);
    AP@k = (1/Z) sum_{t<=k} r_t P@t with Z = relevant items in the top k
    (`retrieved`, default), min(R, k) (`min_rk`) or R (`all`); at k = N all
    three equal R. A query with Z = 0 scores AP 0 and stays in the mean
    (`empty_query="zero"`, default) or is dropped (`"skip"`, GA/HashNet).
    If every query is dropped the result is NaN.

    Args:
        query_codes: int8 [n_query, code_length] in {-1, +1}.
        database_codes: int8 [n_database, code_length] in {-1, +1}.
        query_labels: int [n_query] class ids or {0,1} [n_query, L] multi-hot.
        database_labels: same kind, [n_database] or [n_database, L].
        top_k: cut-off k; None means the whole database (MAP@ALL).

    Returns:
        float MAP.

    Raises:
        ValueError: invalid codes or labels, mismatched sizes, top_k outside
            [1, n_database], unknown ap_denominator or empty_query.
    """
    config.check_choice("ap_denominator", ap_denominator, AP_DENOMINATORS)
    config.check_choice("empty_query", empty_query, EMPTY_QUERY_RULES)
    inputs = _Inputs(query_codes, database_codes, query_labels,
                     database_labels)
    top_k = ranking.validate_top_k(top_k, inputs.num_database)
    maps, _ = ranked_metrics(inputs, map_at=(top_k,),
                             ap_denominator=ap_denominator,
                             empty_query=empty_query)
    return maps[top_k]


def ranked_metrics(batches, *, map_at=(), precision_at=(),
                   ap_denominator="retrieved", empty_query="zero"):
    """MAP@k and mean P@n of one ranking, in one pass over its batches.

    The one AP and P@n of this module, for any `QueryBatches`: Hamming
    distances of codes here, negated cosine similarities of float features
    in `cosine`. Conventions as `mean_average_precision` and
    `precision_at_n` (stable ranking, ties by database index).

    Args:
        batches: a `QueryBatches`.
        map_at: cut-offs k, ints in [1, num_database].
        precision_at: n, ints in [1, num_database].

    Returns:
        ({k: MAP@k}, {n: mean P@n}).

    Raises:
        ValueError: a k or n outside [1, num_database], unknown
            ap_denominator or empty_query.
    """
    config.check_choice("ap_denominator", ap_denominator, AP_DENOMINATORS)
    config.check_choice("empty_query", empty_query, EMPTY_QUERY_RULES)
    num_database = batches.num_database
    map_at = tuple(dict.fromkeys(
        ranking.validate_top_k(k, num_database) for k in map_at))
    if precision_at:
        precision_at = _check_n_values(precision_at, num_database)
    stats = _collect(batches, map_at=map_at, precision_at=precision_at)
    maps, _ = _maps(stats, map_at, ap_denominator, empty_query)
    precisions = (_precision_at_means(stats, precision_at)
                  if precision_at else {})
    return maps, precisions


def _maps(stats, map_at, ap_denominator, empty_query):
    """({k: MAP@k}, {k: empty queries}) from the `ap_sum` of `_collect`."""
    maps, empties = {}, {}
    for column, top_k in enumerate(map_at):
        ap, keep, empties[top_k] = _average_precision(
            stats, column, top_k, ap_denominator, empty_query
        )
        logging.info("MAP@%d: %d of %d queries empty (%s)", top_k,
                     empties[top_k], ap.shape[0], empty_query)
        maps[top_k] = _mean_over_queries(ap, keep)
    return maps, empties


def harmonic_table(n):
    """H(0..n) in float64 with H(0) = 0 and H(m) = sum_{t<=m} 1/t."""
    table = np.zeros(n + 1, dtype=np.float64)
    np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64), out=table[1:])
    return table


def _tie_aware_ap(counts, relevant, harmonic):
    """Per-query tie-aware AP@ALL from [Q, K+1] histograms (protocol §3.3)."""
    num_relevant = relevant.sum(axis=1)
    before = np.cumsum(counts, axis=1) - counts
    relevant_before = np.cumsum(relevant, axis=1) - relevant
    psi = np.zeros(counts.shape, dtype=np.float64)
    np.divide(relevant - 1, counts - 1, out=psi, where=counts > 1)
    group_sum = (
        (relevant_before + 1 - psi * (before + 1))
        * (harmonic[before + counts] - harmonic[before])
        + psi * counts
    )
    share = np.zeros(counts.shape, dtype=np.float64)
    np.divide(relevant, counts, out=share, where=relevant > 0)
    total = (share * group_sum).sum(axis=1)
    ap = np.zeros(total.shape, dtype=np.float64)
    np.divide(total, num_relevant, out=ap, where=num_relevant > 0)
    return ap, num_relevant


def tie_aware_map(query_codes, database_codes, query_labels, database_labels,
                  empty_query="zero"):
    """Tie-aware MAP@ALL (He et al., CVPR 2018; protocol §3.3).

    Convention: AP_T is the exact expectation of AP@ALL over all orders
    within each group of equal Hamming distance, uniformly at random, so it
    depends on no tie rule. Closed form per distance group d with harmonic
    numbers H (one float64 table H(0..N) shared by all queries):
    (r_d/n_d)[(R_<d + 1 - psi_d (N_<d + 1))(H(N_<d + n_d) - H(N_<d))
    + psi_d n_d], psi_d = (r_d - 1)/(n_d - 1) (0 if n_d = 1); AP_T is the
    sum over groups divided by R. Only per-distance histograms are used, no
    sort. A query with R = 0 scores 0 (`empty_query="zero"`) or is dropped
    (`"skip"`).

    Returns:
        float tie-aware MAP@ALL.

    Raises:
        ValueError: as `mean_average_precision`.
    """
    config.check_choice("empty_query", empty_query, EMPTY_QUERY_RULES)
    inputs = _Inputs(query_codes, database_codes, query_labels,
                     database_labels)
    stats = _collect(inputs, histograms=True)
    return _tie_aware_mean(stats, inputs.num_database, empty_query)


def _tie_aware_mean(stats, num_database, empty_query):
    """Mean tie-aware AP@ALL from `_collect` histograms."""
    ap, num_relevant = _tie_aware_ap(
        stats["counts"], stats["relevant"], harmonic_table(num_database)
    )
    keep = num_relevant > 0 if empty_query == "skip" else np.ones(
        ap.shape, dtype=bool)
    return _mean_over_queries(ap, keep)


def _radius_curves(counts, relevant, empty_radius, empty_query):
    """Mean precision and recall at every radius 0..K from histograms."""
    within = np.cumsum(counts, axis=1)
    true_positives = np.cumsum(relevant, axis=1)
    num_relevant = true_positives[:, -1]
    precision = np.zeros(within.shape, dtype=np.float64)
    np.divide(true_positives, within, out=precision, where=within > 0)
    if empty_radius == "skip":
        keep = within > 0
    else:
        keep = np.ones(within.shape, dtype=bool)
    kept = keep.sum(axis=0)
    mean_precision = np.full(within.shape[1], np.nan)
    np.divide((precision * keep).sum(axis=0), kept, out=mean_precision,
              where=kept > 0)
    recall = np.zeros(within.shape, dtype=np.float64)
    has_relevant = num_relevant > 0
    np.divide(true_positives, num_relevant[:, None], out=recall,
              where=has_relevant[:, None])
    recall_rows = has_relevant if empty_query == "skip" else np.ones_like(
        has_relevant)
    if np.any(recall_rows):
        mean_recall = recall[recall_rows].mean(axis=0)
    else:
        mean_recall = np.full(within.shape[1], np.nan)
    empty_share = (within == 0).mean(axis=0)
    return mean_precision, mean_recall, empty_share


def precision_recall_curve(query_codes, database_codes, query_labels,
                           database_labels, empty_radius="zero",
                           empty_query="zero"):
    """Precision and recall within Hamming radius rho = 0..K (protocol §3.2).

    Convention: P_q(rho) = tp_q(rho)/n_q(rho) over the n_q(rho) items at
    distance <= rho; if n_q(rho) = 0, P_q(rho) = 0 (`empty_radius="zero"`,
    default) or the query is left out at that rho (`"skip"`; NaN if every
    query is left out). R_q(rho) = tp_q(rho)/R_q; a query with R_q = 0 has
    recall 0 (`empty_query="zero"`, default) or is left out of the recall
    mean (`"skip"`). Computed from cumulative histograms, no sort.

    Returns:
        dict with `hamming_radius` (list 0..K), `precision` and `recall`
        (lists of K+1 floats, the means over queries).
    """
    config.check_choice("empty_radius", empty_radius, EMPTY_RADIUS_RULES)
    config.check_choice("empty_query", empty_query, EMPTY_QUERY_RULES)
    inputs = _Inputs(query_codes, database_codes, query_labels,
                     database_labels)
    stats = _collect(inputs, histograms=True)
    precision, recall, _ = _radius_curves(
        stats["counts"], stats["relevant"], empty_radius, empty_query
    )
    return {
        "hamming_radius": list(range(inputs.code_length + 1)),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
    }


def precision_recall_within_radius(query_codes, database_codes,
                                   query_labels, database_labels,
                                   hamming_radius=2, empty_radius="zero",
                                   empty_query="zero"):
    """Precision / recall within `hamming_radius` and the empty-ball share.

    Convention: as `precision_recall_curve` at one radius; a query with no
    item within the radius has precision 0 under `empty_radius="zero"`
    (default, the DPSH/HashNet convention) or is left out under `"skip"`.

    Returns:
        dict with `precision`, `recall` and `empty_radius_share` (the share of
        queries with no database item within the radius).
    """
    config.check_choice("empty_radius", empty_radius, EMPTY_RADIUS_RULES)
    config.check_choice("empty_query", empty_query, EMPTY_QUERY_RULES)
    inputs = _Inputs(query_codes, database_codes, query_labels,
                     database_labels)
    hamming_radius = _check_hamming_radius(hamming_radius, inputs.code_length)
    stats = _collect(inputs, histograms=True)
    precision, recall, empty_share = _radius_curves(
        stats["counts"], stats["relevant"], empty_radius, empty_query
    )
    return {
        "precision": float(precision[hamming_radius]),
        "recall": float(recall[hamming_radius]),
        "empty_radius_share": float(empty_share[hamming_radius]),
    }


def precision_at_n(query_codes, database_codes, query_labels,
                   database_labels, n_values=DEFAULT_PRECISION_AT):
    """Mean precision of the first n ranked items, for each n in n_values.

    Convention: stable ranking (distance, database index); P@n = (relevant
    items among the first n)/n, averaged over all queries (a query with no
    relevant item scores 0).

    Returns:
        dict {n: mean P@n}.

    Raises:
        ValueError: as `mean_average_precision`, or an n outside
            [1, n_database].
    """
    inputs = _Inputs(query_codes, database_codes, query_labels,
                     database_labels)
    n_values = _check_n_values(n_values, inputs.num_database)
    return ranked_metrics(inputs, precision_at=n_values)[1]


def _precision_at_means(stats, n_values):
    """{n: mean P@n} from the `hits_at` counts of `_collect`."""
    means = (stats["hits_at"] / np.asarray(n_values, np.float64)).mean(0)
    return {int(n): float(p) for n, p in zip(n_values, means)}


def _json_float(value):
    return None if value is None or math.isnan(value) else float(value)


def evaluate_codes(query_codes, database_codes, query_labels,
                   database_labels, *, top_k=None,
                   ap_denominator="retrieved", empty_query="zero",
                   hamming_radius=2, precision_at=DEFAULT_PRECISION_AT,
                   tie_aware=True, empty_radius="zero", map_at=(1000,)):
    """Every metric of protocol §3 in one pass over the query batches.

    Conventions are those of `mean_average_precision` (map, stable tie rule),
    `tie_aware_map` (map_tie_aware; MAP@ALL only, so None when top_k < N or
    tie_aware is False), `precision_recall_within_radius`,
    `precision_recall_curve` and `precision_at_n`. Values of `precision_at`
    above the database size are dropped with a warning. NaN means are
    written as None.

    Returns:
        JSON-serialisable dict: map, map_tie_aware, num_empty_queries,
        precision_radius, recall_radius, empty_radius_share, pr_curve
        {hamming_radius, precision, recall}, precision_at_n {n: p}, top_k,
        code_length, num_query, num_database, hamming_radius,
        ap_denominator, empty_query, empty_radius, and map_at {k: MAP@k}
        for each k in `map_at` below the database size (most published
        tables quote MAP@1000; one extra pass each).
    """
    config.check_choice("ap_denominator", ap_denominator, AP_DENOMINATORS)
    config.check_choice("empty_query", empty_query, EMPTY_QUERY_RULES)
    config.check_choice("empty_radius", empty_radius, EMPTY_RADIUS_RULES)
    inputs = _Inputs(query_codes, database_codes, query_labels,
                     database_labels)
    num_database = inputs.num_database
    top_k = ranking.validate_top_k(top_k, num_database)
    hamming_radius = _check_hamming_radius(hamming_radius, inputs.code_length)
    precision_at = _precision_at_within(precision_at, num_database)
    # Every MAP@k in one pass: each k's AP sums are those of its own pass.
    extra_map_at = [ranking.validate_top_k(k, num_database)
                    for k in (map_at or ()) if k < num_database]
    cutoffs = tuple(dict.fromkeys([top_k, *extra_map_at]))
    stats = _collect(inputs, map_at=cutoffs, histograms=True,
                     precision_at=precision_at)
    maps, empties = _maps(stats, cutoffs, ap_denominator, empty_query)
    map_value, num_empty = maps[top_k], empties[top_k]
    map_tie_aware = None
    if tie_aware and top_k == num_database:
        map_tie_aware = _tie_aware_mean(stats, num_database, empty_query)
    precision, recall, empty_share = _radius_curves(
        stats["counts"], stats["relevant"], empty_radius, empty_query
    )
    logging.info(
        "MAP@%d %.4f (%d empty queries), tie-aware %s, P@H<=%d %.4f",
        top_k, map_value, num_empty, map_tie_aware, hamming_radius,
        precision[hamming_radius],
    )
    return {
        "map": _json_float(map_value),
        "map_tie_aware": _json_float(map_tie_aware),
        "num_empty_queries": num_empty,
        "precision_radius": _json_float(precision[hamming_radius]),
        "recall_radius": _json_float(recall[hamming_radius]),
        "empty_radius_share": float(empty_share[hamming_radius]),
        "pr_curve": {
            "hamming_radius": list(range(inputs.code_length + 1)),
            "precision": [_json_float(p) for p in precision],
            "recall": [_json_float(r) for r in recall],
        },
        "precision_at_n": (
            _precision_at_means(stats, precision_at) if precision_at else {}
        ),
        "map_at": {k: _json_float(maps[k]) for k in extra_map_at},
        "top_k": top_k,
        "code_length": inputs.code_length,
        "num_query": inputs.num_query,
        "num_database": num_database,
        "hamming_radius": hamming_radius,
        "ap_denominator": ap_denominator,
        "empty_query": empty_query,
        "empty_radius": empty_radius,
    }


def _precision_at_within(precision_at, num_database):
    """The `precision_at` values <= the database size (others: warned)."""
    precision_at = list(precision_at or ())
    dropped = [n for n in precision_at if n > num_database]
    if dropped:
        logging.warning(
            "precision_at values %s exceed the database size %d; dropped",
            dropped, num_database,
        )
    precision_at = [n for n in precision_at if n <= num_database]
    if precision_at:
        precision_at = _check_n_values(precision_at, num_database)
    return precision_at
