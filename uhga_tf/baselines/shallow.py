"""Shallow hashing baselines of protocol.md §6.1-6.5 (NumPy only).

LSH, SH, SpH, ITQ, DSH and PCAH, one class each on the `Hasher` interface.
All take centred features (the train mean is removed by `Hasher`, protocol
§5) and map to codes with the rule >= 0 -> +1 unless the method defines its
own test (SpH: inside the ball; DSH: strictly on the + side of the plane).
MATLAB references: willard-yuan/hashing-baseline-for-image-retrieval@8228378
(`Method-*/train*.m`, `compress*.m`).
"""

import numpy as np

from uhga_tf import codes as codes_lib
from uhga_tf.baselines.hasher import Hasher
from uhga_tf.baselines.hasher import register


def pca_directions(features, num_components):
    """Top principal directions of features (by covariance eigenvalue).

    Each direction's sign is fixed so that its largest-magnitude entry is
    positive, making the result independent of the eigen-solver's signs.

    Returns:
        float64 [D, num_components], columns by decreasing eigenvalue.
    """
    centred = features - features.mean(axis=0)
    covariance = centred.T @ centred / max(1, features.shape[0] - 1)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(-values, kind="stable")[:num_components]
    directions = vectors[:, order]
    pivots = np.argmax(np.abs(directions), axis=0)
    signs = np.sign(directions[pivots, np.arange(directions.shape[1])])
    signs[signs == 0] = 1.0
    return directions * signs


def _check_pca_length(code_length, features, name):
    if code_length > features.shape[1]:
        raise ValueError(
            f"{name} needs code_length <= D = {features.shape[1]} "
            f"for train features of shape {features.shape}; received "
            f"code_length={code_length}"
        )


def _squared_distances(points, centers):
    """Squared Euclidean distances [n, k], clipped at 0."""
    squared = (
        np.einsum("ij,ij->i", points, points)[:, None]
        + np.einsum("ij,ij->i", centers, centers)[None, :]
        - 2.0 * points @ centers.T
    )
    return np.maximum(squared, 0.0)


@register
class LSH(Hasher):
    """Sign random projections (Charikar, STOC 2002; protocol §6.1).

    fit: P [D, K] with i.i.d. N(0, 1) entries; encode: b = sgn(x^T P).
    """

    name = "lsh"
    ARRAYS = ("projection",)

    def _fit(self, features, rng):
        self.projection = rng.standard_normal(
            (features.shape[1], self.code_length)
        )

    def _encode(self, features):
        return codes_lib.binarize(features @ self.projection)


@register
class PCAH(Hasher):
    """PCA hashing: sign of the top-K PCA projections (deterministic)."""

    name = "pcah"
    ARRAYS = ("pca",)

    def _fit(self, features, rng):
        del rng  # deterministic
        _check_pca_length(self.code_length, features, "pcah")
        self.pca = pca_directions(features, self.code_length)

    def _encode(self, features):
        return codes_lib.binarize(features @ self.pca)


@register
class SH(Hasher):
    """Spectral Hashing with 1-D eigenfunctions (Weiss et al.; §6.2).

    fit: PCA to K' = min(K, D) dims; per dim j the range [lo_j, hi_j]
    (min/max -/+ float64 eps), L_j = hi_j - lo_j; modes (j, m),
    m = 1..ceil((K+1) L_j / max L) - 1, scored (m pi / L_j)^2 and stably
    sorted after the constant mode, which is dropped; the first K are kept.
    encode: b_k = sgn(sin(pi/2 + m_k pi (y_{j_k} - lo_{j_k}) / L_{j_k})).
    Deterministic (the seed is unused).
    """

    name = "sh"
    ARRAYS = ("pca", "low", "span", "mode_dims", "mode_orders")

    def _fit(self, features, rng):
        del rng  # deterministic
        num_dims = min(self.code_length, features.shape[1])
        self.pca = pca_directions(features, num_dims)
        projected = features @ self.pca
        eps = np.finfo(np.float64).eps
        self.low = projected.min(axis=0) - eps
        high = projected.max(axis=0) + eps
        self.span = high - self.low
        max_modes = np.ceil(
            (self.code_length + 1) * self.span / self.span.max()
        ).astype(np.int64)
        dims = [-1]  # the constant mode, score 0
        orders = [0]
        for j in range(num_dims):
            modes = np.arange(1, max_modes[j])
            dims.extend([j] * modes.size)
            orders.extend(modes.tolist())
        dims = np.asarray(dims)
        orders = np.asarray(orders)
        scores = np.zeros(dims.size)
        scores[1:] = (orders[1:] * np.pi / self.span[dims[1:]]) ** 2
        ranked = np.argsort(scores, kind="stable")
        ranked = ranked[ranked != 0][: self.code_length]
        self.mode_dims = dims[ranked]
        self.mode_orders = orders[ranked]

    def _encode(self, features):
        projected = (features @ self.pca)[:, self.mode_dims]
        phase = (
            self.mode_orders * np.pi
            * (projected - self.low[self.mode_dims])
            / self.span[self.mode_dims]
        )
        return codes_lib.binarize(np.sin(np.pi / 2 + phase))


