"""Tests for uhga_tf.data.datasets: real CIFAR-10 / Fashion-MNIST, fixtures."""

import gzip
import os
import struct
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from conftest import shared_data_dir
from PIL import Image

from uhga_tf.data import datasets

FASHION_DIR = datasets.FASHION_MNIST_SYSTEM_DIR


def _cifar_zip():
    root = shared_data_dir()
    if root is None:
        return None
    path = os.path.join(root, "cifar10", datasets.CIFAR10_ZIP)
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="module")
def cifar():
    if _cifar_zip() is None:
        pytest.skip(
            "CIFAR-10 zip not found under ../shared/data or UHGA_DATA_DIR"
        )
    return datasets.load_dataset("cifar10", shared_data_dir())


@pytest.fixture(scope="module")
def fashion():
    if not os.path.isfile(
        os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")
    ):
        pytest.skip(
            f"Debian dataset-fashion-mnist not installed in {FASHION_DIR}"
        )
    return datasets.load_dataset("fashion_mnist", source="files")


def _rgb(seed, size=(8, 8)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=size + (3,), dtype=np.uint8)


def _write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _write_jpeg(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=90)


def _tf_decode(path):
    with open(path, "rb") as f:
        return tf.io.decode_image(f.read(), channels=3).numpy()


# ---------------------------------------------------------------- CIFAR-10


def test_cifar10_zip_counts_and_order(cifar):
    assert cifar.name == "cifar10"
    assert cifar.num_examples == 60000
    assert not cifar.is_multi_label
    assert cifar.images.shape == (60000, 32, 32, 3)
    assert cifar.images.dtype == np.uint8
    assert cifar.labels.dtype == np.int64
    assert cifar.class_names == list(datasets.CIFAR10_CLASSES)
    assert cifar.source.startswith("zip:")
    train = cifar.partition == "train"
    assert train[:50000].all() and not train[50000:].any()
    np.testing.assert_array_equal(np.bincount(cifar.labels[train]), [5000] * 10)
    np.testing.assert_array_equal(
        np.bincount(cifar.labels[~train]), [1000] * 10
    )
    # Class-major order inside each part.
    np.testing.assert_array_equal(
        cifar.labels[:50000], np.repeat(np.arange(10), 5000)
    )
    np.testing.assert_array_equal(
        cifar.labels[50000:], np.repeat(np.arange(10), 1000)
    )


def test_cifar10_pixels_match_the_zip_members(cifar):
    # Index = part offset + class * per-class count + file number.
    cases = {
        0: "train/airplane/0000.jpg",
        3 * 5000 + 17: "train/cat/0017.jpg",
        49999: "train/truck/4999.jpg",
        50000 + 8 * 1000 + 123: "test/ship/0123.jpg",
        59999: "test/truck/0999.jpg",
    }
    with zipfile.ZipFile(_cifar_zip()) as zf:
        for index, member in cases.items():
            expected = tf.io.decode_jpeg(zf.read(member), channels=3).numpy()
            np.testing.assert_array_equal(
                cifar.images[index], expected, err_msg=member
            )
    # CIFAR-10's pixel mean is about 120.7 (per channel 125.3, 123.0,
    # 113.9); the JPEG re-encoding gives 120.02. Zeros or noise fail here.
    assert 119.5 < cifar.images.mean() < 121.0


