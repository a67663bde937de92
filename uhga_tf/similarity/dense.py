"""Similarity matrix S from cosine distances of frozen features (method.md §4-§5).

S is built once over the whole training set and kept as int8 [N, N] in
{-1, 0, +1}. During training each replica gathers only the rows and columns of
its own local batch (``S[index_1][:, index_2]``), so pairwise terms always see
the per-replica batch: changing the replica count never changes the pair set
of a replica, only the number of local batches per global batch.

Memory (only S is kept; distances are computed block by block and dropped):

* N = 5,000 (CIFAR-10): S is 25 MB int8; each block of ``block_size`` rows
  costs ``block_size * N * 8`` bytes of float64 (41 MB at 1024 rows).
* N = 10,500 (NUS-WIDE-21): S is 110 MB int8; a 1024-row block is 86 MB.
* N = 100,000: S would be 10 GB int8. Do not materialise it: keep the
  thresholds (``tau_sim``, ``tau_dis``, computable blockwise with
  :func:`cosine_distance_histogram`, O(N * block_size) memory) and look the
  batch pairs up from the features per step (cosine distances of the 2B
  batch features, then eq. (3)). ``build_similarity_matrix`` is for N up to a
  few tens of thousands.
"""

import dataclasses

import numpy as np
from absl import logging

from uhga_tf.similarity import entries
from uhga_tf.similarity import features as features_lib

NUM_BINS = 100
BIN_WIDTH = 0.01
BIN_START = -1e-8
DENSE_MODES = ("ssdh", "threshold")


@dataclasses.dataclass(frozen=True)
class SimilarityMatrix:
    """Similarity matrix and how it was made.

    Attributes:
        similarity_matrix: int8 [N, N] in {-1, 0, +1}; +1 similar (d < tau_sim),
            -1 dissimilar (d > tau_dis), 0 unlabeled.
        tau_sim: distance threshold below which a pair is similar.
        tau_dis: distance threshold above which a pair is dissimilar.
        mode: how the thresholds were set, "ssdh" or "threshold".
        fractions: {"positive": f, "negative": f, "unlabeled": f} over all
            N^2 entries (diagonal included); they sum to 1.
        distance_mode: the histogram mode m (left edge of the first
            most-populated bin) in "ssdh" mode; NaN in "threshold" mode.
    """

    similarity_matrix: np.ndarray
    tau_sim: float
    tau_dis: float
    mode: str
    fractions: dict
    distance_mode: float = float("nan")

    @classmethod
    def from_matrix(cls, matrix):
        """Wrap a given int8 [N, N] S (tests, user-made S)."""
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                "similarity_matrix must be square [N, N]; received shape "
                f"{matrix.shape}"
            )
        return cls(similarity_matrix=matrix.astype(np.int8),
                   tau_sim=float("nan"), tau_dis=float("nan"),
                   mode="given", fractions=entries.entry_fractions(matrix))

    @property
    def num_items(self):
        return self.similarity_matrix.shape[0]

    def positive_negative(self):
        """Exact #(S=+1) and #(S=-1) over all N^2 entries."""
        return (int(np.count_nonzero(self.similarity_matrix == 1)),
                int(np.count_nonzero(self.similarity_matrix == -1)))

    def summary(self):
        """What to store beside results: the thresholds of eq. (3)."""
        return {"mode": self.mode, "tau_sim": self.tau_sim,
                "tau_dis": self.tau_dis}

    def tensors(self):
        """S as a TF constant (build once, inside the model)."""
        import tensorflow as tf

        return {"matrix": tf.constant(self.similarity_matrix.astype(np.int8))}

    def block(self, index_1, index_2, tensors=None):
        """S entries [b1, b2] (int8) of two batches of train rows."""
        import tensorflow as tf

        matrix = (self.tensors() if tensors is None else tensors)["matrix"]
        return tf.gather(tf.gather(matrix, index_1, axis=0), index_2, axis=1)


