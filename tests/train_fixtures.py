"""Synthetic clustered features for end-to-end training tests (no images)."""

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
