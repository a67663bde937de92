"""Similarity matrices with structure: kNN, cluster ensembles, manifolds.

A choice beyond the paper (docs/product_recipe.md). The paper's S (eq. (3)) labels
a pair by thresholding its cosine distance alone; on frozen ImageNet features
that carries no more than cosine ranking, which ITQ already matches. The three
modes here still use nothing but cosine distances of the train features (never
labels), but label a pair by the *neighbourhood structure* around it:

* ``knn``: similar = mutual k-nearest neighbours (``similarity_knn``).
* ``cluster``: spherical k-means on the normalised features, repeated with
  ``similarity_runs`` seeds; similar = same cluster in every run.
* ``manifold``: the same cluster ensemble, but in the spectral embedding of
  the kNN graph (Laplacian eigenmaps, ``similarity_clusters`` dimensions),
  which follows the data manifold instead of straight-line distance. A
  diffusion over the kNN graph (random walk with restart, top-k by diffused
  score) was tried first and dropped: on CIFAR-10 features its top-k equals
  the plain kNN's (same label precision, same MAP).

* ``multiscale`` and ``coassociation``: k-means in the spectral embedding
  at 2, 4, 8, ... clusters (the ladder follows N, never a class count),
  ``similarity_runs`` seeds per scale. ``multiscale`` thresholds the share
  of clusterings that join a pair; ``coassociation`` (the product recipe)
  labels every pair with S = 2 a - 1, a the joined share, graded in [-1, 1].

Dissimilar: in ``knn`` mode, farther apart than both rows'
``similarity_dissimilar_quantile`` distance quantile (per-row radius); in
``cluster``/``manifold`` mode, in different clusters in every run. Everything else is
unlabeled (0) and does not enter the loss.

Nothing N x N is ever stored: the model keeps the compact structure
(:class:`StructuredSimilarity`) and builds the S block of a batch per step
with :meth:`StructuredSimilarity.block` (a TF function, the one
implementation of the rule; fractions and diagnostics use it too).

Memory and time (D = 1280 features, k = 20, R = 5 runs, C = 50 clusters):

=========  ==========================  =====================================
N          stored structure            build (2 cores)
=========  ==========================  =====================================
5,000      knn/manifold: 0.4 MB lists  seconds
           + 26 MB unit features;
           cluster: 0.1 MB ids
50,000     4 MB lists + 256 MB         knn ~1 min (exact faiss flat search);
           features; cluster 1 MB      cluster ~20 s
1,000,000  80 MB lists + 5.1 GB        knn: hours with a flat index (use an
           features (float32);         IVF index); cluster: minutes
           cluster 20 MB
=========  ==========================  =====================================

The per-row radius is a quantile over at most ``RADIUS_SAMPLE`` random
columns, so it costs O(N * RADIUS_SAMPLE * D), not O(N^2 D).
"""

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf
from absl import logging

from uhga_tf.similarity import entries
from uhga_tf.similarity import features as features_lib

STRUCTURED_MODES = (
    "knn", "cluster", "manifold", "multiscale", "coassociation")
# similarity_clusters = 0: read the count from the kNN graph (modularity).
AUTO_CLUSTERS = 0
# Rows of the kNN graph the count is read from (a seeded sample beyond).
COUNT_SAMPLE = 10000
# Modes whose S entries are graded in [-1, 1] (float32), not {-1, 0, +1}.
GRADED_MODES = ("multiscale", "coassociation")
RADIUS_SAMPLE = 4096


