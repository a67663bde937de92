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

STRUCTURED_MODES = ("knn", "cluster", "manifold", "multiscale")
# Modes whose S entries are graded in [-1, 1] (float32), not {-1, 0, +1}.
GRADED_MODES = ("multiscale",)
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
    fractions: dict = dataclasses.field(default_factory=dict)

    @property
    def num_items(self):
        if self.assignments is not None:
            return len(self.assignments)
        return len(self.neighbours)

    @property
    def nbytes(self):
        """Bytes of the stored structure (O(N k + N D) or O(N R))."""
        arrays = (self.neighbours, self.radius, self.unit_features,
                  self.assignments)
        return sum(a.nbytes for a in arrays if a is not None)

    def summary(self):
        """What to store beside results: the mode and the stored size."""
        return {"mode": self.mode, "stored_mb": self.nbytes / 1e6}

    def positive_negative(self):
        """Sampled shares of S=+1 and S=-1 (N x N is never formed)."""
        return self.fractions["positive"], self.fractions["negative"]

    def tensors(self):
        """The structure as TF constants (build once, inside the model)."""
        if self.assignments is not None:
            return {"assignments": tf.constant(self.assignments),
                    "shares": tf.constant(self.shares, tf.float32)}
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

    n, k = ids.shape
    graph = sp.csr_matrix(
        (np.ones(n * k), (np.repeat(np.arange(n), k), ids.ravel())),
        shape=(n, n),
    )
    graph = ((graph + graph.T) > 0).astype(np.float64)
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


def cluster_scales(num_items, cluster_size):
    """The granularities of multiscale mode: 2, 4, 8, ... clusters.

    Doubling while the mean cluster would keep at least ``cluster_size``
    items, so the ladder follows N and never the number of classes (which a
    user does not know): N = 5,000 and cluster_size = 40 give 2 ... 64.
    """
    scales = [2]
    while scales[-1] * 2 * cluster_size <= num_items:
        scales.append(scales[-1] * 2)
    return scales


# Eigenvectors kept for the multiscale embedding: Lanczos cost grows with
# it, and past a few dozen the extra eigenvectors of a kNN graph are noise.
MAX_EMBEDDING = 64


def multiscale_assignments(ids, scales, runs, seed):
    """k-means ids at every scale in the spectral embedding, int32 [N, S R].

    Scale C clusters the rows of the top min(C, 64) eigenvectors of the kNN
    graph (Ng, Jordan and Weiss: C clusters, C eigenvectors), ``runs``
    seeds each.
    """
    vectors = spectral_embedding(
        ids, min(max(scales), MAX_EMBEDDING), seed, ordered=True)
    columns = []
    for position, clusters in enumerate(scales):
        space = features_lib.unit_rows(vectors[:, :max(clusters, 2)])
        columns.append(cluster_assignments(
            space, clusters, runs, (seed % 1000) * 100 + position))
    return np.concatenate(columns, axis=1)


def cluster_assignments(unit, clusters, runs, seed, iterations=25):
    """Spherical k-means ids of every row, one column per run (int32)."""
    import faiss

    ids = np.empty((len(unit), runs), dtype=np.int32)
    for run in range(runs):
        kmeans = faiss.Kmeans(
            unit.shape[1], clusters, niter=iterations, spherical=True,
            seed=int(seed) * 1000 + run, verbose=False,
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
    seed=0,
):
    """Build the compact structure of a structured similarity mode.

    Args:
        features: float [N, D] train features (cosine distances only).
        similarity: "knn", "manifold" or "cluster".
        similarity_knn: k of the kNN graph (knn, manifold), 1 <= k < N.
        similarity_clusters: clusters per k-means run, 2 <= C <= N.
        similarity_runs: k-means runs with different seeds, >= 1.
        similarity_dissimilar_quantile: per-row distance quantile beyond
            which a pair is dissimilar (knn, manifold), in (0, 1).
        similarity_cluster_size: smallest mean cluster size of the
            multiscale ladder (`cluster_scales`), >= 1.
        similarity_positive_share, similarity_negative_share: multiscale:
            a pair joined in at least the first share of the (scale, run)
            clusterings is similar, in at most the second dissimilar.
        similarity_grading: multiscale, g in [0, 1]: a similar pair joined
            in a share a of the clusterings gets 1 - g (1 - a), not 1.
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
    structure = _build_structure(
        features_lib.unit_rows(features), similarity, similarity_knn,
        similarity_clusters, similarity_runs,
        similarity_dissimilar_quantile, seed, similarity_cluster_size,
        (float(similarity_positive_share), float(similarity_negative_share),
         float(similarity_grading)),
    )
    fractions = estimate_fractions(structure, seed)
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
    structure = dataclasses.replace(structure, fractions=fractions)
    logging.info(
        "similarity matrix (%s): %.1f MB stored, fractions %s",
        similarity, structure.nbytes / 1e6,
        {k: round(v, 4) for k, v in fractions.items()},
    )
    return structure


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
    if similarity in ("knn", "manifold", "multiscale") and not 1 <= knn < n:
        raise ValueError(
            f"similarity_knn must be in [1, N) = [1, {n}) for {n} train "
            f"items; received similarity_knn={knn}"
        )
    if similarity in ("cluster", "manifold"):
        if not 2 <= clusters <= n:
            raise ValueError(
                f"similarity_clusters must be in [2, N] = [2, {n}]; "
                f"received similarity_clusters={clusters}"
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
                     cluster_size, shares):
    """The StructuredSimilarity of a mode, without fractions."""
    if similarity == "knn":
        ids, _ = nearest_neighbours(unit, knn)
        return StructuredSimilarity(
            mode=similarity,
            neighbours=mutual_partners(ids),
            radius=row_radius(unit, quantile, seed),
            unit_features=unit,
        )
    if similarity == "multiscale":
        ids, _ = nearest_neighbours(unit, knn)
        scales = cluster_scales(len(unit), cluster_size)
        return StructuredSimilarity(
            mode=similarity,
            assignments=multiscale_assignments(ids, scales, runs, seed),
            shares=shares,
        )
    space = unit
    if similarity == "manifold":
        ids, _ = nearest_neighbours(unit, knn)
        space = spectral_embedding(ids, clusters, seed)
    return StructuredSimilarity(
        mode=similarity,
        assignments=cluster_assignments(space, clusters, runs, seed),
    )


def estimate_fractions(structure, seed):
    """Fractions of S entries over a sample of pairs (all pairs if small)."""
    rows, cols = entries.sample_pairs(structure.num_items, seed)
    block = structure.block(rows, cols).numpy()
    off_diagonal = rows[:, None] != cols[None, :]
    return {
        **entries.entry_fractions(block),
        "positive_offdiagonal": float(
            np.sum(entries.positive_mass(block) * off_diagonal)
        ) / float(block.size),
    }
