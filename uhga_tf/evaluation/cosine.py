"""MAP of ranking by cosine similarity of real-valued features.

The reference a hash code has to approach: the float features the codes are
learned from, ranked by cosine similarity. Only the distances differ from
the Hamming metrics: `_CosineBatches` hands negated similarities to
`metrics.ranked_metrics`, so relevance, the stable order (ties by database
index), AP (`retrieved` denominator, empty queries score 0) and P@n are the
code the Hamming MAP uses.
"""

import numpy as np

from uhga_tf.evaluation import metrics

# Queries per similarity product. The float32 product's rounding depends on
# the number of rows per call (BLAS blocking), and ties between near-equal
# similarities follow it: 256 is the batch every stored cosine_map was
# computed with, so results.json stays bit for bit the same. One batch holds
# about 30 bytes per (query, database item): 450 MB at 59,000 items; batches
# run on up to ceil(queries / 256) threads.
BATCH_SIZE = 256


def _unit(features, mean):
    features = features - mean
    return features / np.maximum(
        np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


class _CosineBatches(metrics.QueryBatches):
    """Query batches of cosine ranking: distance = -cosine similarity."""

    def __init__(self, query_features, database_features, query_labels,
                 database_labels, mean, batch_size):
        self.query = _unit(query_features, mean)
        self.database = _unit(database_features, mean)
        super().__init__(query_labels, database_labels, len(self.query),
                         len(self.database), batch_size)

    def distances(self, start, stop):
        return -(self.query[start:stop] @ self.database.T)


def cosine_map(
    query_features, database_features, query_labels, database_labels,
    top_k=None, batch_size=BATCH_SIZE,
):
    """MAP@top_k (all when None) of cosine ranking; empty queries score 0."""
    num_database = len(database_features)
    top_k = min(top_k or num_database, num_database)
    out = cosine_metrics(
        query_features, database_features, query_labels, database_labels,
        map_at=(top_k,), precision_at=(), batch_size=batch_size)
    return out["map_all" if top_k == num_database else f"map_{top_k}"]


def cosine_metrics(
    query_features, database_features, query_labels, database_labels, *,
    mean=0.0, map_at=(1000,), precision_at=(100,), batch_size=BATCH_SIZE,
):
    """MAP@ALL, MAP@k and P@n of cosine ranking after subtracting `mean`.

    `mean` = 0 ranks the raw features; a train (or database) mean gives
    cosine ranking of centred features, the geometry the hash head sees
    when `feature_centring` is on. A k above the database size is MAP@ALL.
    `batch_size` queries per similarity product (see BATCH_SIZE).

    Returns:
        {"map_all", "map_<k>" for k in map_at, "p_<n>" for n in
        precision_at}; a k equal to the database size is "all".

    Raises:
        ValueError: invalid labels, mismatched sizes, or an n outside
            [1, database size].
    """
    batches = _CosineBatches(query_features, database_features, query_labels,
                             database_labels, mean, batch_size)
    num_database = batches.num_database
    cutoffs = sorted({num_database, *[min(k, num_database) for k in map_at]})
    maps, precisions = metrics.ranked_metrics(
        batches, map_at=cutoffs, precision_at=tuple(precision_at))
    out = {f"map_{'all' if k == num_database else k}": maps[k]
           for k in cutoffs}
    out.update({f"p_{n}": precisions[n] for n in precision_at})
    return out
