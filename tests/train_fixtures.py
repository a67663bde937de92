"""Synthetic clustered features for tests of training and S (no images)."""

import numpy as np


def write_feature_file(path, num_classes=4, per_class=60, dim=16, seed=0):
    """Write an .npz for `dataset=features`: non-negative clustered features.

    Per class: 10 query, 30 train, 10 validation, 40 database rows (train and
    validation inside the database), like the image protocols in miniature.
    """
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.0, 1.0, size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    features = np.maximum(
        centers[labels] + 0.25 * rng.normal(size=(len(labels), dim)), 0.0
    ).astype(np.float32)
    query, train, validation, database = [], [], [], []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        query.extend(rows[:10])
        database.extend(rows[10:])
        train.extend(rows[10:40])
        validation.extend(rows[40:50])
    np.savez(
        path, features=features, labels=labels,
        query=np.array(query), train=np.array(train),
        validation=np.array(validation), database=np.array(database),
    )
    return path


def sphere_blobs(n_per=60, clusters=5, dim=32, spread=0.15, seed=0):
    """Gaussian blobs on the unit sphere, shuffled; returns (x, labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(clusters), n_per)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(len(labels))
    return x[order].astype(np.float32), labels[order]