def test_cifar10_to_tf_dataset_order_resize_and_partial_batch(cifar):
    indices = np.array([59999, 5, 0], np.int64)
    batches = list(cifar.to_tf_dataset(indices, image_size=None, batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 1]
    native = np.concatenate([b.numpy() for b in batches])
    assert native.dtype == np.float32
    np.testing.assert_array_equal(native, cifar.images[indices])
    resized = np.concatenate(
        [b.numpy() for b in cifar.to_tf_dataset(indices, 48, batch_size=2)]
    )
    assert resized.shape == (3, 48, 48, 3)
    expected = tf.image.resize(
        cifar.images[indices].astype(np.float32), (48, 48), method="bilinear"
    ).numpy()
    np.testing.assert_allclose(resized, expected, atol=1e-4)
    # Unrounded bilinear output has fractional values.
    assert np.any(resized != np.round(resized))
    assert 0.0 <= resized.min() and resized.max() <= 255.0


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_counts_and_channels(fashion):
    assert fashion.num_examples == 70000
    assert fashion.images.shape == (70000, 28, 28, 3)
    assert fashion.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(fashion.labels), [7000] * 10)
    assert (fashion.partition[:60000] == "train").all()
    assert (fashion.partition[60000:] == "test").all()
    np.testing.assert_array_equal(
        fashion.images[..., 0], fashion.images[..., 2]
    )
    assert len(fashion.class_names) == 10
    # Both idx label files start with class 9 (ankle boot).
    assert fashion.labels[0] == 9 and fashion.labels[60000] == 9
    with gzip.open(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz")) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16)
    np.testing.assert_array_equal(fashion.images[60000:, :, :, 1].ravel(), raw)


def _idx_bytes(array, magic=None):
    header = struct.pack(">I", magic or (0x0800 | array.ndim))
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_checks_magic_and_size():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(
        datasets.read_idx(_idx_bytes(array), 3, "x"), array
    )
    with pytest.raises(ValueError, match=r"magic number 0x00000801"):
        datasets.read_idx(_idx_bytes(array, magic=0x0801), 3, "x")
    with pytest.raises(ValueError, match=r"holds 23 bytes; expected 24"):
        datasets.read_idx(_idx_bytes(array)[:-1], 3, "x")


def test_fashion_mnist_idx_with_wrong_counts_is_refused(tmp_path):
    directory = tmp_path / "fashion_mnist"
    directory.mkdir()
    for prefix in ("train", "t10k"):
        images = np.zeros((5, 28, 28), np.uint8)
        with gzip.open(directory / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(_idx_bytes(images))
        with gzip.open(directory / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(_idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(ValueError, match=r"expected \(60000, 28, 28\)"):
        datasets.load_dataset("fashion_mnist", str(tmp_path), source="files")


# ---------------------------------------------------------------- folder


@pytest.fixture
def folder(tmp_path):
    """3 classes x 3 PNGs, written out of order (img10 before img2)."""
    root = tmp_path / "imgs"
    arrays = {}
    for c, cls in enumerate(("dog", "cat", "ant")):
        for k in (10, 2, 1):
            path = root / cls / f"img{k}.png"
            arrays[f"{cls}/img{k}.png"] = _rgb(100 * c + k)
            _write_png(str(path), arrays[f"{cls}/img{k}.png"])
    return root, arrays


def test_folder_labels_order_and_pixels(folder):
    root, arrays = folder
    ds = datasets.load_dataset("folder", str(root))
    assert ds.class_names == ["ant", "cat", "dog"]
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert (ds.partition == "train").all()
    rel = [os.path.relpath(p, root) for p in ds.paths]
    assert rel[:3] == ["ant/img1.png", "ant/img2.png", "ant/img10.png"]
    assert ds.images is None and ds.image_sizes.tolist() == [[8, 8]] * 9
    got = np.concatenate(
        [b.numpy() for b in ds.to_tf_dataset(np.arange(9)[::-1], None, 4)]
    )
    expected = np.stack([arrays[r] for r in rel[::-1]]).astype(np.float32)
    np.testing.assert_array_equal(got, expected)


def test_folder_train_test_grayscale_and_resize(tmp_path):
    root = tmp_path / "split"
    gray = np.arange(36, dtype=np.uint8).reshape(6, 6) * 7
    for part in ("train", "test"):
        for cls in ("a", "b"):
            _write_png(str(root / part / cls / "0.png"), _rgb(len(cls), (6, 6)))
    Image.fromarray(gray, mode="L").save(root / "train" / "a" / "1.png")
    ds = datasets.load_dataset("folder", str(root))
    assert ds.partition.tolist() == ["train"] * 3 + ["test"] * 2
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 0, 1])
    (batch,) = list(ds.to_tf_dataset([1], None, 8))
    np.testing.assert_array_equal(
        batch.numpy()[0], np.repeat(gray[..., None], 3, -1).astype(np.float32)
    )
    # 6 x 6 shrinks to 3 x 3: bilinear with the antialiasing filter.
    (batch,) = list(ds.to_tf_dataset([1, 0], 3, 8))
    expected = tf.image.resize(
        np.stack([_tf_decode(ds.paths[1]), _tf_decode(ds.paths[0])]).astype(
            np.float32
        ),
        (3, 3),
        antialias=True,
    ).numpy()
    np.testing.assert_allclose(batch.numpy(), expected, atol=1e-4)


def test_folder_from_zip_matches_folder(folder, tmp_path):
    root, arrays = folder
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel in arrays:
            zf.write(root / rel, rel)
    ds = datasets.load_dataset("folder", str(archive))
    assert ds.archive == str(archive) and ds.paths[0] == "ant/img1.png"
    got = np.concatenate([b.numpy() for b in ds.to_tf_dataset([8, 0], None, 1)])
    np.testing.assert_array_equal(
        got, np.stack([arrays["dog/img10.png"], arrays["ant/img1.png"]])
    )


def test_folder_mixed_sizes_need_image_size(tmp_path):
    _write_png(str(tmp_path / "a" / "0.png"), _rgb(0, (8, 8)))
    _write_png(str(tmp_path / "a" / "1.png"), _rgb(1, (5, 7)))
    ds = datasets.load_dataset("folder", str(tmp_path))
    assert ds.image_sizes.tolist() == [[8, 8], [5, 7]]
    with pytest.raises(ValueError, match="requires equal sizes"):
        ds.to_tf_dataset([0, 1], None, 2)
    (batch,) = list(ds.to_tf_dataset([0, 1], 4, 2))
    assert batch.shape == (2, 4, 4, 3)
    (batch,) = list(ds.to_tf_dataset([0], None, 2))
    assert batch.shape == (1, 8, 8, 3)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 2\)"):
        ds.to_tf_dataset([2], 4, 1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        ds.to_tf_dataset([0], 4, 0)


def test_folder_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        datasets.load_dataset("folder", str(tmp_path / "nope"))


def test_folder_empty_class_folder(tmp_path):
    _write_png(str(tmp_path / "a" / "0.png"), _rgb(0))
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=r"empty class folder .*b"):
        datasets.load_dataset("folder", str(tmp_path))


def test_folder_without_class_folders(tmp_path):
    _write_png(str(tmp_path / "0.png"), _rgb(0))
    with pytest.raises(ValueError,
                       match="no class folders.*folder_labels=none"):
        datasets.load_dataset("folder", str(tmp_path),
                              folder_labels="folders")


def test_flat_folder_is_an_unlabelled_collection(tmp_path):
    """Loose photos (and their sidecar files) under the root: every image
    one item, no class, natural name order."""
    for k in (10, 2, 1):
        _write_png(str(tmp_path / f"img{k}.png"), _rgb(k))
    (tmp_path / "img1.xmp").write_text("sidecar")
    ds = datasets.load_dataset("folder", str(tmp_path))
    assert not ds.labelled and ds.class_names == []
    np.testing.assert_array_equal(ds.labels, [-1, -1, -1])
    assert [os.path.basename(p) for p in ds.paths] == [
        "img1.png", "img2.png", "img10.png"]
    (batch,) = list(ds.to_tf_dataset([2], None, 1))
    np.testing.assert_array_equal(batch.numpy()[0], _rgb(10))


def test_folder_labels_none_reads_every_image_at_any_depth(folder):
    root, arrays = folder
    _write_png(str(root / "dog" / "puppies" / "img3.png"), _rgb(3))
    with pytest.raises(ValueError, match="unexpected nested path"):
        datasets.load_dataset("folder", str(root))
    ds = datasets.load_dataset("folder", str(root), folder_labels="none")
    assert not ds.labelled and len(ds.paths) == 10
    assert [os.path.relpath(p, root) for p in ds.paths][-2:] == [
        "dog/img10.png", "dog/puppies/img3.png"]
    with pytest.raises(ValueError, match="folder_labels must be one of"):
        datasets.load_dataset("folder", str(root), folder_labels="maybe")
    with pytest.raises(ValueError, match="dataset=folder only"):
        from uhga_tf import config

        config.DataConfig(dataset="cifar10", folder_labels="none")


def test_folder_non_image_file(tmp_path):
    _write_png(str(tmp_path / "a" / "0.png"), _rgb(0))
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "a" / ".DS_Store").write_text("ignored")
    with pytest.raises(ValueError, match=r"non-image file .*notes\.txt"):
        datasets.load_dataset("folder", str(tmp_path))


