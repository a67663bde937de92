"""The worked example of protocol.md §4: one query, six database codes."""

import numpy as np

# Query (+1,+1,+1,+1) of class A; distances 2, 1, 0, 1, 2, 3.
DATABASE = np.array(
    [
        [-1, -1, 1, 1],
        [-1, 1, 1, 1],
        [1, 1, 1, 1],
        [1, 1, 1, -1],
        [1, -1, -1, 1],
        [-1, -1, -1, 1],
    ],
    dtype=np.int8,
)
DATABASE_LABELS = np.array([0, 1, 0, 0, 1, 0])  # A = 0, B = 1, C = 2
QUERY = np.ones((1, 4), dtype=np.int8)
QUERY_LABELS = np.array([0])