@dataclasses.dataclass(frozen=True)
class DistanceHistogram:
    """Histogram and per-bin moments of all N^2 cosine distances.

    Slot 0 holds distances below the first bin edge, slots 1..100 the 100
    bins, slot 101 distances above the last edge (not counted in ``counts``,
    as in ``np.histogram``). Moments are taken about each slot's reference
    point ``references[slot]`` for numerical accuracy.

    Attributes:
        counts: int64 [100] histogram counts (``np.histogram`` semantics:
            bins [e_k, e_{k+1}), the last one closed).
        bin_edges: float64 [101], e_k = -1e-8 + k / 100.
        slot_counts: float64 [102] element counts per slot.
        slot_sum1: float64 [102] sum of (d - reference) per slot.
        slot_sum2: float64 [102] sum of (d - reference)^2 per slot.
        references: float64 [102] reference point of each slot.
    """

    counts: np.ndarray
    bin_edges: np.ndarray
    slot_counts: np.ndarray
    slot_sum1: np.ndarray
    slot_sum2: np.ndarray
    references: np.ndarray

    @property
    def mode(self):
        """Left edge of the first most-populated bin."""
        return float(self.bin_edges[int(np.argmax(self.counts))])

    def mirrored_sigmas(self):
        """Return (sigma_L, sigma_R) of the mirrored Gaussians about the mode.

        sigma_L = sqrt(mean_{d <= m} (d - m)^2) over bins left of the mode bin
        (plus the underflow slot); sigma_R over the rest. A distance exactly
        equal to m (measure zero) counts to the right.
        """
        mode_bin = int(np.argmax(self.counts))
        m = self.mode
        shift = self.references - m
        sq = self.slot_sum2 + 2.0 * shift * self.slot_sum1
        sq = sq + self.slot_counts * shift**2
        left = slice(0, mode_bin + 1)  # slot index = bin + 1
        right = slice(mode_bin + 1, NUM_BINS + 2)
        n_left = self.slot_counts[left].sum()
        n_right = self.slot_counts[right].sum()
        sigma_l = np.sqrt(sq[left].sum() / n_left) if n_left > 0 else 0.0
        sigma_r = np.sqrt(sq[right].sum() / n_right) if n_right > 0 else 0.0
        return float(sigma_l), float(sigma_r)


def _check_block_size(block_size):
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(
            "block_size must be an integer >= 1; received "
            f"block_size={block_size!r}"
        )


def _distance_blocks(features, block_size):
    """Yield (row_start, d) with d float64 [rows, N] cosine distances (2)."""
    unit = features_lib.unit_rows(features, np.float64)
    n = unit.shape[0]
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        d = 1.0 - unit[start:stop] @ unit.T
        rows = np.arange(stop - start)
        d[rows, start + rows] = 0.0  # d_ii = 0 exactly
        yield start, d


def _bin_edges():
    return BIN_START + np.arange(NUM_BINS + 1) / 100.0


def cosine_distance_histogram(features, block_size=1024):
    """Histogram all N^2 cosine distances blockwise (never N x N floats).

    Args:
        features: float [N, D] features.
        block_size: rows of the distance matrix held at once.

    Returns:
        DistanceHistogram with the 100-bin histogram (width 0.01 from
        -1e-8) and per-bin first/second moments, enough for the mode and the
        mirrored-Gaussian sigmas of method.md §5 without a second pass.
    """
    features = features_lib.check_features(features, dtype=None)
    _check_block_size(block_size)
    edges = _bin_edges()
    references = np.concatenate([[edges[0]], edges[:-1], [edges[-1]]])
    slot_counts = np.zeros(NUM_BINS + 2)
    slot_sum1 = np.zeros(NUM_BINS + 2)
    slot_sum2 = np.zeros(NUM_BINS + 2)
    for _, d in _distance_blocks(features, block_size):
        d = d.ravel()
        # np.histogram semantics: searchsorted right, last edge inclusive.
        bins = np.searchsorted(edges, d, side="right") - 1
        bins[d == edges[-1]] = NUM_BINS - 1
        slots = np.clip(bins + 1, 0, NUM_BINS + 1)
        centred = d - references[slots]
        slot_counts += np.bincount(slots, minlength=NUM_BINS + 2)
        slot_sum1 += np.bincount(slots, centred, minlength=NUM_BINS + 2)
        slot_sum2 += np.bincount(slots, centred**2, minlength=NUM_BINS + 2)
    counts = slot_counts[1 : NUM_BINS + 1].astype(np.int64)
    return DistanceHistogram(
        counts=counts,
        bin_edges=edges,
        slot_counts=slot_counts,
        slot_sum1=slot_sum1,
        slot_sum2=slot_sum2,
        references=references,
    )


def _check_nonnegative(name, value):
    if value is None:
        return
    if not np.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0; received {name}={value!r}"
        )