@dataclasses.dataclass(frozen=True)
class StructuredSimilarity:
    """Compact similarity structure of N train items; S blocks on demand.

    Attributes:
        mode: "knn", "manifold" or "cluster".
        neighbours: int32 [N, k] similar partners (-1 = none), knn/manifold.
        radius: float32 [N] per-row distance beyond which a pair is
            dissimilar (both rows' radii must be exceeded), knn/manifold.
        unit_features: float32 [N, D] L2-normalised train features,
            knn/manifold (distances of batch pairs for the radius rule).
        assignments: int32 [N, R] cluster ids per run, cluster mode.
        fractions: estimated {"positive", "negative", "unlabeled"}
            fractions of S entries over a sample of pairs.
    """

    mode: str
    neighbours: Optional[np.ndarray] = None
    radius: Optional[np.ndarray] = None
    unit_features: Optional[np.ndarray] = None
    assignments: Optional[np.ndarray] = None
    shares: tuple = (0.5, 0.25, 0.0)  # positive, negative share; grading
    # coassociation: weight of the centred cosine in S (unit_features are
    # then the centred train rows, normalised).
    cosine_mix: float = 0.0
    # coassociation, centred: float32 [N] each row's mean share with all
    # rows (what chance joins it in), or None; the centred S's weight.
    row_agreement: Optional[np.ndarray] = None
    centring: float = 0.0
    fractions: dict = dataclasses.field(default_factory=dict)
    # cluster/manifold: the clusters of each k-means run, and (count read
    # from the graph) the modularity of every candidate count.
    cluster_counts: tuple = ()
    count_modularity: dict = dataclasses.field(default_factory=dict)

    @property
    def num_items(self):
        if self.assignments is not None:
            return len(self.assignments)
        return len(self.neighbours)

    @property
    def nbytes(self):
        """Bytes of the stored structure (O(N k + N D) or O(N R))."""
        arrays = (self.neighbours, self.radius, self.unit_features,
                  self.assignments, self.row_agreement)
        return sum(a.nbytes for a in arrays if a is not None)

    def summary(self):
        """What to store beside results: the mode and the stored size."""
        summary = {"mode": self.mode, "stored_mb": self.nbytes / 1e6}
        if self.cluster_counts:
            summary["cluster_counts"] = [int(c) for c in self.cluster_counts]
        if self.count_modularity:
            summary["count_modularity"] = {
                str(c): round(float(q), 4)
                for c, q in self.count_modularity.items()}
        return summary

    def positive_negative(self):
        """Sampled shares of S=+1 and S=-1 (N x N is never formed)."""
        return self.fractions["positive"], self.fractions["negative"]

    def tensors(self):
        """The structure as TF constants (build once, inside the model)."""
        if self.assignments is not None:
            tensors = {"assignments": tf.constant(self.assignments),
                       "shares": tf.constant(self.shares, tf.float32)}
            if self.cosine_mix > 0:
                tensors["unit_features"] = tf.constant(self.unit_features)
                tensors["cosine_mix"] = tf.constant(self.cosine_mix,
                                                    tf.float32)
            if self.row_agreement is not None:
                rows = tf.constant(self.row_agreement)
                tensors["row_agreement"] = rows
                # Made once with the constants, not in every S block.
                tensors["chance"] = tf.reduce_mean(rows)
                tensors["centring"] = tf.constant(self.centring, tf.float32)
            return tensors
        return {
            "neighbours": tf.constant(self.neighbours),
            "radius": tf.constant(self.radius),
            "unit_features": tf.constant(self.unit_features),
        }

    def block(self, index_1, index_2, tensors=None):
        """S entries [b1, b2] in {-1, 0, +1} (int8) for two index batches."""
        tensors = self.tensors() if tensors is None else tensors
        return similarity_block(self.mode, tensors, index_1, index_2)


