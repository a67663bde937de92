"""`index add` / `index remove` on a persisted index, and crash safety.

The index holds 60 seeded 32-bit codes; every check compares with a
brute-force ranking of the codes that should be in it.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import hamming_oracle
from uhga_tf import retrieval
from uhga_tf.retrieval import code_shards
from uhga_tf.retrieval.hamming_index import HammingIndex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_LENGTH = 32


def random_codes(rng, n):
    return (rng.integers(0, 2, (n, CODE_LENGTH)) * 2 - 1).astype(np.int8)


@pytest.fixture
def index_dir(tmp_path):
    codes = random_codes(np.random.default_rng(0), 60)
    index = HammingIndex(CODE_LENGTH, info={"class_names": None})
    index.add(codes, np.arange(60),
              metadata={"source": [f"img{i}.png" for i in range(60)]})
    index.save(tmp_path / "index")
    return tmp_path / "index", codes


def check_equals_brute_force(index_dir, codes, ids):
    index = HammingIndex.load(index_dir)
    np.testing.assert_array_equal(index.ids, ids)
    queries = codes[:5]
    got_ids, got_distances = index.search(queries, 10)
    positions, distances = hamming_oracle.stable_top_k(queries, codes, 10)
    np.testing.assert_array_equal(got_ids, ids[positions])
    np.testing.assert_array_equal(got_distances, distances)


def test_add_remove_round_trip(index_dir):
    path, codes = index_dir
    more = random_codes(np.random.default_rng(1), 20)
    new_ids = retrieval.add_items(
        path, more, [{"source": f"new{i}.png"} for i in range(20)]
    )
    np.testing.assert_array_equal(new_ids, np.arange(60, 80))
    all_codes = np.concatenate([codes, more])
    check_equals_brute_force(path, all_codes, np.arange(80))
    (meta,) = HammingIndex.load(path).get_metadata([75])
    assert meta["source"] == "new15.png"

    assert retrieval.remove_items(path, np.arange(60, 80)) == 60
    check_equals_brute_force(path, codes, np.arange(60))
    with pytest.raises(ValueError, match="ids not in the index"):
        retrieval.remove_items(path, [60])
    check_equals_brute_force(path, codes, np.arange(60))  # unchanged


def test_add_keeps_ivf_lists(index_dir):
    path, codes = index_dir
    index = HammingIndex.load(path)
    index.use_inverted_lists(nlist=4, nprobe=4)
    index.save(path)
    more = random_codes(np.random.default_rng(2), 10)
    retrieval.add_items(path, more, None)
    loaded = HammingIndex.load(path)
    assert loaded.kind == "ivf"
    check_equals_brute_force(path, np.concatenate([codes, more]),
                             np.arange(70))  # all lists probed: exact


def test_crash_mid_update_leaves_old_index(index_dir):
    """Kill the updater (os._exit, no cleanup) just before the rename."""
    path, codes = index_dir
    script = textwrap.dedent(f"""
        import os, numpy as np
        from uhga_tf import retrieval
        from uhga_tf.retrieval import hamming_index
        hamming_index.os.replace = lambda *a: os._exit(9)
        retrieval.remove_items({str(path)!r}, [0, 1, 2])
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 9, proc.stderr[-2000:]
    check_equals_brute_force(path, codes, np.arange(60))
    # The lock died with the process: the next update goes through.
    assert retrieval.remove_items(path, [0]) == 59


def write_shards(codes_dir, packed, sources):
    os.makedirs(codes_dir)
    lines = [
        code_shards.code_record({"id": i, "source": s, "label": None}, row)
        for i, (s, row) in enumerate(zip(sources, packed))
    ]
    with open(os.path.join(codes_dir, "codes-00000-of-00001.jsonl"),
              "w") as f:
        f.write("\n".join(lines) + "\n")
    code_shards.write_manifest(codes_dir, {
        "format": code_shards.FORMAT, "code_length": CODE_LENGTH,
        "count": len(lines), "code_shards": ["codes-00000-of-00001.jsonl"],
        "model": None, "class_names": None,
    })


def run_index(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "uhga_tf.index", *args], env=env,
        capture_output=True, text=True, timeout=300, check=False,
    )


def test_cli_build_from_codes_add_remove(tmp_path):
    rng = np.random.default_rng(3)
    packed = np.packbits(rng.integers(0, 2, (30, CODE_LENGTH)), axis=1)
    packed = packed.astype(np.uint8)
    write_shards(tmp_path / "a", packed[:20], [f"a{i}" for i in range(20)])
    write_shards(tmp_path / "b", packed[20:], [f"b{i}" for i in range(10)])
    out = str(tmp_path / "index")
    proc = run_index("build", f"--from_codes={tmp_path / 'a'}",
                     f"--out={out}", "--kind=ivf", "--nlist=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\t")[1:] == ["20 items", "32 bits\n"]
    assert HammingIndex.load(out).kind == "ivf"
    proc = run_index("add", f"--from_codes={tmp_path / 'b'}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_index("remove", "--ids=0,25", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = HammingIndex.load(out)
    np.testing.assert_array_equal(
        index.ids, [i for i in range(30) if i not in (0, 25)])
    np.testing.assert_array_equal(index.packed_codes,
                                  np.delete(packed, [0, 25], axis=0))
    proc = run_index("remove", "--ids=99", f"--out={out}")
    assert proc.returncode == 1
    assert "ids not in the index: [99]" in proc.stderr


def test_cli_add_images_equals_build(tmp_path):
    """`index add --images` appends the codes `index build` gives them."""
    import model_fixtures

    model_dir = model_fixtures.export_tiny(tmp_path / "models", CODE_LENGTH)
    _, encoded = model_fixtures.sample_images([(34, 34)] * 6)
    for name, part in (("first", encoded[:4]), ("more", encoded[4:])):
        for i, data in enumerate(part):
            path = tmp_path / name / f"img{i}.png"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
    out, whole = str(tmp_path / "index"), str(tmp_path / "whole")
    for args in (
        ("build", f"--images={tmp_path / 'first'}", f"--out={out}"),
        ("add", f"--images={tmp_path / 'more'}", f"--out={out}"),
    ):
        proc = run_index(*args, f"--model={model_dir}", "--noprogress")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\t")[1:] == ["added 2", "ids 4..5\n"]
    first = retrieval.build_index(model_dir, whole,
                                  images_dir=str(tmp_path / "first"),
                                  progress=False)
    more = retrieval.build_index(model_dir, whole,
                                 images_dir=str(tmp_path / "more"),
                                 progress=False)
    index = HammingIndex.load(out)
    np.testing.assert_array_equal(index.ids, np.arange(6))
    np.testing.assert_array_equal(
        index.packed_codes,
        np.concatenate([first.packed_codes, more.packed_codes]))
    sources = [m["source"] for m in index.get_metadata([4, 5])]
    assert sources == [str(tmp_path / "more" / f"img{i}.png")
                       for i in range(2)]


def test_added_labels_follow_class_names():
    from uhga_tf.retrieval import index_updates

    mapped = index_updates._map_labels(
        [0, 1, None, [0, 2]], ["b", "z", "a"], ["a", "b", "c"])
    assert mapped == [1, None, None, [1, 0]]
    assert index_updates._map_labels([0, 1], None, ["a"]) == [None, None]
