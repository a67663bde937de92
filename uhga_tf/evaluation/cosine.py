"""MAP of ranking by cosine similarity of real-valued features.

The reference a hash code has to approach: the same relevance and AP
conventions as `metrics.mean_average_precision` (stable ties by database
index, `retrieved` denominator, empty queries score 0), but ranked by the
float features the codes are learned from.
"""

import numpy as np


def _relevance(query_labels, database_labels):
    if query_labels.ndim == 1:
        return query_labels[:, None] == database_labels[None, :]
    return (query_labels.astype(np.int32) @ database_labels.T.astype(
        np.int32)) > 0


def cosine_map(
    query_features, database_features, query_labels, database_labels,
    top_k=None, batch_size=256,
):
    """MAP@top_k (all when None) of cosine ranking; empty queries score 0."""
    query = query_features / np.maximum(
        np.linalg.norm(query_features, axis=1, keepdims=True), 1e-12)
    database = database_features / np.maximum(
        np.linalg.norm(database_features, axis=1, keepdims=True), 1e-12)
    top_k = top_k or len(database)
    aps = []
    for start in range(0, len(query), batch_size):
        sims = query[start:start + batch_size] @ database.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :top_k]
        rel = _relevance(
            query_labels[start:start + batch_size], database_labels)
        rel = np.take_along_axis(rel, order, axis=1).astype(np.float64)
        hits = np.cumsum(rel, axis=1)
        precision = hits / np.arange(1, top_k + 1)
        retrieved = rel.sum(axis=1)
        ap = np.where(
            retrieved > 0,
            (precision * rel).sum(axis=1) / np.maximum(retrieved, 1),
            0.0,
        )
        aps.append(ap)
    return float(np.concatenate(aps).mean())
