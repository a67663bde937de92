"""HammingIndex kind "ivf" against exact flat search on clustered codes.

2,000 64-bit codes around 20 random centre codes with 6% of bits flipped;
queries are fresh noisy copies of the centres. With every list probed the
ivf kind must equal exact search exactly (ids and distances, ties by
position); with 2 of 16 lists it must keep recall@10 >= 0.95 while
scanning under a quarter of the codes.
"""

import json
import struct

import numpy as np
import pytest

from uhga_tf.retrieval import inverted_lists
from uhga_tf.retrieval.hamming_index import HammingIndex

N, CODE_LENGTH, NLIST, TOP_K = 2000, 64, 16, 10


def clustered(rng, centres, n, flip=0.06):
    bits = centres[rng.integers(0, len(centres), n)]
    bits = bits ^ (rng.random(bits.shape) < flip)
    return np.packbits(bits.astype(np.uint8), axis=1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 2, (20, CODE_LENGTH))
    return clustered(rng, centres, N), clustered(rng, centres, 50)


def indexes(packed, nprobe):
    flat = HammingIndex(CODE_LENGTH)
    flat.add(packed, np.arange(len(packed)) * 3)  # ids != positions
    ivf = HammingIndex(CODE_LENGTH)
    ivf.add(packed, np.arange(len(packed)) * 3)
    ivf.use_inverted_lists(nlist=NLIST, nprobe=nprobe)
    return flat, ivf


def recall(exact_ids, approx_ids):
    return np.mean([
        len(set(a) & set(b)) / len(a) for a, b in zip(exact_ids, approx_ids)
    ])


def test_all_lists_probed_is_exact(data):
    packed, queries = data
    flat, ivf = indexes(packed, nprobe=NLIST)
    assert ivf.kind == "ivf"
    for got, want in zip(ivf.search(queries, TOP_K),
                         flat.search(queries, TOP_K)):
        np.testing.assert_array_equal(got, want)


def test_few_lists_keep_recall(data):
    packed, queries = data
    flat, ivf = indexes(packed, nprobe=2)
    lists = ivf._lists
    probed = lists.assign(queries, 2)
    scanned = np.diff(lists.offsets)[probed].sum(axis=1) / N
    assert scanned.max() < 0.25, scanned.max()
    value = recall(flat.search(queries, TOP_K)[0],
                   ivf.search(queries, TOP_K)[0])
    assert value >= 0.95, value  # 0.964 measured on this seed


def test_add_remove_keep_lists_exact(data):
    packed, queries = data
    flat, ivf = indexes(packed[:1500], nprobe=NLIST)
    for index in (flat, ivf):
        index.add(packed[1500:], 10_000 + np.arange(500))
        index.remove(np.arange(0, 3 * 1500, 9))  # every third of the first
    assert len(ivf) == len(flat) == N - 500
    assert int(np.diff(ivf._lists.offsets).sum()) == len(ivf)
    for got, want in zip(ivf.search(queries, TOP_K),
                         flat.search(queries, TOP_K)):
        np.testing.assert_array_equal(got, want)


def test_save_load_round_trip(tmp_path, data):
    packed, queries = data
    _, ivf = indexes(packed, nprobe=3)
    ivf.save(tmp_path / "index")
    loaded = HammingIndex.load(tmp_path / "index")
    assert (loaded.kind, loaded.nprobe) == ("ivf", 3)
    for got, want in zip(loaded.search(queries, TOP_K),
                         ivf.search(queries, TOP_K)):
        np.testing.assert_array_equal(got, want)
    # Memory: the lists hold the only copy of the codes, plus int32
    # positions: 12 bytes a 64-bit code, then the small centroid table.
    assert ivf._packed_codes is None and ivf._faiss_index is None
    assert ivf._lists.nbytes == 12 * N + NLIST * 8 + 8 * (NLIST + 1)
    np.testing.assert_array_equal(loaded.packed_codes, packed)
    np.testing.assert_array_equal(loaded.packed_codes_at([5, 0]),
                                  packed[[5, 0]])


def test_default_nlist_and_errors(data):
    assert [inverted_lists.default_nlist(n)
            for n in (100, 10**6, 10**7, 10**9)] == [16, 256, 1024, 4096]
    packed, _ = data
    _, ivf = indexes(packed, nprobe=2)
    with pytest.raises(ValueError, match=r"nprobe must be in \[1, nlist=16\]"):
        ivf.nprobe = 17
    with pytest.raises(ValueError, match="nlist must be in"):
        HammingIndex(CODE_LENGTH).use_inverted_lists(nlist=4)


@pytest.mark.parametrize("fields,word", [
    ({"nlist": "16"}, "nlist='16'"),
    ({"nprobe": None}, "nprobe=None"),
    ({"nlist": 0}, "nlist=0"),
])
def test_ivf_header_field_of_the_wrong_type(tmp_path, data, fields, word):
    """As the flat fields (issue 18): one line, not a TypeError."""
    packed, _ = data
    _, ivf = indexes(packed[:200], nprobe=2)
    ivf.save(tmp_path / "index")
    path = tmp_path / "index" / "hamming_index.bin"
    raw = path.read_bytes()
    magic, version, length = struct.unpack_from("<8sII", raw)
    header = json.loads(raw[16:16 + length])
    header.update(fields)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<8sII", magic, version, len(new)) + new
                     + raw[16 + length:])
    with pytest.raises(ValueError, match="corrupt index header") as info:
        HammingIndex.load(tmp_path / "index")
    assert word in str(info.value)