def similarity_block(mode, tensors, index_1, index_2):
    """The pair rule of every structured mode, in TF (graph-safe).

    Args:
        mode: one of STRUCTURED_MODES.
        tensors: `StructuredSimilarity.tensors()`.
        index_1, index_2: int [b1], [b2] train rows.

    Returns:
        int8 [b1, b2].
    """
    index_1 = tf.cast(index_1, tf.int32)
    index_2 = tf.cast(index_2, tf.int32)
    if mode in GRADED_MODES:
        ids = tensors["assignments"]
        a = tf.gather(ids, index_1)[:, None, :]
        b = tf.gather(ids, index_2)[None, :, :]
        # The share of (scale, run) clusterings that join the pair.
        agree = tf.reduce_mean(tf.cast(tf.equal(a, b), tf.float32), axis=-1)
        if mode == "coassociation":
            return _coassociation_entries(agree, tensors, index_1, index_2)
        shares = tensors["shares"]  # positive share, negative share, grading
        # Joined in most clusterings: similar, and (graded) the more so the
        # finer the scales that keep the pair together, so near neighbours
        # are pulled closer than mere cluster mates; joined in few:
        # dissimilar; in between: unlabeled.
        strength = shares[2] * agree + (1.0 - shares[2])
        return tf.where(
            agree >= shares[0], strength,
            tf.where(agree <= shares[1], -1.0, 0.0))
    if mode in ("cluster", "manifold"):
        ids = tensors["assignments"]
        a = tf.gather(ids, index_1)[:, None, :]
        b = tf.gather(ids, index_2)[None, :, :]
        agree = tf.reduce_sum(tf.cast(tf.equal(a, b), tf.int32), axis=-1)
        runs = tf.shape(ids)[1]
        positive = tf.equal(agree, runs)
        negative = tf.equal(agree, 0)
    else:
        partners = tf.gather(tensors["neighbours"], index_1)  # [b1, k]
        positive = tf.reduce_any(
            tf.equal(partners[:, None, :], index_2[None, :, None]), axis=-1
        )
        positive = tf.logical_or(
            positive, tf.equal(index_1[:, None], index_2[None, :])
        )
        features = tensors["unit_features"]
        distance = 1.0 - tf.matmul(
            tf.gather(features, index_1), tf.gather(features, index_2),
            transpose_b=True,
        )
        radius = tensors["radius"]
        bound = tf.maximum(
            tf.gather(radius, index_1)[:, None],
            tf.gather(radius, index_2)[None, :],
        )
        negative = tf.logical_and(
            distance > bound, tf.logical_not(positive)
        )
    return (
        tf.cast(positive, tf.int8) - tf.cast(negative, tf.int8)
    )


def _coassociation_entries(agree, tensors, index_1, index_2):
    """S = 2 a - 1 for a pair joined in a share a of the clusterings.

    Every pair is labelled: coarse scales separate kinds, fine scales order
    the near neighbours inside them (a pair kept together up to the finest
    scale gets +1). With ``cosine_mix`` m > 0, S = (1 - m)(2 a - 1) + m cos
    of the centred rows, which orders pairs the ladder cannot tell apart.
    """
    entries_ = 2.0 * agree - 1.0
    if "row_agreement" in tensors:
        rows, chance = tensors["row_agreement"], tensors["chance"]
        centred = (agree - tf.gather(rows, index_1)[:, None]
                   - tf.gather(rows, index_2)[None, :] + chance) / (
                       1.0 - chance)
        weight = tensors["centring"]
        entries_ = (1.0 - weight) * entries_ + weight * centred
    if "cosine_mix" not in tensors:
        return entries_
    features = tensors["unit_features"]
    cosine = tf.matmul(tf.gather(features, index_1),
                       tf.gather(features, index_2), transpose_b=True)
    mix = tensors["cosine_mix"]
    return (1.0 - mix) * entries_ + mix * cosine


def nearest_neighbours(unit, k):
    """Exact top-k neighbours by cosine (faiss inner product), self excluded.

    Returns (ids int64 [N, k], similarities float32 [N, k]).
    """
    import faiss

    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    sims, ids = index.search(unit, k + 1)
    # Drop each row's own entry (not always in column 0 under exact ties).
    rows = np.arange(len(unit))[:, None]
    keep = ids != rows
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return (
        np.take_along_axis(ids, order, axis=1),
        np.take_along_axis(sims, order, axis=1),
    )


def mutual_partners(ids):
    """Keep j in row i only if i is also in row j; pad with -1 (int32)."""
    n, k = ids.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = ids.ravel().astype(np.int64)
    mutual = np.isin(cols * n + rows, rows * n + cols).reshape(n, k)
    partners = np.where(mutual, ids, -1).astype(np.int32)
    # Valid partners first, so a row's list reads left to right.
    order = np.argsort(partners < 0, axis=1, kind="stable")
    return np.take_along_axis(partners, order, axis=1)


