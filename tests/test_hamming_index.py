"""HammingIndex against a brute-force NumPy ranking, ties included."""

import os

import numpy as np
import pytest

import hamming_oracle
from uhga_tf import codes as codes_lib
from uhga_tf.retrieval import hamming_index
from uhga_tf.retrieval.hamming_index import HammingIndex

BACKENDS = ("faiss", "numpy")


def tied_codes(rng, n, code_length, n_centers=6, flips=2):
    """int8 codes near a few centers, so many distances tie."""
    centers = rng.integers(0, 2, (n_centers, code_length))
    bits = centers[rng.integers(0, n_centers, n)]
    for _ in range(flips):
        col = rng.integers(0, code_length, n)
        bits[np.arange(n), col] ^= rng.integers(0, 2, n)
    return (bits * 2 - 1).astype(np.int8)


def brute_force_top_k(query_codes, database_codes, ids, top_k):
    positions, distances = hamming_oracle.stable_top_k(
        query_codes, database_codes, top_k
    )
    return ids[positions], distances


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    out = {}
    for code_length in (16, 32, 64, 128):
        database = tied_codes(rng, 300, code_length)
        queries = np.concatenate([
            tied_codes(rng, 12, code_length),
            database[:3],  # exact duplicates: distance-0 ties
        ])
        # Ids deliberately not in insertion order: ties follow insertion.
        ids = rng.permutation(300).astype(np.int64) * 3 + 7
        out[code_length] = (database, queries, ids)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("code_length", [16, 32, 64, 128])
def test_search_equals_brute_force(data, code_length, backend):
    database, queries, ids = data[code_length]
    index = HammingIndex(code_length, backend=backend)
    index.add(database[:120], ids[:120])
    index.add(codes_lib.pack_codes(database[120:]), ids[120:])  # packed
    n_ties = 0
    for top_k in (1, 5, 37, 300, 1000):
        got_ids, got_dist = index.search(queries, top_k)
        want_ids, want_dist = brute_force_top_k(queries, database, ids, top_k)
        np.testing.assert_array_equal(got_dist, want_dist)
        np.testing.assert_array_equal(got_ids, want_ids)
        assert got_ids.dtype == np.int64 and got_dist.dtype == np.int32
        n_ties += int(np.sum(want_dist[:, 1:] == want_dist[:, :-1]))
    # The data must actually exercise the tie rule.
    assert n_ties > 100, n_ties
    # Packed queries give the same answer as int8 queries.
    np.testing.assert_array_equal(
        index.search(codes_lib.pack_codes(queries), 9)[0],
        index.search(queries, 9)[0],
    )


def test_search_beyond_faiss_block_and_threads():
    """70,000 16-bit codes span two faiss scan blocks (65,536)."""
    import faiss

    rng = np.random.default_rng(1)
    database = tied_codes(rng, 70_000, 16, n_centers=3, flips=3)
    queries = tied_codes(rng, 6, 16, n_centers=3, flips=3)
    ids = np.arange(70_000)
    want_ids, want_dist = brute_force_top_k(queries, database, ids, 500)
    # Hardest case: the boundary tie group straddles the block edge.
    dist = hamming_oracle.hamming_distance(queries, database)
    assert np.any(want_ids[:, -1] >= 65_536) or np.any(
        np.sum(dist <= want_dist[:, -1:], axis=1) > 500
    )
    index = HammingIndex(16)
    index.add(database, ids)
    threads = faiss.omp_get_max_threads()
    try:
        for n_threads in (1, 2):
            faiss.omp_set_num_threads(n_threads)
            got_ids, got_dist = index.search(queries, 500)
            np.testing.assert_array_equal(got_dist, want_dist)
            np.testing.assert_array_equal(got_ids, want_ids)
    finally:
        faiss.omp_set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("code_length", [16, 64])
def test_range_search_equals_brute_force(data, code_length, backend):
    database, queries, ids = data[code_length]
    index = HammingIndex(code_length, backend=backend)
    index.add(database, ids)
    dist = hamming_oracle.hamming_distance(queries, database)
    total = 0
    for hamming_radius in (0, 2, code_length // 4, code_length):
        results = index.range_search(queries, hamming_radius)
        assert len(results) == len(queries)
        for row, (got_ids, got_dist) in zip(dist, results):
            hits = np.flatnonzero(row <= hamming_radius)
            order = np.argsort(row[hits], kind="stable")
            np.testing.assert_array_equal(got_ids, ids[hits[order]])
            np.testing.assert_array_equal(got_dist, row[hits[order]])
            total += len(got_ids)
    # Radius code_length returns everything; radius 0 at least duplicates.
    assert total > len(queries) * len(database)


@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_then_search(data, backend):
    database, queries, ids = data[32]
    index = HammingIndex(32, backend=backend)
    labels = np.arange(300) % 4
    index.add(database, ids, metadata={"label": labels})
    index.search(queries, 3)  # builds the faiss index before removal
    removed = ids[::3]
    index.remove(removed)
    keep = ~np.isin(ids, removed)
    assert len(index) == int(keep.sum()) == 200
    got_ids, got_dist = index.search(queries, 50)
    want_ids, want_dist = brute_force_top_k(
        queries, database[keep], ids[keep], 50
    )
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_dist, want_dist)
    meta = index.get_metadata(got_ids[0])
    position = {int(i): p for p, i in enumerate(ids)}
    assert [m["label"] for m in meta] == [
        int(labels[position[int(i)]]) for i in got_ids[0]
    ]
    # Ids are 7 + 3 * i, so 8 was never added; nothing is removed then.
    with pytest.raises(ValueError, match=r"ids not in the index: \[8\]"):
        index.remove([int(ids[1]), 8])
    assert len(index) == 200
    with pytest.raises(ValueError, match="ids not in the index"):
        index.remove([10**9])
    with pytest.raises(ValueError, match="ids not in the index"):
        index.get_metadata([int(removed[0])])


