"""Exhaustive Hamming ranking with the deterministic tie rule of protocol §2.

Tie rule: the database is ranked by a stable sort on (distance, database
index), where the index is the row of `database_codes` (the row of the stored
database index file). This module is shared by the evaluation metrics and the
search index so that both return the same order.

The sort is a stable counting sort by distance: distances are small integers
in [0, code_length], held as uint8 (code_length <= 255) or uint16, and
`np.argsort(..., kind="stable")` on such keys is NumPy's LSD radix sort, i.e.
one (uint8) or two (uint16) counting-sort passes per query: O(N + 256) per
query, vectorised over a batch of queries in one C call, no comparison sort.
"""

import numpy as np

from uhga_tf import codes as codes_lib

# The one Hamming distance kernel lives in `codes` (the index uses it too).
DistanceKernel = codes_lib.DistanceKernel
distance_dtype = codes_lib.distance_dtype

# Memory budget of one query batch (distance matrix, sort order, relevance);
# small enough that the temporaries are recycled from the heap and stay
# near the caches (measured faster than 256 MiB batches).
BATCH_BYTES = 32 * 2**20
# Bytes per (query, database item) pair held by one batch, all arrays summed.
_BYTES_PER_PAIR = 40


def query_batch_size(num_database, batch_bytes=None):
    """Queries per batch so one batch stays within `batch_bytes`.

    `batch_bytes` defaults to the module's BATCH_BYTES at call time.
    """
    if batch_bytes is None:
        batch_bytes = BATCH_BYTES
    return max(1, int(batch_bytes // (_BYTES_PER_PAIR * max(1, num_database))))


def validate_code_pair(query_codes, database_codes):
    """Validate query/database codes; return them as int8 arrays.

    Raises:
        ValueError: codes that are not 2-D {-1, +1} arrays, a code_length of
            0, an empty database, or different query/database code_length.
    """
    query_codes = codes_lib.validate_codes(query_codes, "query_codes")
    database_codes = codes_lib.validate_codes(database_codes, "database_codes")
    if query_codes.shape[1] == 0:
        raise ValueError(
            "query_codes must have code_length >= 1; received shape "
            f"{query_codes.shape}"
        )
    if query_codes.shape[1] != database_codes.shape[1]:
        raise ValueError(
            "query_codes and database_codes must have the same code_length; "
            f"received {query_codes.shape[1]} and {database_codes.shape[1]}"
        )
    if database_codes.shape[0] == 0:
        raise ValueError(
            "database_codes must hold at least one code; received shape "
            f"{database_codes.shape}"
        )
    return query_codes, database_codes


def validate_top_k(top_k, num_database):
    """Return `top_k` as an int (None -> num_database).

    Raises:
        ValueError: unless top_k is None or an int in [1, num_database].
    """
    if top_k is None:
        return int(num_database)
    return check_int_in_range("top_k", top_k, 1, num_database,
                              "the database size", kind="None or an int")


def check_int_in_range(name, value, low, high, bound, kind="an int"):
    """Return `value` as an int; raise ValueError unless in [low, high].

    The message names `bound`, what `high` is (e.g. "the code_length").
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not low <= value <= high
    ):
        raise ValueError(
            f"{name} must be {kind} in [{low}, {high}] ({bound}); received "
            f"{name}={value!r}"
        )
    return int(value)


def stable_order(distances):
    """Stable sort of each row of `distances`.

    Args:
        distances: [n_query, n_database]: uint8/uint16 Hamming distances,
            or floats (cosine ranking sorts negated similarities).

    Returns:
        int64 [n_query, n_database]: database indices ordered by
        (distance, database index).
    """
    return np.argsort(distances, axis=1, kind="stable")


def stable_top_k(distances, top_k):
    """The first top_k of each row under the (distance, index) tie rule.

    Returns:
        (indices int64 [n_query, top_k], distances int32 [n_query, top_k]).
    """
    order = stable_order(distances)[:, :top_k]
    return order, np.take_along_axis(distances, order, axis=1).astype(
        np.int32
    )


def rank_in_batches(distance_fn, queries, num_database, top_k):
    """`stable_top_k` of `distance_fn(batch)` over query batches.

    Args:
        distance_fn: queries [b, ...] -> distances [b, num_database]
            (a `DistanceKernel` or its `packed` method).
        queries: [n_query, ...] in the form distance_fn takes.
        num_database: database size (sets the batch size).
        top_k: items kept per query, in [1, num_database].

    Returns:
        (indices int64 [n_query, top_k], distances int32 [n_query, top_k]).
    """
    num_query = len(queries)
    indices = np.empty((num_query, top_k), dtype=np.int64)
    distances = np.empty((num_query, top_k), dtype=np.int32)
    batch = query_batch_size(num_database)
    for start in range(0, num_query, batch):
        stop = min(start + batch, num_query)
        indices[start:stop], distances[start:stop] = stable_top_k(
            distance_fn(queries[start:stop]), top_k
        )
    return indices, distances


def hamming_ranking(query_codes, database_codes, top_k=None):
    """Rank the database for each query by (Hamming distance, index).

    Convention: ties in distance are broken by database index (lower index
    first), i.e. a stable sort on distance (protocol §2); the result is the
    same on every machine and equals `np.argsort(d, kind="stable")`.

    Args:
        query_codes: int8 [n_query, code_length] in {-1, +1}.
        database_codes: int8 [n_database, code_length] in {-1, +1}.
        top_k: keep the first top_k items per query; None keeps all.

    Returns:
        (indices, distances): int64 [n_query, top_k] database indices and
        int32 [n_query, top_k] their Hamming distances.

    Raises:
        ValueError: invalid codes, code_length mismatch, or top_k outside
            [1, n_database].
    """
    query_codes, database_codes = validate_code_pair(
        query_codes, database_codes
    )
    top_k = validate_top_k(top_k, database_codes.shape[0])
    kernel = DistanceKernel(database_codes)
    return rank_in_batches(kernel, query_codes, kernel.num_database, top_k)


def validate_label_pair(query_labels, database_labels, num_query=None,
                        num_database=None):
    """Validate labels for `relevance`; return them as arrays.

    Single-label: 1-D integer class ids. Multi-label: 2-D multi-hot {0, 1}
    arrays with the same number of columns. Both sides must be of one kind.

    Raises:
        ValueError: mixed kinds, other ranks, negative class ids,
            non-{0,1} multi-hot values,
            different label widths, or a length that differs from
            num_query / num_database when those are given.
    """
    query_labels = np.asarray(query_labels)
    database_labels = np.asarray(database_labels)
    for name, labels, expected in (
        ("query_labels", query_labels, num_query),
        ("database_labels", database_labels, num_database),
    ):
        if labels.ndim not in (1, 2):
            raise ValueError(
                f"{name} must be 1-D class ids or a 2-D multi-hot array; "
                f"received shape {labels.shape}"
            )
        if expected is not None and labels.shape[0] != expected:
            raise ValueError(
                f"{name} must have one row per code ({expected}); received "
                f"{labels.shape[0]} rows"
            )
        if labels.ndim == 1 and labels.size and np.issubdtype(
                labels.dtype, np.number) and labels.min() < 0:
            raise ValueError(
                f"{name} must be class ids >= 0; received {labels.min()} "
                "(-1 marks an unlabelled collection, which has no MAP: "
                "every metric here needs labels)"
            )
        if labels.ndim == 2 and labels.size and not np.all(
            (labels == 0) | (labels == 1)
        ):
            raise ValueError(
                f"{name} as a 2-D array must be multi-hot in {{0, 1}}; "
                f"received values {np.unique(labels)[:5].tolist()}"
            )
    if query_labels.ndim != database_labels.ndim:
        raise ValueError(
            "query_labels and database_labels must both be 1-D class ids or "
            f"both 2-D multi-hot; received shapes {query_labels.shape} and "
            f"{database_labels.shape}"
        )
    if (
        query_labels.ndim == 2
        and query_labels.shape[1] != database_labels.shape[1]
    ):
        raise ValueError(
            "query_labels and database_labels must have the same number of "
            f"label columns; received {query_labels.shape[1]} and "
            f"{database_labels.shape[1]}"
        )
    return query_labels, database_labels


def relevance(query_labels, database_labels):
    """Relevance of every database item to every query.

    Convention: single-label (1-D class ids): relevant iff same class.
    Multi-label (2-D multi-hot): relevant iff the two share >= 1 label.

    Returns:
        bool [n_query, n_database].
    """
    query_labels, database_labels = validate_label_pair(
        query_labels, database_labels
    )
    return relevance_unchecked(query_labels, database_labels)


def relevance_unchecked(query_labels, database_labels):
    """`relevance` for labels already checked by `validate_label_pair`."""
    if query_labels.ndim == 1:
        return query_labels[:, None] == database_labels[None, :]
    # Counts of shared labels are small integers: float32 is exact.
    shared = query_labels.astype(np.float32) @ database_labels.T.astype(
        np.float32
    )
    return shared > 0