def row_radius(unit, quantile, seed):
    """Per-row cosine-distance quantile over a column sample, float32 [N]."""
    n = len(unit)
    rng = np.random.default_rng(seed)
    cols = (
        np.arange(n) if n <= RADIUS_SAMPLE
        else rng.choice(n, RADIUS_SAMPLE, replace=False)
    )
    sample = unit[cols]
    radius = np.empty(n, dtype=np.float32)
    for start in range(0, n, 2048):
        d = 1.0 - unit[start:start + 2048] @ sample.T
        radius[start:start + 2048] = np.quantile(d, quantile, axis=1)
    return radius


def knn_graph(ids):
    """The symmetrised kNN graph A (binary, scipy CSR [N, N]) of `ids`."""
    import scipy.sparse as sp

    n, k = ids.shape
    graph = sp.csr_matrix(
        (np.ones(n * k), (np.repeat(np.arange(n), k), ids.ravel())),
        shape=(n, n),
    )
    return ((graph + graph.T) > 0).astype(np.float64).tocsr()


def modularity(graph, labels):
    """Newman's modularity Q of a partition of a graph (symmetric CSR).

    Q = sum over clusters of (edge share inside) - (degree share)^2: the
    share of edges a partition keeps inside its clusters beyond what a
    random graph with the same degrees would keep. A partition that cuts
    through a dense region, or lumps two apart, scores lower.
    """
    labels = np.asarray(labels)
    coo = graph.tocoo()
    total = coo.data.sum()
    inside = coo.data[labels[coo.row] == labels[coo.col]].sum()
    degree = np.bincount(
        labels, weights=np.asarray(graph.sum(axis=1)).ravel())
    return float(inside / total - np.sum((degree / total) ** 2))


def count_candidates(max_clusters):
    """Cluster counts tried: every count to 16, then steps of about 20 %."""
    candidates = list(range(2, min(max_clusters, 16) + 1))
    while candidates[-1] < max_clusters:
        candidates.append(min(max_clusters,
                              max(candidates[-1] + 1,
                                  int(round(candidates[-1] * 1.2)))))
    return candidates


def graph_cluster_count(ids, max_clusters, seed, runs=3):
    """The cluster count read from the kNN graph, with no label and no prior.

    For each candidate count C (`count_candidates`), k-means with C
    clusters in the top-C spectral embedding (``runs`` seeds); the count
    whose best partition has the highest modularity on the kNN graph wins.
    On CIFAR-10 features (N = 5,000) it reads 7 for ten classes and 6 for
    five (benchmarks/results/sweeps/; docs/product_recipe.md).

    Returns:
        (count, {candidate: mean modularity}, the ordered embedding [N, d]).
    """
    graph = knn_graph(ids)
    vectors = spectral_embedding(
        ids, min(max_clusters, MAX_EMBEDDING), seed, ordered=True)
    scores = {}
    for position, clusters in enumerate(count_candidates(max_clusters)):
        space = features_lib.unit_rows(
            vectors[:, :min(clusters, vectors.shape[1])])
        assigned = cluster_assignments(
            space, clusters, runs, (seed % 1000) * 100 + position)
        # The best of the runs: modularity is the objective and k-means
        # only proposes partitions, so a run stuck in a poor local minimum
        # should not count against its count.
        scores[clusters] = max(
            modularity(graph, column) for column in assigned.T)
    # A larger count must win by more than float rounding: a k-means run
    # that leaves a cluster empty reproduces the smaller count's partition,
    # and its modularity then differs only in the summation order (which
    # the CPU's vector width decides).
    best = max(scores, key=lambda c: (round(scores[c], 9), -c))
    return best, scores, vectors


def ensemble_counts(clusters, span, runs):
    """Clusters of each of `runs` k-means runs: geometric over [C, span C].

    span = 1: every run has C clusters. span > 1: the runs spread from C to
    span C, so a pair is similar only if every granularity in the window
    joins it (precision of the finest) and dissimilar only if every one
    separates it (recall of the coarsest): a count read a little low from
    the graph then costs less than a fixed C would.
    """
    if runs == 1 or span == 1.0:
        return [int(clusters)] * runs
    steps = np.arange(runs) / (runs - 1)
    return [int(round(clusters * span ** t)) for t in steps]


