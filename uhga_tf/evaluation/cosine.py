"""MAP of ranking by cosine similarity of real-valued features.

The reference a hash code has to approach: the same relevance and AP
conventions as `metrics.mean_average_precision` (stable ties by database
index, `retrieved` denominator, empty queries score 0), but ranked by the
float features the codes are learned from. Relevance and the stable order
are `evaluation.ranking`'s, the ones the Hamming metrics use.

The AP sums stay here: `metrics` adds only the relevant precisions, this
module a whole row with zeros between them. The two agree to ~1e-14 but
not bit for bit, and `cosine_map` is in every results.json, which must
not move for the same seed.
"""

import numpy as np

from uhga_tf.evaluation import ranking


def _unit(features, mean):
    features = features - mean
    return features / np.maximum(
        np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def cosine_map(
    query_features, database_features, query_labels, database_labels,
    top_k=None, batch_size=256,
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
    mean=0.0, map_at=(1000,), precision_at=(100,), batch_size=256,
):
    """MAP@ALL, MAP@k and P@n of cosine ranking after subtracting `mean`.

    `mean` = 0 ranks the raw features; a train (or database) mean gives
    cosine ranking of centred features, the geometry the hash head sees
    when `feature_centring` is on.

    Returns:
        {"map_all", "map_<k>" for k in map_at, "p_<n>" for n in
        precision_at}; k or n equal to the database size is "all".
    """
    query_labels, database_labels = ranking.validate_label_pair(
        query_labels, database_labels, len(query_features),
        len(database_features))
    query = _unit(query_features, mean)
    database = _unit(database_features, mean)
    num_database = len(database)
    cutoffs = sorted({num_database, *[min(k, num_database) for k in map_at]})
    aps = {k: [] for k in cutoffs}
    hits_at = {n: [] for n in precision_at}
    for start in range(0, len(query), batch_size):
        sims = query[start:start + batch_size] @ database.T
        order = ranking.stable_order(-sims)
        rel = ranking.relevance_unchecked(
            query_labels[start:start + batch_size], database_labels)
        rel = np.take_along_axis(rel, order, axis=1).astype(np.float64)
        hits = np.cumsum(rel, axis=1)
        precision = hits / np.arange(1, num_database + 1)
        for k in cutoffs:
            retrieved = hits[:, k - 1]
            aps[k].append(np.where(
                retrieved > 0,
                (precision[:, :k] * rel[:, :k]).sum(axis=1)
                / np.maximum(retrieved, 1), 0.0))
        for n in precision_at:
            hits_at[n].append(hits[:, n - 1] / n)
    name = lambda k: "all" if k == num_database else str(k)  # noqa: E731
    out = {f"map_{name(k)}": float(np.concatenate(v).mean())
           for k, v in aps.items()}
    out.update({f"p_{n}": float(np.concatenate(v).mean())
                for n, v in hits_at.items()})
    return out
