"""References that use the product's structure without learning a hash head.

What does training (and gradient attention) add beyond the kNN graph and the
clusters that build the similarity matrix? These two hashers answer it: they
use the same unit-row cosine geometry, the same kNN graph and the same
multiscale k-means ensemble (`uhga_tf.similarity.structured`, same defaults
as the product recipe), and turn them into codes in closed form.

* ``spectral_itq``: Laplacian eigenmaps of the train features' kNN graph
  (``code_length`` dimensions), extended to new items by a ridge
  least-squares map from the centred features, then ITQ.
* ``kmeans_ls``: the multiscale k-means pseudo-labels as one-hot targets, a
  ridge least-squares linear head from the centred features to them, then
  PCA + ITQ rotation of the head's outputs to ``code_length`` bits and sign.
  A small collection's ladder has few scales; where its targets span fewer
  directions than the code has bits, the features' principal directions
  orthogonal to the head fill the rest (`spare_directions`).

Both fit on train features only (N x N is never formed) and, like every
`Hasher`, encode by one matrix product and a sign.
"""

import numpy as np
from absl import logging

from uhga_tf import codes as codes_lib
from uhga_tf.baselines.hasher import Hasher
from uhga_tf.baselines.hasher import register
from uhga_tf.baselines.shallow import itq_rotation
from uhga_tf.baselines.shallow import pca_directions
from uhga_tf.similarity import features as features_lib
from uhga_tf.similarity import structured

STRUCTURE_OPTIONS = {"knn": 20, "cluster_size": 40, "runs": 3,
                     "ridge": 1e-2, "itq_iters": 50}


def ridge_map(features, targets, ridge):
    """W minimising ||X W - Y||^2 + ridge * tr(X^T X) / D * ||W||^2."""
    gram = features.T @ features
    scale = ridge * np.trace(gram) / gram.shape[0]
    return np.linalg.solve(
        gram + scale * np.eye(gram.shape[0]), features.T @ targets)


def spare_directions(features, head, count):
    """Up to `count` principal directions of the features orthogonal to
    `head`'s columns, scaled so their outputs spread like the head's on
    average."""
    left, values, _ = np.linalg.svd(head, full_matrices=False)
    basis = left[:, values > values.max() * max(head.shape) * np.finfo(
        values.dtype).eps]
    centred = features - features.mean(axis=0)
    residual = centred - (centred @ basis) @ basis.T
    # Features of low rank have fewer to give; a linear map can never
    # split the items along more directions than they span.
    count = min(count, min(len(features) - 1, residual.shape[1])
                - basis.shape[1])
    if count < 1:
        return np.zeros((head.shape[0], 0))
    directions = pca_directions(residual, count)
    spread = np.std(centred @ head, axis=0).mean()
    own = np.maximum(np.std(residual @ directions, axis=0), 1e-12)
    return directions * (spread / own)


class _StructuralHasher(Hasher):
    """Shared option checks, ITQ on the head's outputs, and encode."""

    DEFAULT_OPTIONS = {**STRUCTURE_OPTIONS, "unit_rows": True}
    ARRAYS = ("projection", "rotation")

    def _validate_options(self):
        for key in ("knn", "cluster_size", "runs", "itq_iters"):
            self._check_int_option(key, self.options[key],
                                   0 if key == "itq_iters" else 1)
        ridge = self.options["ridge"]
        if not isinstance(ridge, (int, float)) or not ridge > 0:
            raise ValueError(f"ridge must be > 0; received ridge={ridge!r}")

    def _neighbours(self, features):
        if not 1 <= self.options["knn"] < len(features):
            raise ValueError(
                f"{self.name} needs knn in [1, n) for {len(features)} train "
                f"items; received knn={self.options['knn']}"
            )
        unit = features_lib.unit_rows(features.astype(np.float32))
        ids, _ = structured.nearest_neighbours(
            unit, self.options["knn"])
        return ids

    def _fit_head(self, features, targets, rng):
        """Ridge map to `targets`, PCA to code_length, ITQ rotation.

        Where the targets span fewer directions than the code has bits (a
        small collection: few scales fit its size), the features' own
        principal directions orthogonal to the head fill the rest, scaled
        to the head's spread, so every bit still splits the items.
        """
        head = ridge_map(features, targets, self.options["ridge"])
        outputs = features @ head
        rank = int(np.linalg.matrix_rank(outputs - outputs.mean(axis=0)))
        if rank < self.code_length:
            logging.warning(
                "%s: the clusters of %d train items span %d directions; "
                "the other %d of %d bits follow the features' principal "
                "directions (a collection this size may be better served "
                "by a shorter code_length)", self.name, len(features), rank,
                self.code_length - rank, self.code_length)
            head = np.concatenate(
                [head, spare_directions(features, head,
                                        self.code_length - rank)], axis=1)
            outputs = features @ head
        pca = pca_directions(outputs, self.code_length)
        self.projection = head @ pca
        self.rotation, _ = itq_rotation(
            outputs @ pca - (outputs @ pca).mean(axis=0), rng,
            self.options["itq_iters"])

    def _encode(self, features):
        return codes_lib.binarize(features @ self.projection @ self.rotation)

    def linear_map(self):
        return self.projection @ self.rotation