def spectral_embedding(ids, dimensions, seed, ordered=False):
    """Rows of the top eigenvectors of the normalised kNN graph (unit rows).

    With ``ordered``, the raw eigenvectors [N, dimensions], largest
    eigenvalue first (rows not normalised).

    Laplacian eigenmaps (Ng, Jordan and Weiss): A is the symmetrised kNN
    graph, the embedding the ``dimensions`` largest eigenvectors of
    D^-1/2 A D^-1/2, found by sparse Lanczos (O(N k) memory).
    """
    import scipy.sparse as sp
    import scipy.sparse.linalg as sla

    n = len(ids)
    graph = knn_graph(ids)
    degree = np.asarray(graph.sum(axis=1)).ravel()
    inverse_root = sp.diags(1.0 / np.sqrt(degree))
    normalised = inverse_root @ graph @ inverse_root
    start = np.random.default_rng(seed).standard_normal(n)
    values, vectors = sla.eigsh(
        normalised, k=min(dimensions, n - 1), which="LA", v0=start
    )
    if not ordered:
        return features_lib.unit_rows(vectors.astype(np.float32))
    # Largest eigenvalue first, so that a prefix of the columns is the
    # embedding of a coarser clustering (multiscale mode).
    return vectors[:, np.argsort(-values, kind="stable")].astype(np.float32)


# The finest scale of the shipped recipe's ladder (20,000 train items,
# clusters of at least 80). A smaller collection reaches it too, while its
# mean cluster keeps MIN_CLUSTER_ITEMS: on 2,500 to 10,000 train items the
# finer ladder leads at the top of the list on both development collections'
# validation (docs/product_recipe.md §1m).
FINEST_SCALE = 128
MIN_CLUSTER_ITEMS = 10