def build_similarity_matrix(
    features,
    *,
    similarity="ssdh",
    similarity_lambda=0.2,
    ssdh_alpha=None,
    ssdh_beta=None,
    similarity_threshold=None,
    dissimilarity_threshold=None,
    block_size=1024,
):
    """Build S of eq. (3) from features, blockwise.

    Args:
        features: float [N, D] (non-negative fc7-style features give
            distances in [0, 1]).
        similarity: "ssdh" (thresholds m -/+ alpha/beta * sigma_L/R) or
            "threshold" (plain cut).
        similarity_lambda: sets alpha = beta in "ssdh" mode, >= 0.
        ssdh_alpha, ssdh_beta: override one side each, >= 0.
        similarity_threshold: tau_sim in "threshold" mode, in [0, 2].
        dissimilarity_threshold: tau_dis in "threshold" mode; defaults to
            similarity_threshold; must be >= it.
        block_size: distance rows held in memory at once.

    Returns:
        SimilarityMatrix; memory O(N * block_size) float64 + N^2 int8.
    """
    if similarity not in DENSE_MODES:
        raise ValueError(
            f"similarity must be one of {DENSE_MODES}; received "
            f"similarity={similarity!r}"
        )
    _check_nonnegative("similarity_lambda", similarity_lambda)
    _check_nonnegative("ssdh_alpha", ssdh_alpha)
    _check_nonnegative("ssdh_beta", ssdh_beta)
    features = features_lib.check_features(features, dtype=None)
    _check_block_size(block_size)
    distance_mode = float("nan")
    if similarity == "ssdh":
        tau_sim, tau_dis, distance_mode = _ssdh_thresholds(
            features,
            similarity_lambda if ssdh_alpha is None else ssdh_alpha,
            similarity_lambda if ssdh_beta is None else ssdh_beta,
            block_size,
        )
    else:
        tau_sim, tau_dis = _plain_thresholds(
            similarity_threshold, dissimilarity_threshold
        )
    matrix = _threshold_matrix(features, tau_sim, tau_dis, block_size)
    fractions = entries.entry_fractions(matrix)
    logging.info(
        "similarity_matrix: mode=%s tau_sim=%.6f tau_dis=%.6f N=%d "
        "fractions=%s",
        similarity,
        tau_sim,
        tau_dis,
        matrix.shape[0],
        fractions,
    )
    return SimilarityMatrix(
        similarity_matrix=matrix,
        tau_sim=float(tau_sim),
        tau_dis=float(tau_dis),
        mode=similarity,
        fractions=fractions,
        distance_mode=distance_mode,
    )


def _ssdh_thresholds(features, alpha, beta, block_size):
    """(tau_sim, tau_dis, mode): m -/+ alpha/beta * sigma_L/R (§5)."""
    histogram = cosine_distance_histogram(features, block_size)
    distance_mode = histogram.mode
    sigma_l, sigma_r = histogram.mirrored_sigmas()
    return (
        distance_mode - alpha * sigma_l,
        distance_mode + beta * sigma_r,
        distance_mode,
    )


def _plain_thresholds(similarity_threshold, dissimilarity_threshold):
    """(tau_sim, tau_dis) of "threshold" mode, checked."""
    if similarity_threshold is None or not 0 <= similarity_threshold <= 2:
        raise ValueError(
            "similarity_threshold must be set in [0, 2] when "
            "similarity='threshold'; received "
            f"similarity_threshold={similarity_threshold!r}"
        )
    tau_sim = float(similarity_threshold)
    tau_dis = (
        tau_sim
        if dissimilarity_threshold is None
        else float(dissimilarity_threshold)
    )
    if not tau_sim <= tau_dis <= 2:
        raise ValueError(
            "dissimilarity_threshold must be in [similarity_threshold, 2]"
            f" = [{tau_sim}, 2]; received dissimilarity_threshold="
            f"{dissimilarity_threshold!r}"
        )
    return tau_sim, tau_dis


def _threshold_matrix(features, tau_sim, tau_dis, block_size):
    """int8 [N, N]: +1 where d < tau_sim, -1 where d > tau_dis, else 0."""
    n = features.shape[0]
    matrix = np.zeros((n, n), dtype=np.int8)
    for start, d in _distance_blocks(features, block_size):
        block = matrix[start : start + d.shape[0]]
        block[d < tau_sim] = 1
        block[d > tau_dis] = -1
    return matrix
