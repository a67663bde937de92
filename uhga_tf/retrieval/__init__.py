"""Hamming search: a persisted packed-code index and the image pipeline.

TensorFlow is imported lazily, so `HammingIndex` stays light.
"""

from uhga_tf.retrieval.hamming_index import HammingIndex
from uhga_tf.retrieval.index_updates import (
    SearchKind,
    add_codes,
    add_items,
    remove_items,
)
from uhga_tf.retrieval.pipeline import (
    QueryResult,
    SavedModelEncoder,
    build_index,
    build_index_from_codes,
    find_images,
    search_images,
    write_result_grid,
)

__all__ = [
    "HammingIndex",
    "QueryResult",
    "SavedModelEncoder",
    "SearchKind",
    "add_codes",
    "add_items",
    "build_index",
    "build_index_from_codes",
    "find_images",
    "remove_items",
    "search_images",
    "write_result_grid",
]
