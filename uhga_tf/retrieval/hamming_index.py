"""HammingIndex: exact top_k and radius search over packed binary codes.

Ranking rule (the same as `evaluation`): ascending Hamming distance, ties
broken by insertion order (the position of an item in the index, which
`remove` preserves). The default backend is faiss `IndexBinaryFlat` searched
with its counting path (`use_heap = False`): it scans the database in
position order and keeps, for every distance value, the first items it meets,
so it returns exactly the stable ranking. A cheap check on every result
confirms the order among returned ties and re-ranks any offending query
exactly through a radius search. `backend="numpy"` is a brute-force reference:
the distance kernel and stable ranking of `uhga_tf.evaluation.ranking`.

`kind="ivf"` (see `use_inverted_lists`) makes top_k search sublinear: only
the items of the `nprobe` lists nearest to a query are scanned
(`inverted_lists.InvertedLists`), with the same tie rule among them; it is
approximate, and `range_search` stays exact.

Packed codes use `np.packbits` order (`uhga_tf.codes.pack_codes`), which is
also the order the SavedModel emits and faiss reads.
"""

import json
import os
import struct
import zlib

import numpy as np
from absl import logging

from uhga_tf import codes as codes_lib
from uhga_tf import io_utils
from uhga_tf.evaluation import ranking
from uhga_tf.io_utils import to_builtin
from uhga_tf.retrieval import metadata_columns as columns_lib
from uhga_tf.retrieval.inverted_lists import InvertedLists

BIT_ORDER = "packbits-msb-first"
FILE_NAME = "hamming_index.bin"
FORMAT_VERSION = 1
_MAGIC = b"UHGAHIX\x00"
_PREAMBLE = struct.Struct("<8sII")  # magic, format version, header length
_BACKENDS = ("faiss", "numpy")
KINDS = ("flat", "ivf")
# Bytes of faiss counting-path scratch (n_query * (code_length + 1) * top_k
# int64 ids) allowed per query chunk.
_CHUNK_BYTES = 1 << 27


