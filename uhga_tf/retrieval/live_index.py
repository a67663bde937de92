"""LiveIndex: a `HammingIndex` that follows its file on disk.

A background thread polls the index file (inode, size, mtime: every update
replaces the file by rename, so a change of any of them is a new index) and
loads a changed file off the request path. Readers take one `Snapshot` per
request with `current()`: a query that started on the old index finishes on
it, later ones see the new index, and none waits for a load or fails. A file
that does not load (a foreign or damaged one) is logged and skipped; the
last good index keeps serving. The same idea as the model server's version
polling (`serving.model_manager`).
"""

import dataclasses
import os
import threading

import numpy as np
from absl import logging

from uhga_tf.retrieval import hamming_index
from uhga_tf.retrieval.hamming_index import HammingIndex


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One loaded version of the index.

    Attributes:
        index: the `HammingIndex`.
        signature: (inode, size, mtime_ns) of the file it was read from.
        sorted_ids: int64 [n] ids in ascending order.
        order: int64 [n] positions of sorted_ids in the index.
    """

    index: HammingIndex
    signature: tuple
    sorted_ids: np.ndarray
    order: np.ndarray

    def position(self, item_id):
        """Position of `item_id` in the index, or None."""
        where = int(np.searchsorted(self.sorted_ids, item_id))
        if where < len(self.sorted_ids) and self.sorted_ids[where] == item_id:
            return int(self.order[where])
        return None


def _signature(path):
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class LiveIndex:
    """Hold the newest loadable index of `index_dir`.

    Args:
        index_dir: directory written by `HammingIndex.save`.
        poll_s: seconds between checks of the file; 0 never reloads.
    """

    def __init__(self, index_dir, poll_s=1.0):
        if poll_s < 0:
            raise ValueError(f"poll_s must be >= 0; received poll_s={poll_s}")
        self.index_dir = os.fspath(index_dir)
        self._path = os.path.join(self.index_dir, hamming_index.FILE_NAME)
        self._poll_s = poll_s
        self._snapshot = self._load(_signature(self._path))
        self._stop = threading.Event()
        self._thread = None
        self._bad_signature = None
        self.reloads = 0

    def current(self):
        """The newest loaded `Snapshot` (one attribute read: thread-safe)."""
        return self._snapshot

    def _load(self, signature):
        index = HammingIndex.load(self.index_dir)
        ids = index.ids
        order = np.argsort(ids, kind="stable")
        if len(index):
            # Build the search structures and the id order here, not in
            # the first request after a reload.
            index.search(index.packed_codes_at([0]), 1)
            index.get_metadata(ids[:1])
        return Snapshot(index, signature, ids[order], order)

    def check(self):
        """Reload if the file changed; return True when a new one is live."""
        try:
            signature = _signature(self._path)
        except FileNotFoundError:
            return False  # between a remove and a rename: keep serving
        if signature in (self._snapshot.signature, self._bad_signature):
            return False
        try:
            snapshot = self._load(signature)
        except (OSError, ValueError) as e:
            self._bad_signature = signature  # warn once per bad file
            logging.warning("Index %s changed but does not load (%s); "
                            "serving the previous one", self._path, e)
            return False
        self._snapshot = snapshot
        self.reloads += 1
        logging.info("Index %s reloaded: %d items", self._path,
                     len(snapshot.index))
        return True

    def start(self):
        """Poll in a daemon thread until `stop`."""
        if self._poll_s == 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._poll, name="uhga-live-index", daemon=True
        )
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(self._poll_s):
            self.check()

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
