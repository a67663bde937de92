"""`python -m uhga_tf.index build` and `python -m uhga_tf.search` end to end.

The SavedModel fixture follows the export contract: `serving_default`
(`image_bytes` string [None]) and `encode_images` (`images` uint8
[None, None, None, 3]) both return `codes` int8 and `packed_codes` uint8.
Its codes are the signs of a fixed random projection of the 4x4 mean-pooled,
16x16-resized image, so they are deterministic and 16 bits tie often.
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from uhga_tf import codes as codes_lib
from uhga_tf import retrieval
from uhga_tf.retrieval import result_grid

CODE_LENGTH = 16
CLASSES = ("cat", "dog", "ship")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _FixtureModel(tf.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.projection = tf.constant(
            rng.standard_normal((48, CODE_LENGTH)).astype(np.float32)
        )

    def _codes(self, images_16):
        pooled = tf.nn.avg_pool2d(images_16, 4, 4, "VALID")
        features = tf.reshape(pooled, [-1, 48]) / 255.0 - 0.5
        bits = tf.matmul(features, self.projection) >= 0
        codes = tf.where(bits, tf.constant(1, tf.int8),
                         tf.constant(-1, tf.int8))
        weights = tf.constant([128, 64, 32, 16, 8, 4, 2, 1], tf.int32)
        grouped = tf.reshape(tf.cast(bits, tf.int32), [-1, CODE_LENGTH // 8, 8])
        packed = tf.cast(tf.reduce_sum(grouped * weights, axis=-1), tf.uint8)
        return {"codes": codes, "packed_codes": packed}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve(self, image_bytes):
        def decode(data):
            image = tf.io.decode_image(data, channels=3,
                                       expand_animations=False)
            return tf.image.resize(tf.cast(image, tf.float32), (16, 16))

        images = tf.map_fn(decode, image_bytes,
                           fn_output_signature=tf.float32)
        return self._codes(images)

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)]
    )
    def encode(self, images):
        return self._codes(
            tf.image.resize(tf.cast(images, tf.float32), (16, 16))
        )


def _png(path, rgb, rng, size):
    noise = rng.integers(-60, 60, (size, size, 3))
    pixels = np.clip(np.asarray(rgb) + noise, 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_cli")
    model_dir = str(root / "models" / "uhga" / "1")
    module = _FixtureModel()
    tf.saved_model.save(
        module,
        model_dir,
        signatures={"serving_default": module.serve,
                    "encode_images": module.encode},
    )
    os.makedirs(os.path.join(model_dir, "assets.extra"), exist_ok=True)
    with open(os.path.join(model_dir, "assets.extra", "uhga_tf.json"),
              "w") as f:
        json.dump({"code_length": CODE_LENGTH}, f)
    rng = np.random.default_rng(0)
    colors = {"cat": (200, 60, 60), "dog": (60, 200, 60),
              "ship": (60, 60, 200)}
    for name in CLASSES:
        for i in range(5):
            _png(str(root / "images" / name / f"{name}_{i}.png"),
                 colors[name], rng, size=12 + 2 * i)
    _png(str(root / "queries" / "dog" / "q0.png"), colors["dog"], rng, 20)
    _png(str(root / "queries" / "q1.png"), colors["cat"], rng, 16)
    (root / "queries" / "broken.png").write_bytes(b"\x89PNG not an image")
    return root, model_dir


def _run(*args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )


def _expected_ranking(model_dir, database_paths, query_paths, top_k):
    """Stable brute-force ranking from the fixture's int8 codes."""
    loaded = tf.saved_model.load(model_dir)
    encode = loaded.signatures["serving_default"]

    def codes(paths):
        data = [open(p, "rb").read() for p in paths]
        return encode(image_bytes=tf.constant(data))["codes"].numpy()

    dist = codes_lib.hamming_distance(codes(query_paths),
                                      codes(database_paths))
    order = np.argsort(dist, axis=1, kind="stable")[:, :top_k]
    return order, np.take_along_axis(dist, order, axis=1)