def test_save_load_round_trip(tmp_path, data):
    database, queries, ids = data[64]
    index = HammingIndex(64, info={"class_names": ["a", "b"]})
    meta = [{"source": f"img_{i}.png", "label": int(i % 2)} for i in ids]
    index.add(database, ids, metadata=meta)
    directory = tmp_path / "index"
    index.save(directory)
    index.remove(ids[:10])
    index.save(directory)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["index"]  # no temp leftovers
    assert os.listdir(directory) == [hamming_index.FILE_NAME]
    loaded = HammingIndex.load(directory)
    assert loaded.code_length == 64 and len(loaded) == 290
    assert loaded.info == {"class_names": ["a", "b"]}
    np.testing.assert_array_equal(loaded.ids, ids[10:])
    np.testing.assert_array_equal(loaded.packed_codes, index.packed_codes)
    for a, b in zip(loaded.search(queries, 20), index.search(queries, 20)):
        np.testing.assert_array_equal(a, b)
    assert loaded.get_metadata([ids[42]]) == [meta[42]]
    numpy_index = HammingIndex.load(directory, backend="numpy")
    np.testing.assert_array_equal(
        numpy_index.search(queries, 20)[0], index.search(queries, 20)[0]
    )


def _saved(tmp_path, code_length=32):
    rng = np.random.default_rng(2)
    index = HammingIndex(code_length)
    index.add(tied_codes(rng, 40, code_length), np.arange(40),
              metadata={"label": np.arange(40) % 3})
    index.save(tmp_path / "index")
    return tmp_path / "index" / hamming_index.FILE_NAME


def test_load_refuses_bad_files(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    with pytest.raises(ValueError, match="expected code_length=64"):
        HammingIndex.load(path.parent, code_length=64)
    path.write_bytes(data[:-25])
    with pytest.raises(ValueError, match="is truncated"):
        HammingIndex.load(path.parent)
    path.write_bytes(data[:20])
    with pytest.raises(ValueError, match="is truncated"):
        HammingIndex.load(path.parent)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match="not a uhga_tf Hamming index file"):
        HammingIndex.load(path.parent)
    path.write_bytes(data[:8] + (2).to_bytes(4, "little") + data[12:])
    with pytest.raises(ValueError, match="format version 2"):
        HammingIndex.load(path.parent)
    path.write_bytes(data.replace(b"packbits-msb-first",
                                  b"packbits-lsb-first"))
    with pytest.raises(ValueError, match="bit_order='packbits-lsb-first'"):
        HammingIndex.load(path.parent)
    flipped = bytearray(data)
    flipped[-200] ^= 0xFF  # inside the packed codes
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        HammingIndex.load(path.parent)
    with pytest.raises(FileNotFoundError, match="no Hamming index file"):
        HammingIndex.load(tmp_path / "missing")


def test_errors(data):
    database, queries, ids = data[64]
    index = HammingIndex(64)
    index.add(database, ids)
    with pytest.raises(ValueError, match=r"code_length=64; received dtype "
                                         r"int8 shape \(12, 32\)"):
        index.add(tied_codes(np.random.default_rng(0), 12, 32),
                  np.arange(12) + 10_000)
    with pytest.raises(ValueError, match=r"packed_codes \[n, 8\]"):
        index.search(np.zeros((2, 4), np.uint8), 5)
    for top_k in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="top_k must be a positive"):
            index.search(queries, top_k)
    with pytest.raises(ValueError, match="hamming_radius must be"):
        index.range_search(queries, -1)
    with pytest.raises(ValueError, match="ids already in the index"):
        index.add(database[:2], ids[:2])
    with pytest.raises(ValueError, match="ids must be unique"):
        index.add(database[:2], [10_000, 10_000])
    with pytest.raises(ValueError, match="must hold only -1 and \\+1"):
        index.add(np.zeros((1, 64), np.int8), [10_000])
    with pytest.raises(ValueError, match="metadata\\['label'\\] must hold"):
        index.add(database[:2], [10_000, 10_001], metadata={"label": [1]})
    with pytest.raises(ValueError, match="code_length must be a multiple"):
        HammingIndex(12)
    with pytest.raises(ValueError, match="backend must be one of"):
        HammingIndex(64, backend="annoy")
    assert len(index) == 300  # failed adds changed nothing


def test_empty_index_and_small_top_k():
    index = HammingIndex(16)
    ids, dist = index.search(np.ones((3, 16), np.int8), 4)
    assert ids.shape == dist.shape == (3, 0)
    index.add(np.array([[1] * 16, [-1] * 16], np.int8), [5, 9])
    ids, dist = index.search(np.ones((1, 16), np.int8), 4)
    np.testing.assert_array_equal(ids, [[5, 9]])
    np.testing.assert_array_equal(dist, [[0, 16]])


def test_code_statistics_count_buckets_and_balance():
    codes = np.array([[1, 1, -1, -1], [1, 1, -1, -1], [1, 1, -1, -1],
                      [-1, 1, 1, -1], [1, -1, 1, 1]], np.int8)
    # Bit means 0.6, 0.6, -0.2, -0.6; three distinct codes; one of 3 items.
    assert codes_lib.code_statistics(codes) == pytest.approx({
        "bit_balance": 0.5, "distinct_codes_share": 0.6,
        "largest_bucket_share": 0.6})
    with pytest.raises(ValueError, match="at least one code"):
        codes_lib.code_statistics(np.zeros((0, 8), np.int8))