@register
class SpectralITQ(_StructuralHasher):
    """Spectral embedding of the kNN graph, ridge out-of-sample map, ITQ."""

    name = "spectral_itq"

    def _fit(self, features, rng):
        ids = self._neighbours(features)
        seed = int(rng.integers(1000))
        embedding = structured.spectral_embedding(
            ids, self.code_length + 1, seed, ordered=True)
        # Column 0 is the graph's trivial (degree) direction: no split.
        self._fit_head(features, embedding[:, 1:], rng)


@register
class KMeansLS(_StructuralHasher):
    """Multiscale k-means pseudo-labels, least-squares head, ITQ, sign."""

    name = "kmeans_ls"

    def __init__(self, code_length, learned_share=0.0, graph_features=None,
                 **options):
        # Not options: the product's start may learn its coarse clusters
        # or take its graph from other rows (`structure_hash_map`), the
        # reference (whose options key its stored cells) never does.
        super().__init__(code_length, **options)
        self.learned_share = float(learned_share)
        self.graph_features = graph_features

    def _fit(self, features, rng):
        graph = (features if self.graph_features is None
                 else self.graph_features)
        if len(graph) != len(features):
            raise ValueError(
                f"graph_features has {len(graph)} rows, features "
                f"{len(features)}; they must be the same train items")
        ids = self._neighbours(graph)
        scales = structured.cluster_scales(
            len(features), self.options["cluster_size"])
        assignments = structured.multiscale_assignments(
            ids, scales, self.options["runs"], int(rng.integers(1000)),
            features=(features_lib.unit_rows(graph.astype(np.float32))
                      if self.learned_share else None),
            learned_share=self.learned_share)
        one_hot = np.concatenate([
            np.eye(int(column.max()) + 1)[column]
            for column in assignments.T
        ], axis=1)
        self._fit_head(features, one_hot - one_hot.mean(axis=0), rng)


def structure_hash_map(features, code_length, seed, learned_share=0.0,
                       graph_features=None, **options):
    """An affine hash map from the k-means+LS reference, for `hash_init`.

    Fits `KMeansLS` with ``options`` (e.g. knn, cluster_size; no unit rows:
    the map acts on ``features`` exactly as given, the hash layer's input,
    which is already unit-row and centred with `feature_unit_rows`) and
    folds its centring,
    projection and rotation into one (kernel [D, K], bias [K]) with
    sign(features @ kernel + bias) equal to its codes. Each bit is scaled
    to unit standard deviation over ``features`` so the tanh relaxation
    starts unsaturated. ``learned_share`` > 0 learns the ladder's coarsest
    scales as `similarity_learned_share` does for S. ``graph_features``
    (rows of the same train items, e.g. `similarity_stock_features`' side
    by side unit rows): the kNN graph comes from their centred unit rows,
    as it comes from ``features``' (the centred unit rows) without them;
    the map still acts on ``features``.
    """
    if graph_features is not None:
        unit = features_lib.unit_rows(
            np.asarray(graph_features, dtype=np.float32))
        graph_features = unit - unit.mean(axis=0)
    hasher = KMeansLS(code_length, learned_share=learned_share,
                      graph_features=graph_features,
                      **{**options, "unit_rows": False}).fit(features, seed)
    kernel = hasher.projection @ hasher.rotation
    bias = -hasher.mean @ kernel
    spread = np.std(features @ kernel + bias, axis=0)
    spread = np.maximum(spread, 1e-12)
    return (kernel / spread).astype(np.float32), (bias / spread).astype(
        np.float32)
