"""Test-only references for Hamming distances and the stable tie ranking.

Written plainly from unpacked bits, independent of the library's one
distance kernel (`uhga_tf.codes.DistanceKernel`) and stable ranking
(`uhga_tf.evaluation.ranking`), which the tests compare against them.
"""

import numpy as np


def random_codes(rng, n, code_length):
    """int8 [n, code_length] uniform in {-1, +1}."""
    return np.where(rng.random((n, code_length)) < 0.5, -1, 1).astype(np.int8)


def hamming_distance(query_codes, database_codes):
    """int [n_query, n_database]: the number of differing bits."""
    q = (np.asarray(query_codes) > 0).astype(np.int32)
    d = (np.asarray(database_codes) > 0).astype(np.int32)
    return (q[:, None, :] != d[None, :, :]).sum(axis=-1)


def stable_top_k(query_codes, database_codes, top_k=None):
    """(positions, distances) of the first top_k by (distance, position)."""
    dist = hamming_distance(query_codes, database_codes)
    order = np.argsort(dist, axis=1, kind="stable")[:, :top_k]
    return order, np.take_along_axis(dist, order, axis=1)