@register
class SpH(Hasher):
    """Spherical Hashing (Heo et al., CVPR 2012; protocol §6.3).

    fit: K pivots, each the mean of 5 train points drawn without
    replacement; radius t_k = the floor(n/2)-th smallest distance to pivot k;
    pivots move by (1/K) sum_j f_ij, f_ij = 1/2 (o_ij - n/4)/(n/4)(p_i - p_j),
    for at most `sph_max_iters` (100) rounds, stopping once
    mean|o_ij - n/4| <= 0.10 n/4 and std(o_ij) <= 0.15 n/4 over i < j.
    encode: b_k = +1 iff ||x - p_k|| <= t_k. `sph_distance` ("hamming" or
    "spherical") records how codes are ranked; see
    `spherical_hamming_distance`.
    """

    name = "sph"
    DEFAULT_OPTIONS = {"sph_max_iters": 100, "sph_distance": "hamming"}
    ARRAYS = ("pivots", "radii", "num_iterations")

    def _validate_options(self):
        self._check_int_option("sph_max_iters",
                               self.options["sph_max_iters"], 1)
        if self.options["sph_distance"] not in ("hamming", "spherical"):
            raise ValueError(
                "sph_distance must be one of ['hamming', 'spherical']; "
                f"received sph_distance={self.options['sph_distance']!r}"
            )

    def _statistics(self, features, pivots):
        num_points = features.shape[0]
        distances = np.sqrt(_squared_distances(features, pivots))
        radii = np.partition(distances, num_points // 2 - 1, axis=0)[
            num_points // 2 - 1
        ]
        inside = (distances <= radii).astype(np.float64)
        return radii, inside.T @ inside

    def _fit(self, features, rng):
        num_points = features.shape[0]
        if num_points < 5:
            raise ValueError(
                "sph needs at least 5 train points; received features of "
                f"shape {features.shape}"
            )
        pivots = np.stack([
            features[rng.choice(num_points, 5, replace=False)].mean(axis=0)
            for _ in range(self.code_length)
        ])
        radii, overlap = self._statistics(features, pivots)
        quarter = num_points / 4.0
        upper = np.triu_indices(self.code_length, 1)
        iterations = 0
        for iterations in range(1, self.options["sph_max_iters"] + 1):
            coefficient = 0.5 * (overlap - quarter) / quarter
            np.fill_diagonal(coefficient, 0.0)
            force = coefficient.sum(axis=1)[:, None] * pivots - (
                coefficient @ pivots
            )
            pivots = pivots + force / self.code_length
            radii, overlap = self._statistics(features, pivots)
            pairs = overlap[upper]
            if (
                np.mean(np.abs(pairs - quarter)) <= 0.10 * quarter
                and np.std(pairs) <= 0.15 * quarter
            ):
                break
        self.pivots = pivots
        self.radii = radii
        self.num_iterations = np.array(iterations)

    def _encode(self, features):
        distances = np.sqrt(_squared_distances(features, self.pivots))
        return np.where(distances <= self.radii, 1, -1).astype(np.int8)


def spherical_hamming_distance(query_codes, database_codes):
    """Spherical Hamming distance |b xor b'| / |b and b'| (SpH paper).

    `and` counts bits that are +1 in both codes; the distance is inf when
    there is none.

    Returns:
        float64 [n_query, n_database].
    """
    differing = codes_lib.hamming_distance(query_codes, database_codes)
    query_inside = (np.asarray(query_codes) > 0).astype(np.float32)
    database_inside = (np.asarray(database_codes) > 0).astype(np.float32)
    shared = query_inside @ database_inside.T
    distances = np.full(differing.shape, np.inf)
    np.divide(differing, shared, out=distances, where=shared > 0)
    return distances


@register
class ITQ(Hasher):
    """Iterative Quantization (Gong et al., TPAMI 2013; protocol §6.4).

    fit: V = X E (top-K PCA); R from the SVD of a K x K standard-normal
    matrix; `itq_iters` (50) rounds of B = sgn(V R), B^T V = U S W^T,
    R = W U^T. `quantization_loss` holds ||sgn(V R_t) - V R_t||_F^2 for
    t = 0..itq_iters (before the first and after every update); it never
    increases. encode: b = sgn(x^T E R).
    """

    name = "itq"
    DEFAULT_OPTIONS = {"itq_iters": 50}
    ARRAYS = ("pca", "rotation", "quantization_loss")

    def _validate_options(self):
        self._check_int_option("itq_iters", self.options["itq_iters"], 0)

    def _fit(self, features, rng):
        _check_pca_length(self.code_length, features, "itq")
        self.pca = pca_directions(features, self.code_length)
        self.rotation, self.quantization_loss = itq_rotation(
            features @ self.pca, rng, self.options["itq_iters"])

    def _encode(self, features):
        return codes_lib.binarize(features @ self.pca @ self.rotation)

    def linear_map(self):
        return self.pca @ self.rotation


