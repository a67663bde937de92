"""InvertedLists: the sublinear search structure of a `HammingIndex`.

An inverted file over packed codes: `nlist` binary centroids (faiss binary
k-means on a seeded sample), and each list's codes stored contiguously with
their int32 index positions, ascending within a list. A query is compared
with the centroids, then only with the codes of its `nprobe` nearest lists;
results keep the index's tie rule (distance, then position) among the items
scanned.

Memory: the lists hold the index's only copy of the codes (the index keeps
no insertion-order array beside them) plus 4 bytes of position per item:
1.5x the code bytes of 64-bit codes. faiss `IndexBinaryIVF` stores int64
ids (2x), and reading codes through positions from an insertion-order array
instead was 20 ms a query at 10M codes (random gathers).
"""

import numpy as np

from uhga_tf import codes as codes_lib

DEFAULT_NPROBE = 16
# `index build --kind=auto` switches to inverted lists from this many items.
# benchmarks/scale.py (clustered 64-bit codes, default nlist): at 1M and 3M
# codes even 32 probes stay under recall@100 0.95 (0.91, 0.93); at 10M,
# 8 probes give 0.95 at 45x the queries/s of exact search.
AUTO_MIN_ITEMS = 10_000_000
# Codes per centroid used to train the centroids (faiss' own guidance is
# 39-256 training points per centroid).
_TRAIN_PER_LIST = 64


def default_nlist(n):
    """About sqrt(n) / 4 lists, a power of two in [16, 4096].

    Fewer lists than faiss' usual 4 sqrt(n): assigning every code costs
    n * nlist distances (10M codes x 1024 lists took ~2 minutes on our 2
    cores), and clustered codes reach recall 0.95 with few probes anyway.
    """
    target = np.sqrt(max(n, 1)) / 4
    return int(2 ** np.clip(np.round(np.log2(target)), 4, 12))