def test_build_and_search_cli(workspace):
    root, model_dir = workspace
    index_dir = str(root / "index")
    built = _run("uhga_tf.index", "build", f"--model={model_dir}",
                 f"--images={root / 'images'}", f"--out={index_dir}",
                 "--noprogress", "--batch_size=4")
    assert built.returncode == 0, built.stderr
    assert built.stdout.split("\t")[1:] == ["15 items", "16 bits\n"]

    queries = [str(root / "queries" / "dog" / "q0.png"),
               str(root / "queries" / "q1.png")]
    out_png = str(root / "result.png")
    result = _run("uhga_tf.search", f"--index={index_dir}",
                  f"--model={model_dir}", *queries, "--top_k=6",
                  f"--out={out_png}", "--tile_size=32")
    assert result.returncode == 0, result.stderr

    database = [str(root / "images" / c / f"{c}_{i}.png")
                for c in CLASSES for i in range(5)]
    order, dist = _expected_ranking(model_dir, database, queries, 6)
    expected = []
    for q, query_class in zip(range(2), ("dog", "-")):
        expected.append(f"query\t{queries[q]}\t{query_class}")
        for rank, (j, d) in enumerate(zip(order[q], dist[q]), start=1):
            expected.append(f"{rank}\t{d}\t{database[j]}\t{CLASSES[j // 5]}")
    assert result.stdout.splitlines() == expected
    # The ranking has ties, so the tie rule is exercised.
    assert np.any(dist[:, 1:] == dist[:, :-1])

    # 2 rows x (query + 6 tiles) of 32 px tiles, 6 px padding, 28 px
    # captions: 7 * 38 + 6 = 272 wide, 2 * 66 + 6 = 138 high.
    grid = Image.open(out_png)
    assert grid.size == (272, 138)
    # Row 0 (query class dog): frame green iff the result is a dog.
    for rank, j in enumerate(order[0], start=1):
        corner = grid.getpixel((6 + rank * 38 + 1, 6 + 1))
        want = (result_grid.RELEVANT_COLOR if CLASSES[j // 5] == "dog"
                else result_grid.IRRELEVANT_COLOR)
        assert corner == want, (rank, corner)


def test_search_cli_corrupt_query(workspace):
    root, model_dir = workspace
    index_dir = str(root / "index_small")
    retrieval.build_index(model_dir, index_dir, images_dir=root / "images",
                       progress=False)
    broken = str(root / "queries" / "broken.png")
    result = _run("uhga_tf.search", f"--index={index_dir}",
                  f"--model={model_dir}", broken)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"uhga_tf.search: cannot decode query image {broken}"
    ), result.stderr
    assert result.stdout == ""


def test_build_corrupt_image(workspace, tmp_path):
    root, model_dir = workspace
    images = tmp_path / "images"
    rng = np.random.default_rng(3)
    for i in range(3):
        _png(str(images / "cat" / f"{i}.png"), (200, 60, 60), rng, 12)
    bad = images / "cat" / "1b.png"
    bad.write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(ValueError, match=f"cannot decode image {bad}"):
        retrieval.build_index(model_dir, tmp_path / "index", images_dir=images,
                           progress=False)
    index = retrieval.build_index(model_dir, tmp_path / "index",
                               images_dir=images, progress=False,
                               skip_corrupt=True)
    # Sorted files: 0, 1, 1b (skipped), 2 -> ids 0, 1, 3.
    np.testing.assert_array_equal(index.ids, [0, 1, 3])
    assert [m["source"] for m in index.get_metadata([3])] == [
        str(images / "cat" / "2.png")
    ]


def test_dataset_build_and_server_search(workspace, tmp_path, monkeypatch):
    """--dataset and --server paths with stand-in modules of the contract."""
    root, model_dir = workspace
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 5)
    dataset = types.SimpleNamespace(images=images, labels=labels,
                                    class_names=["odd", "even"])
    calls = []

    def load_dataset(name, data_dir):
        calls.append((name, data_dir))
        return dataset

    fake_datasets = types.ModuleType("uhga_tf.data.datasets")
    fake_datasets.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "uhga_tf.data.datasets", fake_datasets)
    import uhga_tf.data

    monkeypatch.setattr(uhga_tf.data, "datasets", fake_datasets,
                        raising=False)
    index = retrieval.build_index(model_dir, tmp_path / "index", dataset="toy",
                               data_dir=str(tmp_path), progress=False,
                               batch_size=3)
    assert calls == [("toy", str(tmp_path))]
    assert index.get_metadata([4]) == [
        {"source": "dataset:toy:4", "label": 0}
    ]

    encoder = retrieval.SavedModelEncoder(model_dir)
    requests = []

    def encode_images(server, image_bytes, model_name, signature_name,
                      timeout):
        requests.append((server, model_name, signature_name, timeout))
        return encoder.encode_image_bytes(image_bytes)

    fake_client = types.ModuleType("uhga_tf.serving.grpc_client")
    fake_client.encode_images = encode_images
    monkeypatch.setitem(sys.modules, "uhga_tf.serving.grpc_client", fake_client)
    import uhga_tf.serving

    monkeypatch.setattr(uhga_tf.serving, "grpc_client", fake_client,
                        raising=False)
    query = str(root / "queries" / "q1.png")
    results, loaded = retrieval.search_images(
        tmp_path / "index", [query], top_k=4, server="localhost:8500",
        query_label="even",
    )
    assert requests == [("localhost:8500", "uhga", "serving_default", 10.0)]
    query_codes = encoder.encode_image_bytes([open(query, "rb").read()])[0]
    dist = codes_lib.hamming_distance(query_codes,
                                      encoder.encode_images(images)[0])[0]
    order = np.argsort(dist, kind="stable")[:4]
    (result,) = results
    np.testing.assert_array_equal(result.ids, order)
    np.testing.assert_array_equal(result.distances, dist[order])
    assert result.relevant == [bool(labels[j] == 1) for j in order]
    size = retrieval.write_result_grid(results, loaded, tmp_path / "g.png",
                                    tile_size=16)
    assert size == (5 * 22 + 6, 50 + 6)
    with pytest.raises(ValueError, match="query_label must be one of"):
        retrieval.search_images(tmp_path / "index", [query], model_dir=model_dir,
                             query_label="bird")
