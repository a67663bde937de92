"""The similarity matrix S that supervises training, behind one interface.

Every S, dense or structured, is built by `build(config, features, seed)`
and answers the same questions, so no caller switches on its type:

* ``block(index_1, index_2, tensors=None)``: the S entries of two batches of
  train rows, a TF tensor (graph-safe; pass ``tensors()``, made once, inside
  a model);
* ``fractions``: shares of +1 / -1 / 0 entries (graded S by mass);
* ``positive_negative()``: what omega = auto divides;
* ``summary()``: what results store about it (thresholds, size);
* ``num_items``: N.

Modules: `dense` (the paper's thresholded cosine distances, int8 [N, N]),
`structured` (kNN, cluster ensembles, manifold and multiscale, beyond the
paper: nothing N x N is stored), `features` (the one feature check and the
one unit-row normalisation), `entries` (fractions, sampled pairs, label
diagnostics).
"""

import numpy as np

from uhga_tf.similarity import dense
from uhga_tf.similarity import entries
from uhga_tf.similarity import structured
from uhga_tf.similarity.dense import DENSE_MODES  # noqa: F401
from uhga_tf.similarity.dense import SimilarityMatrix
from uhga_tf.similarity.dense import build_similarity_matrix  # noqa: F401
from uhga_tf.similarity.dense import cosine_distance_histogram  # noqa: F401
from uhga_tf.similarity.entries import entry_fractions  # noqa: F401
from uhga_tf.similarity.entries import label_agreement  # noqa: F401
from uhga_tf.similarity.entries import sampled_block  # noqa: F401
from uhga_tf.similarity.structured import STRUCTURED_MODES
from uhga_tf.similarity.structured import StructuredSimilarity  # noqa: F401


def build(config, features, seed):
    """S of `config.similarity`'s mode over the train features.

    Args:
        config: `config.SimilarityConfig`.
        features: float [N, D] train features (cosine distances only).
        seed: seeds k-means runs and samples (structured modes).
    """
    if config.similarity_centring is None:
        raise ValueError(
            "similarity_centring='auto' follows the code length: build S "
            "from an ExperimentConfig's similarity section (which holds the "
            "number) or pass a number in [0, 1]")
    if config.similarity in STRUCTURED_MODES:
        return structured.build_structured_similarity(
            features, seed=seed,
            **_options(config, structured.build_structured_similarity))
    return dense.build_similarity_matrix(
        features, **_options(config, dense.build_similarity_matrix))


def _options(config, builder):
    """The config fields that `builder` takes, by name (one mapping, so a
    new field reaches its builder without being listed twice)."""
    import inspect

    names = inspect.signature(builder).parameters
    return {name: getattr(config, name) for name in names
            if name != "seed" and hasattr(config, name)}


def as_similarity(similarity):
    """A built S as it is; a bare int8 [N, N] array wrapped as dense S."""
    if hasattr(similarity, "block"):
        return similarity
    return SimilarityMatrix.from_matrix(similarity)


def resolve_positive_weight(positive_weight, similarity):
    """Return omega of eq. (6): a float > 0, or "auto" = #(S=-1) / #(S=+1).

    Args:
        positive_weight: float > 0 or the string "auto".
        similarity: a built S, or an int8 [N, N] array (only read for
            "auto": exact counts for a dense S, sampled shares for a
            structured one).
    """
    if isinstance(positive_weight, str):
        if positive_weight != "auto":
            raise ValueError(
                "positive_weight must be a float > 0 or 'auto'; received "
                f"positive_weight={positive_weight!r}"
            )
        n_pos, n_neg = as_similarity(similarity).positive_negative()
        if n_pos == 0:
            raise ValueError(
                "positive_weight='auto' needs at least one S=+1 entry; "
                "received a similarity_matrix with 0 positive entries"
            )
        return float(n_neg) / float(n_pos)
    value = float(positive_weight)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(
            "positive_weight must be a float > 0 or 'auto'; received "
            f"positive_weight={positive_weight!r}"
        )
    return value
