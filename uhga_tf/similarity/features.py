"""Feature rows as every similarity matrix reads them: checked, unit."""

import numpy as np


def check_features(features, name="features", *, min_rows=1,
                   nonzero_rows=False, num_dims=None, dtype=np.float32):
    """Return `features` as a checked 2-D array (cast to `dtype` unless None).

    Raises:
        ValueError: not 2-D, fewer than `min_rows` rows, no columns, a
            column count other than `num_dims`, a row with NaN or inf, or
            (with `nonzero_rows`, which cosine distance needs) an all-zero
            row; the message names the first bad row.
    """
    features = np.asarray(features, dtype=dtype)
    if (features.ndim != 2 or features.shape[0] < min_rows
            or features.shape[1] < 1):
        raise ValueError(
            f"{name} must be a 2-D array [N >= {min_rows}, D >= 1]; "
            f"received shape {features.shape}"
        )
    if num_dims is not None and features.shape[1] != num_dims:
        raise ValueError(
            f"{name} must have D={num_dims} columns (as at fit); received "
            f"shape {features.shape}"
        )
    bad = ~np.all(np.isfinite(features), axis=1)
    if bad.any():
        raise ValueError(
            f"{name} must be finite: {int(bad.sum())} rows with NaN or inf "
            f"(first: row {int(np.argmax(bad))})"
        )
    if nonzero_rows:
        zero = ~np.any(features != 0, axis=1)
        if zero.any():
            raise ValueError(
                f"{name} has {int(zero.sum())} all-zero rows (first: row "
                f"{int(np.argmax(zero))}); cosine distance needs non-zero rows"
            )
    return features


def unit_rows(features, dtype=np.float32):
    """L2-normalised rows in `dtype` (a zero row stays zero)."""
    features = np.asarray(features, dtype=dtype)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)
