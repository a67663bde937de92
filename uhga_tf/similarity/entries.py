"""S entries as numbers: fractions, omega, sampled pairs, label agreement.

Shared by every similarity matrix, dense or structured.
"""

import numpy as np

FRACTION_SAMPLE = 2048


def positive_mass(matrix):
    """Per entry, the loss's target probability of "similar": (1 + s) / 2
    on labeled entries (s != 0), 0 on unlabeled ones; 1 for s = +1 and 0 for
    s = -1, so a graded S in [-1, 1] counts by mass."""
    matrix = np.asarray(matrix, dtype=np.float32)
    return np.where(matrix != 0, (1.0 + matrix) / 2.0, 0.0)


def entry_fractions(matrix):
    """Shares of +1, -1 and 0 entries of an S matrix or block.

    A graded S (float entries in [-1, 1]) counts each labeled entry as
    (1 + s) / 2 similar and (1 - s) / 2 dissimilar.
    """
    total = float(matrix.size)
    if np.issubdtype(np.asarray(matrix).dtype, np.floating):
        labeled = float(np.count_nonzero(matrix)) / total
        positive = float(np.sum(positive_mass(matrix))) / total
        negative = labeled - positive
        return {"positive": positive, "negative": negative,
                "unlabeled": 1.0 - labeled}
    positive = float(np.count_nonzero(matrix == 1)) / total
    negative = float(np.count_nonzero(matrix == -1)) / total
    return {
        "positive": positive,
        "negative": negative,
        "unlabeled": 1.0 - positive - negative,
    }


def sample_pairs(num_items, seed, size=FRACTION_SAMPLE):
    """Two fixed random row samples (for fractions and diagnostics)."""
    rng = np.random.default_rng([seed, 7])
    size = min(size, num_items)
    return (
        np.sort(rng.choice(num_items, size, replace=False)),
        np.sort(rng.choice(num_items, size, replace=False)),
    )


# Rows of the sampled block computed at once: a graded S compares every
# (scale, run) clustering of each pair, so one [2048, 2048, clusterings]
# comparison of a ladder with 10 runs per scale held about 1 GB.
SAMPLE_ROWS_PER_STEP = 256


def sampled_block(similarity, num_items, seed):
    """(rows, cols, S block as numpy) on `sample_pairs`, a few rows a step.

    ``similarity`` is any matrix with ``block(index_1, index_2)``; every
    entry depends on its own pair only, so the block equals one call's.
    """
    rows, cols = sample_pairs(num_items, seed)
    block = np.concatenate([
        np.asarray(similarity.block(
            rows[start:start + SAMPLE_ROWS_PER_STEP], cols))
        for start in range(0, len(rows), SAMPLE_ROWS_PER_STEP)
    ])
    return rows, cols, block


def label_agreement(block, labels_1, labels_2):
    """Diagnostics only: how often S agrees with the class labels.

    Never used to train or select. Labels are int [b] or multi-hot [b, C]
    (same class = at least one shared label); the diagonal counts.

    Returns:
        {"p_same_given_similar", "p_different_given_dissimilar",
        "p_same_base_rate"} (NaN where S has no such entry).
    """
    labels_1, labels_2 = np.asarray(labels_1), np.asarray(labels_2)
    if labels_1.ndim == 1:
        same = labels_1[:, None] == labels_2[None, :]
    else:
        same = (labels_1.astype(np.int32) @ labels_2.T.astype(np.int32)) > 0
    block = np.asarray(block)
    # Graded S: the sign says which side of the loss a pair pulls towards.
    similar, dissimilar = block > 0, block < 0
    nan = float("nan")
    return {
        "p_same_given_similar": (
            float(same[similar].mean()) if similar.any() else nan
        ),
        "p_different_given_dissimilar": (
            float((~same[dissimilar]).mean()) if dissimilar.any() else nan
        ),
        "p_same_base_rate": float(same.mean()),
    }
