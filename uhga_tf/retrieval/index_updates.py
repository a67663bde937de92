"""Update a persisted `HammingIndex` in place: add and remove items.

Every update is load -> change -> `HammingIndex.save`, whose single file is
written beside the old one and renamed over it: a crash at any step leaves
the previous index readable, and a live reader (the search page) sees the
old or the new index, never a mix. Writers take an exclusive lock on
`<index>/.update.lock`, so two concurrent updates cannot lose each other's
items.
"""

import contextlib
import dataclasses
import fcntl
import os

import numpy as np

from uhga_tf.retrieval.hamming_index import HammingIndex
from uhga_tf.retrieval import inverted_lists

KIND_CHOICES = ("flat", "ivf", "auto")
LOCK_FILE = ".update.lock"


@dataclasses.dataclass(frozen=True)
class SearchKind:
    """How an index searches.

    Attributes:
        kind: "flat" (exact scan), "ivf" (inverted lists, approximate) or
            "auto" (ivf from `inverted_lists.AUTO_MIN_ITEMS` items up).
        nlist: ivf lists; None picks `inverted_lists.default_nlist`.
        nprobe: ivf lists scanned per query.
    """

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int = inverted_lists.DEFAULT_NPROBE

    def __post_init__(self):
        if self.kind not in KIND_CHOICES:
            raise ValueError(
                f"kind must be one of {KIND_CHOICES}; received "
                f"kind={self.kind!r}"
            )
        if self.nprobe < 1 or (self.nlist is not None and self.nlist < 1):
            raise ValueError(
                "nlist and nprobe must be >= 1; received "
                f"nlist={self.nlist}, nprobe={self.nprobe}"
            )

    def apply(self, index):
        """Give `index` this search kind (trains the lists for ivf)."""
        kind = self.kind
        if kind == "auto":
            big = len(index) >= inverted_lists.AUTO_MIN_ITEMS
            kind = "ivf" if big else "flat"
        if kind == "ivf":
            index.use_inverted_lists(self.nlist, self.nprobe)
        return index


@contextlib.contextmanager
def locked(index_dir):
    """Hold the index's writer lock (blocks while another update runs)."""
    index_dir = os.fspath(index_dir)
    if not os.path.isdir(index_dir):
        raise FileNotFoundError(f"no index directory {index_dir}")
    with open(os.path.join(index_dir, LOCK_FILE), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _map_labels(labels, from_names, to_names):
    """Int labels over `from_names` -> the same classes in `to_names`.

    A class the index does not know becomes None, and so do all labels
    when either side has no class names: a label is an index into the
    class names, so it only means something with the same names.
    """
    if not from_names or not to_names:
        return [None] * len(labels)
    lookup = {name: to_names.index(name) for name in from_names
              if name in to_names}

    def one(label):
        if label is None:
            return None
        if isinstance(label, list):
            return [lookup[from_names[i]] for i in label
                    if from_names[i] in lookup]
        return lookup.get(from_names[label])

    return [one(label) for label in labels]


def add_items(index_dir, packed_codes, metadata, class_names=None):
    """Append codes with fresh ids after the largest id in the index.

    Args:
        metadata: columns or per-item dicts, as `HammingIndex.add`; a
            "label" column holds indices into `class_names` and is mapped
            to the index's own class names.

    Returns:
        int64 [n]: the new ids, in the order of `packed_codes`.
    """
    with locked(index_dir):
        index = HammingIndex.load(index_dir)
        if isinstance(metadata, dict) and "label" in metadata:
            metadata = dict(metadata, label=_map_labels(
                metadata["label"], class_names,
                index.info.get("class_names")))
        start = int(index.ids.max()) + 1 if len(index) else 0
        ids = np.arange(start, start + len(packed_codes), dtype=np.int64)
        index.add(packed_codes, ids, metadata=metadata)
        index.save(index_dir)
    return ids


def add_codes(index_dir, codes_dir):
    """`add_items` of the shards `encode_collection` wrote."""
    from uhga_tf.retrieval import code_shards

    packed, _, metadata, manifest = code_shards.read_code_shards(codes_dir)
    return add_items(index_dir, packed, metadata,
                     manifest.get("class_names"))


def remove_items(index_dir, ids):
    """Remove items by id; the others keep their order.

    Raises:
        ValueError: if an id is not in the index (nothing is changed).
    """
    with locked(index_dir):
        index = HammingIndex.load(index_dir)
        index.remove(ids)
        index.save(index_dir)
    return len(index)