class InvertedLists:
    """Centroids and per-list positions over an external packed code array.

    Args:
        centroids: uint8 [nlist, code_size] packed centroid codes.
        offsets: int64 [nlist + 1]; list l holds slots offsets[l] to
            offsets[l + 1] - 1.
        positions: int32 [n] item position of each slot, ascending within a
            list.
        codes: uint8 [n, code_size] packed code of each slot.
        nprobe: lists scanned per query.
    """

    def __init__(self, centroids, offsets, positions, codes, nprobe):
        self.centroids = np.ascontiguousarray(centroids, np.uint8)
        self.offsets = np.asarray(offsets, np.int64)
        self.positions = np.asarray(positions, np.int32)
        self.codes = np.ascontiguousarray(codes, np.uint8)
        self.nprobe = check_nprobe(nprobe, len(self.centroids))

    @property
    def nlist(self):
        return len(self.centroids)

    @property
    def nbytes(self):
        return (self.centroids.nbytes + self.offsets.nbytes
                + self.positions.nbytes + self.codes.nbytes)

    @classmethod
    def train(cls, packed_codes, code_length, nlist, nprobe, seed=0):
        """Train centroids on a seeded sample and assign every code."""
        import faiss

        n = len(packed_codes)
        if not 1 <= nlist <= n:
            raise ValueError(
                f"nlist must be in [1, {n}] (the number of codes); received "
                f"nlist={nlist}"
            )
        rng = np.random.default_rng(seed)
        sample_size = min(n, nlist * _TRAIN_PER_LIST)
        sample = packed_codes[np.sort(rng.choice(n, sample_size,
                                                 replace=False))]
        quantizer = faiss.IndexBinaryFlat(code_length)
        ivf = faiss.IndexBinaryIVF(quantizer, code_length, nlist)
        ivf.cp.seed = int(seed)
        ivf.cp.min_points_per_centroid = 1
        ivf.train(np.ascontiguousarray(sample))
        centroids = faiss.vector_to_array(quantizer.xb).reshape(
            nlist, code_length // 8
        )
        lists = cls(centroids, np.zeros(nlist + 1, np.int64),
                    np.zeros(0, np.int32),
                    np.zeros((0, code_length // 8), np.uint8), nprobe)
        lists.add(packed_codes, start=0)
        return lists

    def codes_in_order(self):
        """uint8 [n, code_size]: the codes in index position order."""
        out = np.empty_like(self.codes)
        out[self.positions] = self.codes
        return out

    def codes_at(self, positions):
        """Codes of a few positions (a scan per position)."""
        slots = [int(np.flatnonzero(self.positions == p)[0])
                 for p in np.asarray(positions).reshape(-1)]
        return self.codes[slots]

    def assign(self, packed_codes, k=1):
        """int64 [n, k]: the k nearest lists of each code, nearest first
        (ties by list number).

        NumPy popcount in row chunks rather than a faiss search: exact, a
        fixed tie rule, and no OpenMP threads that stall when the cores are
        shared (a 10k x 256 faiss search took 11 s on our loaded machine).
        """
        packed_codes = np.asarray(packed_codes, np.uint8)
        out = np.empty((len(packed_codes), k), np.int64)
        rows = max(1, (1 << 23) // max(self.nlist, 1))
        for start in range(0, len(packed_codes), rows):
            d = codes_lib.packed_hamming_distance(
                packed_codes[start:start + rows], self.centroids)
            if k == 1:
                out[start:start + rows, 0] = np.argmin(d, axis=1)
                continue
            near = np.argpartition(d, k - 1, axis=1)[:, :k]
            near_d = np.take_along_axis(d, near, axis=1)
            order = np.lexsort((near, near_d), axis=1)
            out[start:start + rows] = np.take_along_axis(near, order, axis=1)
        return out

    def _list_of_items(self):
        return np.repeat(np.arange(self.nlist), np.diff(self.offsets))

    def _regroup(self, lists, positions, codes, presorted=False):
        """Store positions grouped by list, ascending within each list.

        Callers pass positions whose order within each list is already
        ascending (old items first, then new ones with larger positions),
        so a stable sort by list is enough: timsort merges the sorted old
        run with the new tail in about linear time.
        """
        order = slice(None) if presorted else np.argsort(lists, kind="stable")
        counts = np.bincount(lists, minlength=self.nlist)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.positions = positions[order].astype(np.int32)
        self.codes = np.ascontiguousarray(codes[order])

    def add(self, packed_codes, start):
        """Append codes that take positions start, start + 1, ..."""
        new_lists = self.assign(packed_codes)[:, 0]
        new_positions = np.arange(start, start + len(packed_codes))
        self._regroup(
            np.concatenate([self._list_of_items(), new_lists]),
            np.concatenate([self.positions, new_positions]),
            np.concatenate([self.codes, packed_codes]),
        )

    def remove(self, keep):
        """Drop positions where `keep` (bool [n]) is False; renumber."""
        new_position = np.cumsum(keep) - 1
        lists = self._list_of_items()
        kept = keep[self.positions]
        # Renumbering keeps the order, so the lists stay grouped.
        self._regroup(lists[kept], new_position[self.positions[kept]],
                      self.codes[kept], presorted=True)

    def search(self, queries, k):
        """(positions int64 [n_query, k], distances int32 [n_query, k]).

        Rows with fewer than k items in their probed lists are padded with
        position -1 and distance code_length + 1.
        """
        probes = self.assign(queries, self.nprobe)
        out_positions = np.full((len(queries), k), -1, np.int64)
        out_distances = np.full((len(queries), k),
                                self.centroids.shape[1] * 8 + 1, np.int32)
        for row, (query, lists) in enumerate(zip(queries, probes)):
            spans = [slice(self.offsets[j], self.offsets[j + 1])
                     for j in lists]
            candidates = np.concatenate([self.positions[s] for s in spans])
            if not len(candidates):
                continue
            distances = codes_lib.packed_hamming_distance(
                query[None], np.concatenate([self.codes[s] for s in spans])
            )[0]
            m = min(k, len(candidates))
            kth = np.partition(distances, m - 1)[m - 1]
            near = np.flatnonzero(distances <= kth)
            order = near[np.lexsort((candidates[near], distances[near]))][:m]
            out_positions[row, :m] = candidates[order]
            out_distances[row, :m] = distances[order]
        return out_positions, out_distances

    def to_bytes(self):
        """Centroids, offsets, positions (the codes are saved in order)."""
        return b"".join([
            self.centroids.tobytes(),
            self.offsets.astype("<i8").tobytes(),
            self.positions.astype("<i4").tobytes(),
        ])

    @classmethod
    def from_bytes(cls, data, nlist, code_size, codes_in_order, nprobe):
        n = len(codes_in_order)
        c_end = nlist * code_size
        o_end = c_end + 8 * (nlist + 1)
        if len(data) != o_end + 4 * n:
            raise ValueError(
                f"inverted lists hold {len(data)} bytes; expected "
                f"{o_end + 4 * n} for nlist={nlist}, n={n}"
            )
        centroids = np.frombuffer(data[:c_end], np.uint8).reshape(
            nlist, code_size)
        offsets = np.frombuffer(data[c_end:o_end], "<i8")
        positions = np.frombuffer(data[o_end:], "<i4")
        if offsets[-1] != n:
            raise ValueError(
                f"inverted lists cover {offsets[-1]} items; expected {n}"
            )
        if n and (positions.min() < 0 or positions.max() >= n):
            raise ValueError(f"inverted lists hold positions outside [0, {n})")
        return cls(centroids.copy(), offsets.astype(np.int64),
                   positions.astype(np.int32), codes_in_order[positions],
                   nprobe)

    @staticmethod
    def nbytes_for(nlist, code_size, n):
        return nlist * code_size + 8 * (nlist + 1) + 4 * n


def check_nprobe(nprobe, nlist):
    if isinstance(nprobe, bool) or not 1 <= int(nprobe) <= nlist:
        raise ValueError(
            f"nprobe must be in [1, nlist={nlist}]; received nprobe={nprobe}"
        )
    return int(nprobe)