def cluster_scales(num_items, cluster_size):
    """The granularities of multiscale mode: 2, 4, 8, ... clusters.

    Doubling while the mean cluster would keep at least ``cluster_size``
    items, so the ladder follows N and never the number of classes (which a
    user does not know): N = 20,000 and cluster_size = 80 give 2 ... 128. A
    collection too small for that still reaches `FINEST_SCALE` clusters
    while they keep `MIN_CLUSTER_ITEMS` items on average (the cluster size
    drops to N // FINEST_SCALE): N = 5,000 and cluster_size = 40 give
    2 ... 128 (clusters of 39), N = 600 gives 2 ... 32.
    """
    size = min(cluster_size,
               max(MIN_CLUSTER_ITEMS, num_items // FINEST_SCALE))
    scales = [2]
    while scales[-1] * 2 * size <= num_items:
        scales.append(scales[-1] * 2)
    return scales


# Eigenvectors kept for the multiscale embedding: Lanczos cost grows with
# it, and past a few dozen the extra eigenvectors of a kNN graph are noise.
MAX_EMBEDDING = 64


def multiscale_assignments(ids, scales, runs, seed, features=None,
                           learned_share=0.0):
    """Cluster ids at every scale of the ladder, int32 [N, S R].

    Scale C clusters the rows of the top min(C, 64) eigenvectors of the kNN
    graph by k-means (Ng, Jordan and Weiss: C clusters, C eigenvectors),
    ``runs`` seeds each. ``learned_share`` in [0, 1]: the coarsest
    ceil(share S) scales are learned from the graph on ``features`` instead
    (`learned_clusters`; the share of a ladder that follows N, never a
    class count), ``runs`` heads each.
    """
    learned = int(np.ceil(float(learned_share) * len(scales) - 1e-9))
    if learned and features is None:
        raise ValueError("learned_share > 0 needs the features")
    columns = []
    if learned:
        from uhga_tf.similarity import learned_clusters

        columns.append(learned_clusters.learned_assignments(
            features, ids, [c for c in scales[:learned] for _ in range(runs)],
            seed))
    if learned < len(scales):
        vectors = spectral_embedding(
            ids, min(max(scales), MAX_EMBEDDING), seed, ordered=True)
        for position, clusters in enumerate(scales):
            if position < learned:
                continue
            space = features_lib.unit_rows(vectors[:, :max(clusters, 2)])
            columns.append(cluster_assignments(
                space, clusters, runs, (seed % 1000) * 100 + position))
    return np.concatenate(columns, axis=1)


def cluster_assignments(unit, clusters, runs, seed, iterations=25):
    """Spherical k-means ids of every row, one column per run (int32)."""
    import faiss

    ids = np.empty((len(unit), runs), dtype=np.int32)
    for run in range(runs):
        # min_points_per_centroid only gates faiss's "please provide at
        # least 39 k points" warning (fine ladder scales have fewer); the
        # clustering itself is unchanged.
        kmeans = faiss.Kmeans(
            unit.shape[1], clusters, niter=iterations, spherical=True,
            seed=int(seed) * 1000 + run, verbose=False,
            min_points_per_centroid=1,
        )
        kmeans.train(unit)
        _, assigned = kmeans.index.search(unit, 1)
        ids[:, run] = assigned[:, 0]
    return ids


def build_structured_similarity(
    features,
    *,
    similarity,
    similarity_knn=20,
    similarity_clusters=50,
    similarity_runs=5,
    similarity_dissimilar_quantile=0.3,
    similarity_cluster_size=40,
    similarity_positive_share=0.5,
    similarity_negative_share=0.25,
    similarity_grading=0.0,
    similarity_cluster_span=1.0,
    similarity_cosine_mix=0.0,
    similarity_centring=0.0,
    similarity_learned_share=0.0,
    seed=0,
):
    """Build the compact structure of a structured similarity mode.

    Args:
        features: float [N, D] train features (cosine distances only).
        similarity: "knn", "manifold" or "cluster".
        similarity_knn: k of the kNN graph (knn, manifold), 1 <= k < N.
        similarity_clusters: clusters per k-means run, 2 <= C <= N
            (cluster, manifold); 0 = read the count from the kNN graph
            (`graph_cluster_count`), so no class count is needed.
        similarity_runs: k-means runs with different seeds, >= 1.
        similarity_cluster_span: s >= 1: the runs' cluster counts spread
            geometrically over [C, s C] (`ensemble_counts`); 1 = all C.
        similarity_dissimilar_quantile: per-row distance quantile beyond
            which a pair is dissimilar (knn, manifold), in (0, 1).
        similarity_cluster_size: smallest mean cluster size of the
            multiscale ladder, lowered for a small collection so that the
            ladder reaches `FINEST_SCALE` (`cluster_scales`), >= 1.
        similarity_positive_share, similarity_negative_share: multiscale:
            a pair joined in at least the first share of the (scale, run)
            clusterings is similar, in at most the second dissimilar.
        similarity_grading: multiscale, g in [0, 1]: a similar pair joined
            in a share a of the clusterings gets 1 - g (1 - a), not 1.
        similarity_cosine_mix: coassociation, m in [0, 1): S = (1 - m)
            (2 a - 1) + m cos(centred rows); 0 = the ladder alone.
        similarity_centring: coassociation, c in [0, 1]: the weight of
            the centred share (a - r_i - r_j + r) / (1 - r) in S
            (`row_agreement`); 0 = S = 2 a - 1.
        similarity_learned_share: multiscale, coassociation: the share in
            [0, 1] of the ladder learned (`multiscale_assignments`).
        seed: seeds k-means and the radius column sample.

    Returns:
        StructuredSimilarity with estimated fractions.

    Raises:
        ValueError: bad parameters, bad feature rows, or an S with no
            similar or no dissimilar pair.
    """
    features = _check_structured_arguments(
        features, similarity, similarity_knn, similarity_clusters,
        similarity_runs, similarity_dissimilar_quantile,
    )
    _check_ladder_options(similarity_cluster_span, similarity_learned_share)
    structure = _build_structure(
        features_lib.unit_rows(features), similarity, similarity_knn,
        similarity_clusters, similarity_runs,
        similarity_dissimilar_quantile, seed, similarity_cluster_size,
        (float(similarity_positive_share), float(similarity_negative_share),
         float(similarity_grading)),
        float(similarity_cluster_span),
        learned_share=float(similarity_learned_share),
    )
    if similarity == "coassociation":
        structure = _graded_options(structure, features, similarity_centring,
                                    similarity_cosine_mix)
    fractions = estimate_fractions(structure, seed)
    _check_fractions(fractions, similarity)
    structure = dataclasses.replace(structure, fractions=fractions)
    logging.info("similarity matrix (%s): %.1f MB stored, fractions %s",
                 similarity, structure.nbytes / 1e6,
                 {k: round(v, 4) for k, v in fractions.items()})
    return structure


def row_agreement(assignments):
    """float32 [N]: each row's share a with all N rows, averaged: the mean
    over clusterings of its cluster's size / N (the self pair included)."""
    assignments = np.asarray(assignments)
    num_items = len(assignments)
    shares = [np.bincount(column)[column] / num_items
              for column in assignments.T]
    return np.mean(shares, axis=0).astype(np.float32)


def _check_fractions(fractions, similarity):
    """Refuse an S with no similar or no dissimilar sampled pair."""
    if fractions["positive_offdiagonal"] == 0 or fractions["negative"] == 0:
        missing = (
            "similar" if fractions["positive_offdiagonal"] == 0
            else "dissimilar"
        )
        raise ValueError(
            f"the {similarity} similarity matrix has no {missing} pair "
            f"among sampled pairs; change similarity_knn, "
            "similarity_clusters, similarity_runs or "
            "similarity_dissimilar_quantile"
        )


def _graded_options(structure, features, centring, mix):
    """The coassociation structure with what its centring (row agreement)
    and cosine mix (the centred unit rows) read, where they are on."""
    if centring > 0:
        structure = dataclasses.replace(
            structure, row_agreement=row_agreement(structure.assignments),
            centring=float(centring))
    if mix > 0:
        centred = features - features.mean(axis=0)
        structure = dataclasses.replace(
            structure, cosine_mix=float(mix),
            unit_features=features_lib.unit_rows(centred))
    return structure


def _check_ladder_options(span, learned_share):
    """Raise ValueError naming a bad span or learned share."""
    if not span >= 1.0:
        raise ValueError(
            "similarity_cluster_span must be >= 1; received "
            f"similarity_cluster_span={span!r}")
    if not 0.0 <= learned_share <= 1.0:
        raise ValueError(
            "similarity_learned_share must be in [0, 1]; received "
            f"similarity_learned_share={learned_share!r}")


def _check_structured_arguments(features, similarity, knn, clusters, runs,
                                quantile):
    """Return checked features; raise ValueError naming a bad flag."""
    if similarity not in STRUCTURED_MODES:
        raise ValueError(
            f"similarity must be one of {STRUCTURED_MODES}; received "
            f"similarity={similarity!r}"
        )
    features = features_lib.check_features(
        features, min_rows=2, nonzero_rows=True)
    n = len(features)
    if (similarity in ("knn", "manifold", "multiscale", "coassociation")
            or clusters == AUTO_CLUSTERS) and not 1 <= knn < n:
        raise ValueError(
            f"similarity_knn must be in [1, N) = [1, {n}) for {n} train "
            f"items; received similarity_knn={knn}"
        )
    if similarity in ("cluster", "manifold"):
        if clusters != AUTO_CLUSTERS and not 2 <= clusters <= n:
            raise ValueError(
                f"similarity_clusters must be 0 (read from the kNN graph) or"
                f" in [2, N] = [2, {n}]; received similarity_clusters="
                f"{clusters}"
            )
        if runs < 1:
            raise ValueError(
                f"similarity_runs must be >= 1; received similarity_runs="
                f"{runs}"
            )
    if not 0 < quantile < 1:
        raise ValueError(
            "similarity_dissimilar_quantile must be in (0, 1); received "
            f"similarity_dissimilar_quantile={quantile}"
        )
    return features


def _build_structure(unit, similarity, knn, clusters, runs, quantile, seed,
                     cluster_size, shares, span, learned_share=0.0):
    """The StructuredSimilarity of a mode, without fractions."""
    if similarity == "knn":
        ids, _ = nearest_neighbours(unit, knn)
        return StructuredSimilarity(
            mode=similarity,
            neighbours=mutual_partners(ids),
            radius=row_radius(unit, quantile, seed),
            unit_features=unit,
        )
    if similarity in ("multiscale", "coassociation"):
        ids, _ = nearest_neighbours(unit, knn)
        scales = cluster_scales(len(unit), cluster_size)
        return StructuredSimilarity(
            mode=similarity,
            assignments=multiscale_assignments(
                ids, scales, runs, seed, features=unit,
                learned_share=learned_share),
            shares=shares,
        )
    # The train graph: manifold clusters in its embedding; a count read
    # from it needs it only when not read from a row sample.
    ids = nearest_neighbours(unit, knn)[0] if (
        similarity == "manifold" or (clusters == AUTO_CLUSTERS
                                     and len(unit) <= COUNT_SAMPLE)) else None
    if clusters != AUTO_CLUSTERS and span == 1.0:
        # A fixed count: every run clusters the same space.
        space = (spectral_embedding(ids, clusters, seed)
                 if similarity == "manifold" else unit)
        return StructuredSimilarity(
            mode=similarity,
            assignments=cluster_assignments(space, clusters, runs, seed),
            cluster_counts=(int(clusters),) * runs,
        )
    scores, vectors = {}, None
    if clusters == AUTO_CLUSTERS:
        clusters, scores, vectors = _count_from_graph(
            unit, ids, knn, cluster_size, seed)
        logging.info("cluster count read from the kNN graph: %d "
                     "(modularity %.4f)", clusters, scores[clusters])
    counts = [min(c, len(unit)) for c in ensemble_counts(clusters, span, runs)]
    if similarity == "manifold" and (
            vectors is None or vectors.shape[1] < min(max(counts),
                                                      MAX_EMBEDDING)):
        vectors = spectral_embedding(
            ids, min(max(counts), MAX_EMBEDDING), seed, ordered=True)
    columns = []
    for run, count in enumerate(counts):
        space = (features_lib.unit_rows(vectors[:, :max(2, count)])
                 if similarity == "manifold" else unit)
        columns.append(cluster_assignments(
            space, count, 1, int(seed) * 1000 + run))
    return StructuredSimilarity(
        mode=similarity,
        assignments=np.concatenate(columns, axis=1),
        cluster_counts=tuple(counts),
        count_modularity=scores,
    )


def _count_from_graph(unit, ids, knn, cluster_size, seed):
    """`graph_cluster_count` on the train graph, or on a sample of it.

    Past COUNT_SAMPLE rows the count is read from the kNN graph of a seeded
    row sample (a count of kinds, not of rows, needs no more), so that 64
    eigenvectors and ~70 k-means runs never touch all N rows; the embedding
    is then recomputed on all rows for the clusters actually used.
    """
    max_count = max(2, min(MAX_EMBEDDING, len(unit) // cluster_size))
    if len(unit) <= COUNT_SAMPLE:
        return graph_cluster_count(ids, max_count, seed)
    rows = np.sort(np.random.default_rng(seed).choice(
        len(unit), COUNT_SAMPLE, replace=False))
    sample_ids, _ = nearest_neighbours(unit[rows], knn)
    count, scores, _ = graph_cluster_count(sample_ids, max_count, seed)
    return count, scores, None


def estimate_fractions(structure, seed):
    """Fractions of S entries over a sample of pairs (all pairs if small)."""
    rows, cols, block = entries.sampled_block(
        structure, structure.num_items, seed)
    off_diagonal = rows[:, None] != cols[None, :]
    return {
        **entries.entry_fractions(block),
        "positive_offdiagonal": float(
            np.sum(entries.positive_mass(block) * off_diagonal)
        ) / float(block.size),
    }