def test_folder_corrupt_jpeg_raises_or_is_skipped(tmp_path):
    for k in range(3):
        _write_jpeg(str(tmp_path / "a" / f"{k}.jpg"), _rgb(k, (64, 64)))
    _write_jpeg(str(tmp_path / "b" / "0.jpg"), _rgb(9, (64, 64)))
    # Cut inside the entropy-coded scan: the header still parses.
    data = (tmp_path / "a" / "1.jpg").read_bytes()
    (tmp_path / "a" / "1.jpg").write_bytes(data[: len(data) * 3 // 4])
    (tmp_path / "b" / "junk.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(
        ValueError, match=r"corrupt image .*a.1\.jpg.*truncated"
    ):
        datasets.load_dataset("folder", str(tmp_path))
    os.rename(tmp_path / "a" / "1.jpg", tmp_path / "1.jpg.bak")
    with pytest.raises(ValueError, match=r"junk\.jpg.*not a recognised image"):
        datasets.load_dataset("folder", str(tmp_path))
    os.rename(tmp_path / "1.jpg.bak", tmp_path / "a" / "1.jpg")
    ds = datasets.load_dataset("folder", str(tmp_path), skip_corrupt=True)
    assert ds.num_examples == 3
    assert sorted(os.path.basename(p) for p in ds.skipped) == [
        "1.jpg",
        "junk.jpg",
    ]
    np.testing.assert_array_equal(ds.labels, [0, 0, 1])
    batches = list(ds.to_tf_dataset(np.arange(3), None, 3))
    assert batches[0].shape == (3, 64, 64, 3)


def test_folder_train_test_mixed_with_classes(tmp_path):
    _write_png(str(tmp_path / "train" / "a" / "0.png"), _rgb(0))
    _write_png(str(tmp_path / "b" / "0.png"), _rgb(0))
    with pytest.raises(ValueError, match="mixes train/test folders"):
        datasets.load_dataset("folder", str(tmp_path))


# ---------------------------------------------------------------- small cifar10


@pytest.fixture
def small_cifar(tmp_path):
    root = tmp_path / "cifar10"
    for part, count in (("train", 2), ("test", 1)):
        for c, cls in enumerate(datasets.CIFAR10_CLASSES):
            for k in range(count):
                _write_jpeg(
                    str(root / part / cls / f"{k:04d}.jpg"),
                    _rgb(c * 10 + k, (32, 32)),
                )
    return tmp_path


def test_cifar10_from_folder(small_cifar):
    ds = datasets.load_dataset("cifar10", str(small_cifar), source="files")
    assert ds.source.startswith("folder:") and ds.images.shape == (
        30,
        32,
        32,
        3,
    )
    np.testing.assert_array_equal(
        ds.labels, np.r_[np.repeat(np.arange(10), 2), np.arange(10)]
    )
    np.testing.assert_array_equal(
        ds.images[3],
        _tf_decode(str(small_cifar / "cifar10/train/automobile/0001.jpg")),
    )


def test_cifar10_corrupt_file_is_named(small_cifar):
    bad = small_cifar / "cifar10" / "train" / "dog" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"corrupt image .*dog.0001\.jpg"):
        datasets.load_dataset("cifar10", str(small_cifar))
    ds = datasets.load_dataset("cifar10", str(small_cifar), skip_corrupt=True)
    assert ds.num_examples == 29 and ds.skipped == [str(bad)]
    assert np.bincount(ds.labels[:19]).tolist() == [2] * 5 + [1] + [2] * 4


def test_cifar10_wrong_class_folders(small_cifar):
    root = small_cifar / "cifar10"
    os.rename(root / "train" / "cat", root / "train" / "kitten")
    with pytest.raises(ValueError, match="same class folders"):
        datasets.load_dataset("cifar10", str(small_cifar))


def test_cifar10_auto_without_files_names_both_sources(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        datasets.load_dataset("cifar10", str(tmp_path))
    message = str(info.value)
    assert "cifar10-jpeg.zip" in message
    assert os.path.join(str(tmp_path), "tfds") in message
    assert "source='tfds'" in message
    assert not (tmp_path / "tfds").exists()  # auto never downloads


# ---------------------------------------------------------------- NUS-WIDE


NUS_CONCEPTS = ["sky", "water", "grass", "dog", "car", "snow"]
# Rows: images. Frequencies: sky 4, water 5, grass 4, dog 1, car 4, snow 0.
# Top 3 by descending frequency, ties in concept order: water, sky, grass.
NUS_LABELS = np.array(
    [
        [1, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 1, 0],
        [0, 0, 0, 1, 1, 0],  # none of the top 3 -> dropped
        [1, 0, 1, 0, 0, 0],
        [0, 1, 1, 0, 1, 0],
        [0, 0, 0, 0, 1, 0],  # dropped
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
    ],
    np.uint8,
)


@pytest.fixture
def nus(tmp_path):
    root = tmp_path / "nus_wide"
    (root / "ImageList").mkdir(parents=True)
    entries = []
    for i in range(len(NUS_LABELS)):
        folder = "actor" if i % 2 else "beach"
        if i == 0:
            entries.append(f"C:\\ImageData\\Flickr\\{folder}\\{i:04d}_1.jpg")
        else:
            entries.append(f"{folder}\\{i:04d}_1.jpg")
        _write_png(str(root / "images" / folder / f"{i:04d}_1.jpg"), _rgb(i))
    (root / "ImageList" / "Imagelist.txt").write_text("\r\n".join(entries))
    (root / "Concepts81.txt").write_text("\n".join(NUS_CONCEPTS) + "\n")
    (root / "AllLabels81.txt").write_text(
        "\n".join(" ".join(map(str, row)) for row in NUS_LABELS) + "\n"
    )
    return tmp_path


def test_nus_wide_top_concepts_and_kept_images(nus):
    ds = datasets.load_dataset("nus_wide", str(nus), num_concepts=3)
    assert ds.is_multi_label and ds.labels.dtype == np.uint8
    assert ds.class_names == ["water", "sky", "grass"]
    kept = [0, 1, 3, 4, 6, 7]
    np.testing.assert_array_equal(ds.labels, NUS_LABELS[kept][:, [1, 0, 2]])
    assert ds.num_examples == 6 and (ds.partition == "train").all()
    assert ds.paths[0].endswith(os.path.join("images", "beach", "0000_1.jpg"))
    got = np.concatenate([b.numpy() for b in ds.to_tf_dataset([5, 0], None, 2)])
    np.testing.assert_array_equal(got, np.stack([_rgb(7), _rgb(0)]))


def test_nus_wide_per_concept_label_files(nus):
    root = nus / "nus_wide"
    os.remove(root / "AllLabels81.txt")
    (root / "Groundtruth" / "AllLabels").mkdir(parents=True)
    for c, name in enumerate(NUS_CONCEPTS):
        (root / "Groundtruth" / "AllLabels" / f"Labels_{name}.txt").write_text(
            "\n".join(str(v) for v in NUS_LABELS[:, c]) + "\n"
        )
    ds = datasets.load_dataset("nus_wide", str(nus), num_concepts=3)
    assert ds.class_names == ["water", "sky", "grass"]
    np.testing.assert_array_equal(
        ds.labels, NUS_LABELS[[0, 1, 3, 4, 6, 7]][:, [1, 0, 2]]
    )


def test_nus_wide_missing_image_and_bad_inputs(nus):
    root = nus / "nus_wide"
    os.remove(root / "images" / "actor" / "0001_1.jpg")
    with pytest.raises(FileNotFoundError, match=r"0001_1\.jpg"):
        datasets.load_dataset("nus_wide", str(nus), num_concepts=3)
    ds = datasets.load_dataset(
        "nus_wide", str(nus), num_concepts=3, skip_corrupt=True
    )
    assert ds.num_examples == 5 and len(ds.skipped) == 1
    with pytest.raises(ValueError, match=r"num_concepts must be .* \[1, 6\]"):
        datasets.load_dataset("nus_wide", str(nus), num_concepts=7)
    (root / "AllLabels81.txt").write_text("1 0 1\n")
    with pytest.raises(ValueError, match=r"expected 8 rows x 6 concepts"):
        datasets.load_dataset("nus_wide", str(nus), num_concepts=3)


# ---------------------------------------------------------------- misc


def test_unknown_dataset_and_source():
    with pytest.raises(ValueError, match=r"name='mnist'.*'cifar10'"):
        datasets.load_dataset("mnist")
    with pytest.raises(ValueError, match=r"source='web'"):
        datasets.load_dataset("cifar10", source="web")
    with pytest.raises(ValueError, match="num_concepts applies to nus_wide"):
        datasets.load_dataset("folder", "/tmp", num_concepts=3)


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("UHGA_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="data_dir.*UHGA_DATA_DIR"):
        datasets.resolve_data_dir(None)
    monkeypatch.setenv("UHGA_DATA_DIR", str(tmp_path))
    assert datasets.resolve_data_dir(None) == str(tmp_path)
    assert datasets.resolve_data_dir(str(tmp_path / ".")) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        datasets.resolve_data_dir(str(tmp_path / "missing"))