def itq_rotation(projected, rng, iterations):
    """ITQ's orthogonal R for projected data V [n, K] (Gong et al. 2013).

    Returns:
        (R float64 [K, K], quantization losses ||sgn(V R_t) - V R_t||_F^2
        for t = 0..iterations).
    """
    size = projected.shape[1]
    rotation = np.linalg.svd(rng.standard_normal((size, size)))[0]
    losses = []
    for _ in range(iterations):
        rotated = projected @ rotation
        binary = np.where(rotated >= 0, 1.0, -1.0)
        losses.append(float(np.sum((binary - rotated) ** 2)))
        left, _, right_t = np.linalg.svd(binary.T @ projected)
        rotation = right_t.T @ left.T
    rotated = projected @ rotation
    binary = np.where(rotated >= 0, 1.0, -1.0)
    losses.append(float(np.sum((binary - rotated) ** 2)))
    return rotation, np.asarray(losses)


@register
class DSH(Hasher):
    """Density Sensitive Hashing (Jin et al., T-Cyb 2014; protocol §6.5).

    fit: k-means with round(dsh_clusters_ratio * K) centers (1.5 K), seeded
    init from distinct train points, `dsh_kmeans_iters` (3) Lloyd rounds
    (an empty cluster keeps its center), cluster fractions from a final
    assignment; candidate pairs {a < b} = each center with its `dsh_r` (3)
    nearest other centers, by center distance (ties by (a, b)); plane
    w = c_a - c_b, theta = w^T (c_a + c_b) / 2; score
    min(n+, 1 - n+) / max(n+, 1 - n+) with n+ the cluster mass with
    w^T c_e > theta; the K best kept (ties -> closer pair). r grows by 1
    while there are fewer than K candidates.
    encode: b_k = +1 iff w_k^T x > theta_k (strict).
    """

    name = "dsh"
    DEFAULT_OPTIONS = {"dsh_clusters_ratio": 1.5, "dsh_r": 3,
                       "dsh_kmeans_iters": 3}
    ARRAYS = ("normals", "offsets")

    def _validate_options(self):
        ratio = self.options["dsh_clusters_ratio"]
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float, np.integer, np.floating))
            or not ratio * self.code_length >= 1.5
        ):
            raise ValueError(
                "dsh_clusters_ratio must be a number with "
                "dsh_clusters_ratio * code_length >= 2 centers; received "
                f"dsh_clusters_ratio={ratio!r}"
            )
        self._check_int_option("dsh_r", self.options["dsh_r"], 1)
        self._check_int_option("dsh_kmeans_iters",
                               self.options["dsh_kmeans_iters"], 0)

    def _fit(self, features, rng):
        num_points = features.shape[0]
        num_centers = int(
            np.floor(self.options["dsh_clusters_ratio"] * self.code_length
                     + 0.5)
        )
        if num_centers > num_points:
            raise ValueError(
                f"dsh needs at least {num_centers} train points "
                f"(round(dsh_clusters_ratio * code_length)); received "
                f"features of shape {features.shape}"
            )
        centers = features[rng.choice(num_points, num_centers, replace=False)]
        for _ in range(self.options["dsh_kmeans_iters"]):
            labels = np.argmin(_squared_distances(features, centers), axis=1)
            sums = np.zeros_like(centers)
            np.add.at(sums, labels, features)
            sizes = np.bincount(labels, minlength=num_centers)
            filled = sizes > 0
            centers = centers.copy()
            centers[filled] = sums[filled] / sizes[filled, None]
        labels = np.argmin(_squared_distances(features, centers), axis=1)
        fractions = np.bincount(labels, minlength=num_centers) / num_points

        center_distances = np.sqrt(_squared_distances(centers, centers))
        np.fill_diagonal(center_distances, np.inf)
        neighbours = np.argsort(center_distances, axis=1, kind="stable")
        r = self.options["dsh_r"]
        while True:
            pairs = {
                (min(a, b), max(a, b))
                for a in range(num_centers)
                for b in neighbours[a, : min(r, num_centers - 1)].tolist()
            }
            if len(pairs) >= self.code_length or r >= num_centers - 1:
                break
            r += 1
        if len(pairs) < self.code_length:
            raise ValueError(
                f"dsh found only {len(pairs)} candidate planes for "
                f"code_length={self.code_length}; raise dsh_clusters_ratio"
            )
        pairs = sorted(pairs, key=lambda ab: (center_distances[ab], ab))
        first = np.array([a for a, _ in pairs])
        second = np.array([b for _, b in pairs])
        normals = centers[first] - centers[second]
        offsets = np.einsum(
            "ij,ij->i", normals, (centers[first] + centers[second]) / 2.0
        )
        positive = (centers @ normals.T) > offsets
        mass = fractions @ positive
        scores = np.minimum(mass, 1 - mass) / np.maximum(mass, 1 - mass)
        best = np.argsort(-scores, kind="stable")[: self.code_length]
        self.normals = normals[best].T
        self.offsets = offsets[best]

    def _encode(self, features):
        return np.where(features @ self.normals > self.offsets, 1, -1).astype(
            np.int8
        )