class HammingIndex:
    """Exact Hamming-distance index over `code_length`-bit codes.

    Items carry a unique non-negative int64 id and optional metadata columns
    (e.g. `source` path and `label`). Example:

    ```python
    index = HammingIndex(64)
    index.add(codes, ids=np.arange(len(codes)), metadata={"label": labels})
    ids, distances = index.search(query_codes, top_k=10)
    index.save("index/")
    index = HammingIndex.load("index/")
    ```

    Args:
        code_length: bits per code, a multiple of 8 in [8, 1024].
        backend: "faiss" (IndexBinaryFlat) or "numpy" (brute force).
        info: JSON-serializable dict stored with the index (e.g. the model
            path and class names).
    """

    def __init__(self, code_length, backend="faiss", info=None):
        self.code_length = codes_lib.check_code_length(code_length)
        if backend not in _BACKENDS:
            raise ValueError(
                f"backend must be one of {_BACKENDS}; received "
                f"backend={backend!r}"
            )
        self.backend = backend
        self.code_size = self.code_length // 8
        self.info = dict(info or {})
        self._packed_codes = np.zeros((0, self.code_size), np.uint8)
        self._ids = np.zeros((0,), np.int64)
        self._metadata = {}  # name -> columns_lib.MetadataColumn
        self._faiss_index = None
        self._numpy_kernel = None
        self._lists = None  # InvertedLists when kind == "ivf"
        self._id_order = None  # (argsort, sorted ids), for get_metadata

    @property
    def kind(self):
        """"flat" (exact scan) or "ivf" (inverted lists, approximate)."""
        return "flat" if self._lists is None else "ivf"

    @property
    def nprobe(self):
        return None if self._lists is None else self._lists.nprobe

    @nprobe.setter
    def nprobe(self, value):
        if self._lists is None:
            raise ValueError("nprobe applies to kind='ivf' only")
        from uhga_tf.retrieval import inverted_lists

        self._lists.nprobe = inverted_lists.check_nprobe(
            value, self._lists.nlist)

    def use_inverted_lists(self, nlist=None, nprobe=16, seed=0):
        """Switch top_k search to inverted lists trained on the codes now in
        the index (kind "ivf"); later adds are assigned to these lists.

        Args:
            nlist: number of lists; default `default_nlist(len(self))`.
            nprobe: lists scanned per query (recall against speed).
        """
        from uhga_tf.retrieval import inverted_lists

        if nlist is None:
            nlist = inverted_lists.default_nlist(len(self))
        self._lists = InvertedLists.train(
            self._codes(), self.code_length, nlist, min(nprobe, nlist), seed)
        # The lists hold the codes now: no second copy, no flat index.
        self._packed_codes = None
        self._faiss_index = None
        self._numpy_kernel = None

    def _codes(self):
        """uint8 [n, code_size] in insertion order (built for kind ivf)."""
        if self._lists is not None:
            return self._lists.codes_in_order()
        return self._packed_codes

    def __len__(self):
        return len(self._ids)

    @property
    def ids(self):
        """int64 [n]: item ids in insertion order."""
        return self._ids.copy()

    @property
    def packed_codes(self):
        """uint8 [n, code_length / 8]: codes in insertion order."""
        codes = self._codes()
        return codes if self._lists is not None else codes.copy()

    def packed_codes_at(self, positions):
        """uint8 [len(positions), code_length / 8]: codes at positions."""
        if self._lists is not None:
            return self._lists.codes_at(positions)
        return self._packed_codes[np.asarray(positions, np.int64)]

    @property
    def metadata_columns(self):
        return sorted(self._metadata)

    def add(self, codes, ids, metadata=None):
        """Append items after the existing ones.

        Args:
            codes: int8 [n, code_length] in {-1, +1}, or packed_codes uint8
                [n, code_length / 8].
            ids: int [n], unique, >= 0 and not already in the index.
            metadata: None, a dict of column -> sequence of length n, or a
                list of n per-item dicts. Values must be JSON-serializable
                (NumPy scalars and arrays are converted).
        """
        packed = self._as_packed(codes, "codes")
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.shape[0] != packed.shape[0]:
            raise ValueError(
                f"ids must have shape [{packed.shape[0]}] (one per code); "
                f"received shape {ids.shape}"
            )
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"ids must be integers; received dtype {ids.dtype}"
            )
        ids = ids.astype(np.int64)
        if ids.size and ids.min() < 0:
            raise ValueError(
                f"ids must be >= 0; received min id {int(ids.min())}"
            )
        unique, counts = np.unique(ids, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(
                "ids must be unique; received duplicates "
                f"{unique[counts > 1][:5].tolist()}"
            )
        present = ids[np.isin(ids, self._ids)]
        if present.size:
            raise ValueError(
                f"ids already in the index: {present[:5].tolist()}"
            )
        columns = _metadata_columns(metadata, len(ids))
        n_old = len(self._ids)
        for name in set(columns) - set(self._metadata):
            self._metadata[name] = columns_lib.MetadataColumn.of_nones(n_old)
        for name, column in self._metadata.items():
            column.extend(columns.get(name, [None] * len(ids)))
        if self._lists is None:
            self._packed_codes = np.concatenate([self._packed_codes, packed])
        self._ids = np.concatenate([self._ids, ids])
        if self._faiss_index is not None:
            self._faiss_index.add(packed)
        if self._lists is not None:
            self._lists.add(packed, start=n_old)
        self._numpy_kernel = None  # rebuilt lazily over every item
        self._id_order = None
        logging.debug("HammingIndex: added %d items (%d total)", len(ids),
                      len(self))

    def remove(self, ids):
        """Remove items by id; the others keep their relative order.

        Raises:
            ValueError: if any id is not in the index.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        unknown = ids[~np.isin(ids, self._ids)]
        if unknown.size:
            raise ValueError(
                f"ids not in the index: {unknown[:5].tolist()} "
                f"({unknown.size} unknown of {ids.size})"
            )
        keep = ~np.isin(self._ids, ids)
        positions = np.flatnonzero(keep)
        if self._lists is not None:
            self._lists.remove(keep)
        if self._lists is None:
            self._packed_codes = self._packed_codes[keep]
        self._ids = self._ids[keep]
        for column in self._metadata.values():
            column.keep(positions)
        self._faiss_index = None  # rebuilt lazily, in the new order
        self._numpy_kernel = None
        self._id_order = None

    def get_metadata(self, ids):
        """Return one dict of metadata per id (same order as `ids`)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._id_order is None:  # sorted once, not on every call
            order = np.argsort(self._ids)
            self._id_order = order, self._ids[order]
        order, sorted_ids = self._id_order
        where = np.searchsorted(sorted_ids, ids)
        found = where < len(sorted_ids)
        found[found] = sorted_ids[where[found]] == ids[found]
        if not np.all(found):
            raise ValueError(
                f"ids not in the index: {ids[~found][:5].tolist()}"
            )
        positions = order[where]
        columns = {name: column.values(name)
                   for name, column in self._metadata.items()}
        return [
            {name: values[p] for name, values in columns.items()}
            for p in positions
        ]

    def search(self, queries, top_k):
        """Return the top_k nearest items of every query.

        Args:
            queries: int8 codes [n_query, code_length] or uint8 packed_codes
                [n_query, code_length / 8].
            top_k: int > 0; results are truncated to the index size.

        Returns:
            (ids int64 [n_query, k], distances int32 [n_query, k]) with
            k = min(top_k, len(self)), sorted by (distance, insertion order).
            With kind "ivf" a row whose probed lists hold fewer than k
            items ends in id -1, distance code_length + 1.
        """
        if (
            isinstance(top_k, bool)
            or not isinstance(top_k, (int, np.integer))
            or top_k <= 0
        ):
            raise ValueError(
                f"top_k must be a positive integer; received top_k={top_k!r}"
            )
        queries = self._as_packed(queries, "queries")
        k = min(int(top_k), len(self))
        if k == 0 or len(queries) == 0:
            shape = (len(queries), k)
            return np.zeros(shape, np.int64), np.zeros(shape, np.int32)
        if self._lists is not None:
            positions, distances = self._lists.search(queries, k)
            ids = np.where(positions >= 0, self._ids[positions], -1)
            return ids, distances
        if self.backend == "numpy":
            positions, distances = self._numpy_search(queries, k)
        else:
            positions, distances = self._faiss_search(queries, k)
        return self._ids[positions], distances

    def range_search(self, queries, hamming_radius):
        """Return every item within `hamming_radius` (inclusive) per query.

        Returns:
            list of n_query (ids int64 [m], distances int32 [m]) pairs,
            each sorted by (distance, insertion order).
        """
        if (
            isinstance(hamming_radius, bool)
            or not isinstance(hamming_radius, (int, np.integer))
            or hamming_radius < 0
        ):
            raise ValueError(
                "hamming_radius must be an integer >= 0; received "
                f"hamming_radius={hamming_radius!r}"
            )
        queries = self._as_packed(queries, "queries")
        hamming_radius = min(int(hamming_radius), self.code_length)
        if len(self) == 0:
            empty = (np.zeros(0, np.int64), np.zeros(0, np.int32))
            return [empty for _ in range(len(queries))]
        if self.backend == "numpy":
            results = self._numpy_range(queries, hamming_radius)
        else:
            results = self._faiss_range(queries, hamming_radius)
        return [(self._ids[p], d) for p, d in results]

    def save(self, directory):
        """Write the index to `directory`/hamming_index.bin atomically.

        The file is written in a temporary directory next to `directory`
        and moved into place with `os.replace`, so readers see either the
        old or the new index, never a partial one.
        """
        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(
                f"index directory {directory} is a file; expected a folder "
                "or a path that does not exist yet"
            )
        with (io_utils.atomic_directory(directory, merge=True) as tmp_dir,
              open(os.path.join(tmp_dir, FILE_NAME), "wb") as f):
            f.write(self._serialize())
            f.flush()
            os.fsync(f.fileno())
        logging.info("Saved HammingIndex of %d items (%d bits) to %s",
                     len(self), self.code_length, directory)

    @classmethod
    def load(cls, directory, backend="faiss", code_length=None):
        """Read an index written by `save`.

        Args:
            code_length: if given, the stored code_length must equal it.

        Raises:
            FileNotFoundError: if the index file is missing.
            ValueError: for a foreign, truncated, corrupt or mismatched file.
        """
        path = os.path.join(os.fspath(directory), FILE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no Hamming index file at {path}")
        with open(path, "rb") as f:
            data = f.read()
        header, payload = _parse(data, path)
        if code_length is not None and header["code_length"] != code_length:
            raise ValueError(
                f"{path} holds code_length={header['code_length']}; "
                f"expected code_length={code_length}"
            )
        index = cls(header["code_length"], backend=backend,
                    info=header["info"])
        n, code_size = header["count"], index.code_size
        codes_end = n * code_size
        ids_end = codes_end + 8 * n
        index._packed_codes = (
            np.frombuffer(payload[:codes_end], np.uint8)
            .reshape(n, code_size)
            .copy()
        )
        index._ids = np.frombuffer(payload[codes_end:ids_end], "<i8").astype(
            np.int64
        )
        meta_end = ids_end + header["metadata_bytes"]
        index._metadata = columns_lib.decode_columns(
            payload[ids_end:meta_end], header.get("metadata_columns"), n,
            path)
        if header.get("kind", "flat") == "ivf":
            index._lists = InvertedLists.from_bytes(
                payload[meta_end:], header["nlist"], code_size,
                index._packed_codes, header["nprobe"])
            index._packed_codes = None
        logging.info("Loaded HammingIndex of %d items (%d bits) from %s",
                     n, index.code_length, path)
        return index

    # -- internals -------------------------------------------------------

    def _as_packed(self, codes, name):
        array = np.asarray(codes)
        if array.ndim == 1:
            raise ValueError(
                f"{name} must be 2-D [n, code_length] or [n, code_size]; "
                f"received shape {array.shape} (use a [1, ...] batch)"
            )
        if array.ndim == 2 and array.dtype == np.uint8:
            if array.shape[1] == self.code_size:
                return np.ascontiguousarray(array)
        elif array.ndim == 2 and array.shape[1] == self.code_length:
            return codes_lib.pack_codes(codes_lib.validate_codes(array, name))
        raise ValueError(
            f"{name} must be int8 codes [n, {self.code_length}] or uint8 "
            f"packed_codes [n, {self.code_size}] for code_length="
            f"{self.code_length}; received dtype {array.dtype} shape "
            f"{array.shape}"
        )

    def _faiss(self):
        if self._faiss_index is None:
            import faiss

            index = faiss.IndexBinaryFlat(self.code_length)
            # The counting path (hammings_knn_mc) keeps, per distance, the
            # first items in scan order: exactly the stable tie rule.
            index.use_heap = False
            index.add(self._codes())
            self._faiss_index = index
        return self._faiss_index

    def _faiss_search(self, queries, k):
        index = self._faiss()
        per_query = (self.code_length + 1) * k * 8
        chunk = max(1, _CHUNK_BYTES // per_query)
        all_positions, all_distances = [], []
        for start in range(0, len(queries), chunk):
            distances, positions = index.search(queries[start:start + chunk],
                                                k)
            all_positions.append(positions)
            all_distances.append(distances)
        positions = np.concatenate(all_positions)
        distances = np.concatenate(all_distances).astype(np.int32)
        # Guard: a tie group out of position order means faiss did not
        # follow the scan-order rule; re-rank those queries exactly.
        bad = np.any(
            (distances[:, 1:] == distances[:, :-1])
            & (positions[:, 1:] < positions[:, :-1]),
            axis=1,
        ) | np.any(positions < 0, axis=1)
        for row in np.flatnonzero(bad):
            logging.warning("faiss tie order violated; re-ranking query %d",
                            row)
            radius = int(distances[row, -1])
            (p, d), = self._faiss_range(queries[row:row + 1], radius)
            positions[row], distances[row] = p[:k], d[:k]
        return positions.astype(np.int64), distances

    def _faiss_range(self, queries, hamming_radius):
        # faiss keeps distances strictly below the radius it is given.
        lims, distances, positions = self._faiss().range_search(
            queries, hamming_radius + 1
        )
        lims = lims.astype(np.int64)
        distances = distances.astype(np.int32)
        query_of = np.repeat(np.arange(len(queries)), np.diff(lims))
        order = np.lexsort((positions, distances, query_of))
        positions, distances = positions[order].astype(np.int64), distances[
            order
        ]
        return [
            (positions[lims[i]:lims[i + 1]], distances[lims[i]:lims[i + 1]])
            for i in range(len(queries))
        ]

    def _kernel(self):
        if self._numpy_kernel is None:
            self._numpy_kernel = codes_lib.DistanceKernel.from_packed(
                self._codes(), self.code_length
            )
        return self._numpy_kernel

    def _numpy_search(self, queries, k):
        return ranking.rank_in_batches(
            self._kernel().packed, queries, len(self), k
        )

    def _numpy_range(self, queries, hamming_radius):
        kernel = self._kernel()
        batch = ranking.query_batch_size(len(self))
        results = []
        for start in range(0, len(queries), batch):
            for row in kernel.packed(queries[start:start + batch]):
                hits = np.flatnonzero(row <= hamming_radius)
                order = hits[ranking.stable_order(row[None, hits])[0]]
                results.append((order, row[order].astype(np.int32)))
        return results

    def _serialize(self):
        metadata, layout = columns_lib.encode_columns(self._metadata)
        lists = b"" if self._lists is None else self._lists.to_bytes()
        payload = b"".join([
            self._codes().tobytes(),
            self._ids.astype("<i8").tobytes(),
            metadata,
            lists,
        ])
        search = {"kind": self.kind}
        if self._lists is not None:
            search.update(nlist=self._lists.nlist, nprobe=self._lists.nprobe,
                          lists_bytes=len(lists))
        header = json.dumps({
            **search,
            "format": "uhga_tf.HammingIndex",
            "code_length": self.code_length,
            "bit_order": BIT_ORDER,
            "count": len(self),
            "metadata_bytes": len(metadata),
            "metadata_columns": layout,
            "payload_bytes": len(payload),
            "payload_crc32": zlib.crc32(payload),
            "info": self.info,
        }).encode("utf-8")
        return (
            _PREAMBLE.pack(_MAGIC, FORMAT_VERSION, len(header))
            + header
            + payload
        )


_FIELD_TYPES = (("code_length", int), ("count", int), ("metadata_bytes", int),
                ("payload_bytes", int), ("payload_crc32", int),
                ("info", dict))


def _check_header_fields(header, path):
    """One line naming the file for a header that is not an object, lacks a
    field or holds one of the wrong type (never a TypeError later)."""
    if not isinstance(header, dict):
        raise ValueError(
            f"corrupt index header ({path}): expected a JSON object"
        )
    fields = ("code_length", "count", "metadata_bytes", "payload_bytes",
              "payload_crc32", "info")
    missing = [f for f in fields if f not in header]
    if missing:
        raise ValueError(
            f"corrupt index header ({path}): no {', '.join(missing)}; "
            f"expected the fields {', '.join(fields)}"
        )
    wrong = [
        f"{name}={header[name]!r}" for name, kind in _FIELD_TYPES
        if not isinstance(header[name], kind)
        or isinstance(header[name], bool)
        or (kind is int and header[name] < 0)
    ]
    if wrong:
        raise ValueError(
            f"corrupt index header ({path}): {', '.join(wrong)}; expected "
            "non-negative integers and an object for info"
        )


def _parse(data, path):
    """Validate a serialized index; return (header dict, payload bytes)."""
    if len(data) < _PREAMBLE.size or data[:len(_MAGIC)] != _MAGIC:
        raise ValueError(
            f"{path} is not a uhga_tf Hamming index file (bad magic "
            f"{data[:len(_MAGIC)]!r}; expected {_MAGIC!r})"
        )
    _, version, header_len = _PREAMBLE.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has index format version {version}; this uhga_tf "
            f"reads version {FORMAT_VERSION}"
        )
    body = data[_PREAMBLE.size:]
    if len(body) < header_len:
        raise ValueError(
            f"{path} is truncated: header needs {header_len} bytes, file "
            f"has {len(body)}"
        )
    try:
        header = json.loads(body[:header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} has a corrupt header: {e}") from e
    _check_header_fields(header, path)
    if header.get("bit_order") != BIT_ORDER:
        raise ValueError(
            f"{path} has bit_order={header.get('bit_order')!r}; expected "
            f"{BIT_ORDER!r}"
        )
    codes_lib.check_code_length(header.get("code_length"))
    payload = body[header_len:]
    n = header["count"]
    kind = header.get("kind", "flat")  # files before kinds are flat
    if kind not in KINDS:
        raise ValueError(
            f"{path} has kind={kind!r}; expected one of {KINDS}"
        )
    lists_bytes = 0
    if kind == "ivf":
        # As for the fields above: a corrupt value is one line, not a
        # TypeError from the arithmetic below.
        bad = [
            f"{name}={header.get(name)!r}" for name in ("nlist", "nprobe")
            if not isinstance(header.get(name), int)
            or isinstance(header.get(name), bool) or header.get(name) < 1
        ]
        if bad:
            raise ValueError(
                f"corrupt index header ({path}): {', '.join(bad)}; "
                "expected positive integers for kind='ivf'"
            )
        lists_bytes = InvertedLists.nbytes_for(
            header.get("nlist", 0), header["code_length"] // 8, n)
    expected = (
        n * header["code_length"] // 8 + 8 * n + header["metadata_bytes"]
        + lists_bytes
    )
    if expected != header["payload_bytes"] or len(payload) < expected:
        raise ValueError(
            f"{path} is truncated: expected {expected} payload bytes, found "
            f"{len(payload)}"
        )
    if len(payload) > expected:
        raise ValueError(
            f"{path} is corrupt: {len(payload) - expected} trailing bytes"
        )
    if zlib.crc32(payload) != header["payload_crc32"]:
        raise ValueError(f"{path} is corrupt: payload checksum mismatch")
    return header, payload


def _metadata_columns(metadata, n):
    """Normalize metadata to {column: list of n JSON-ready values}."""
    if metadata is None:
        return {}
    if isinstance(metadata, dict):
        columns = {}
        for name, values in metadata.items():
            values = _to_json(values)
            if not isinstance(values, list) or len(values) != n:
                raise ValueError(
                    f"metadata[{name!r}] must hold one value per code ({n}); "
                    f"received {type(values).__name__} of length "
                    f"{len(values) if isinstance(values, list) else 'n/a'}"
                )
            columns[str(name)] = values
        return columns
    items = list(metadata)
    if len(items) != n or not all(isinstance(m, dict) for m in items):
        raise ValueError(
            f"metadata must be a dict of columns or a list of {n} dicts; "
            f"received {type(metadata).__name__} of length {len(items)}"
        )
    names = sorted({k for m in items for k in m})
    return {
        str(k): [_to_json(m.get(k)) for m in items] for k in names
    }


def _to_json(value):
    """Metadata value as JSON-ready builtins (lists stay lists)."""
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    try:
        return to_builtin(value)
    except TypeError:
        return value
