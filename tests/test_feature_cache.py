"""Tests for uhga_tf.data.feature_cache."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from uhga_tf.data import feature_cache
from uhga_tf.models import backbone as backbone_lib
from uhga_tf.models import lite_runtime

KEY = {"dataset": "toy", "indices_sha256": "abc", "image_size": 32}


class _Counter:
    """compute_fn that returns `array` and counts its calls."""

    def __init__(self, array):
        self.array = array
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.array


def _array(seed=0, shape=(50, 8)):
    return np.random.default_rng(seed).standard_normal(shape).astype(
        np.float32
    )


def _entry_files(cache_dir):
    return sorted(os.listdir(cache_dir))


def test_second_call_loads_without_computing(tmp_path):
    compute = _Counter(_array())
    first = feature_cache.load_or_compute(tmp_path, KEY, compute)
    second = feature_cache.load_or_compute(tmp_path, KEY, compute)
    assert compute.calls == 1
    np.testing.assert_array_equal(first, compute.array)
    np.testing.assert_array_equal(second, compute.array)
    assert second.dtype == np.float32

    array_path, sidecar_path = feature_cache.cache_paths(tmp_path, KEY)
    fingerprint = feature_cache.key_fingerprint(KEY)
    assert os.path.basename(array_path) == f"features-{fingerprint[:16]}.npz"
    assert _entry_files(tmp_path) == sorted(
        [os.path.basename(array_path), os.path.basename(sidecar_path)]
    )  # no temp files left behind
    with open(sidecar_path) as f:
        sidecar = json.load(f)
    assert sidecar["key"] == KEY
    assert sidecar["shape"] == [50, 8] and sidecar["dtype"] == "float32"
    assert sidecar["sha256"] == feature_cache._array_sha256(compute.array)
    assert sidecar["uhga_tf_version"] not in ("", None)


def test_key_change_recomputes(tmp_path):
    compute_a, compute_b = _Counter(_array(0)), _Counter(_array(1))
    feature_cache.load_or_compute(tmp_path, KEY, compute_a)
    other = dict(KEY, image_size=64)
    result = feature_cache.load_or_compute(tmp_path, other, compute_b)
    assert (compute_a.calls, compute_b.calls) == (1, 1)
    np.testing.assert_array_equal(result, compute_b.array)
    # Key order does not matter (sort_keys), so this one is a hit.
    reordered = dict(reversed(list(KEY.items())))
    result = feature_cache.load_or_compute(tmp_path, reordered, compute_a)
    assert compute_a.calls == 1
    np.testing.assert_array_equal(result, compute_a.array)


def _corrupt_truncate(array_path, sidecar_path):
    size = os.path.getsize(array_path)
    with open(array_path, "r+b") as f:
        f.truncate(size // 2)


def _corrupt_stale_array(array_path, sidecar_path):
    # A process killed after replacing the array but before the sidecar.
    np.savez(array_path, features=_array(seed=7))


def _corrupt_sidecar_key(array_path, sidecar_path):
    with open(sidecar_path) as f:
        sidecar = json.load(f)
    sidecar["key"] = dict(KEY, image_size=999)
    with open(sidecar_path, "w") as f:
        json.dump(sidecar, f)


def _corrupt_missing_sidecar(array_path, sidecar_path):
    os.remove(sidecar_path)


def _corrupt_garbage_sidecar(array_path, sidecar_path):
    with open(sidecar_path, "w") as f:
        f.write('{"key": ')


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_truncate, _corrupt_stale_array, _corrupt_sidecar_key,
     _corrupt_missing_sidecar, _corrupt_garbage_sidecar],
)
def test_untrusted_entry_is_recomputed(tmp_path, corrupt, caplog):
    compute = _Counter(_array())
    feature_cache.load_or_compute(tmp_path, KEY, compute)
    array_path, sidecar_path = feature_cache.cache_paths(tmp_path, KEY)
    corrupt(array_path, sidecar_path)
    with caplog.at_level("WARNING"):
        result = feature_cache.load_or_compute(tmp_path, KEY, compute)
    assert compute.calls == 2
    np.testing.assert_array_equal(result, compute.array)
    assert any(
        os.path.basename(array_path) in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    # The overwrite is trusted again.
    feature_cache.load_or_compute(tmp_path, KEY, compute)
    assert compute.calls == 2


def test_stale_temp_file_is_never_read(tmp_path):
    array_path, _ = feature_cache.cache_paths(tmp_path, KEY)
    stale = os.path.join(
        tmp_path, "." + os.path.basename(array_path) + ".12345.tmp"
    )
    with open(stale, "wb") as f:
        np.savez(f, features=_array(seed=3))
    compute = _Counter(_array())
    result = feature_cache.load_or_compute(tmp_path, KEY, compute)
    assert compute.calls == 1
    np.testing.assert_array_equal(result, compute.array)


def test_kill_during_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted_savez(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted_savez)
    with pytest.raises(KeyboardInterrupt):
        feature_cache.load_or_compute(tmp_path, KEY, _Counter(_array()))
    assert _entry_files(tmp_path) == []
    monkeypatch.undo()
    compute = _Counter(_array())
    result = feature_cache.load_or_compute(tmp_path, KEY, compute)
    assert compute.calls == 1
    np.testing.assert_array_equal(result, compute.array)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        feature_cache.load_or_compute(tmp_path, {"a": object()}, _array)
    with pytest.raises(ValueError, match="received list"):
        feature_cache.load_or_compute(tmp_path, KEY, lambda: [1.0, 2.0])


# --- extraction -----------------------------------------------------------


def _tiny_backbone():
    images = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(images)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(images, x)
    model.get_layer("conv").set_weights([
        np.random.default_rng(0).standard_normal((3, 3, 3, 4)).astype(
            np.float32
        ),
        np.arange(4, dtype=np.float32),
    ])
    return model


def test_extract_features_matches_direct_call(capsys):
    model = _tiny_backbone()
    images = np.random.default_rng(1).uniform(0, 255, (10, 8, 8, 3))
    images = images.astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(4)
    features = feature_cache.extract_features(model, dataset, 10)
    assert features.shape == (10, 4) and features.dtype == np.float32
    np.testing.assert_allclose(
        features, model(images).numpy(), rtol=1e-5, atol=1e-4
    )
    assert "img/s" in capsys.readouterr().err  # tqdm bar in images/s

    feature_cache.extract_features(model, dataset, 10, progress=False)
    assert "img/s" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="yielded 10 images"):
        feature_cache.extract_features(model, dataset, 12, progress=False)
    with pytest.raises(ValueError, match="num_examples=8"):
        feature_cache.extract_features(model, dataset, 8, progress=False)


def test_tflite_runtime_equals_tensorflow_up_to_rounding():
    model = _tiny_backbone()
    images = np.random.default_rng(1).uniform(0, 255, (10, 8, 8, 3))
    dataset = tf.data.Dataset.from_tensor_slices(
        images.astype(np.float32)
    ).batch(4)  # 4, 4 and a short last batch of 2 (padded)
    reference = feature_cache.extract_features(
        model, dataset, 10, progress=False, runtime="tensorflow"
    )
    lite = feature_cache.extract_features(
        model, dataset, 10, progress=False, runtime="tflite"
    )
    np.testing.assert_allclose(lite, reference, rtol=1e-5, atol=1e-4)
    # Converted once, for the first batch's size.
    assert list(feature_cache._LITE_PREDICTORS[model]) == [4]

    predictor = lite_runtime.LitePredictor(model, batch_size=4)
    np.testing.assert_allclose(
        predictor(images[:3]), reference[:3], rtol=1e-5, atol=1e-4
    )
    with pytest.raises(ValueError, match="exceeds the converted batch_size=4"):
        predictor(images[:5])
    with pytest.raises(ValueError, match="runtime='onnx'"):
        feature_cache.extract_features(model, dataset, 10, runtime="onnx")


def test_tflite_runtime_refuses_what_it_cannot_run(monkeypatch):
    images = np.random.default_rng(2).uniform(0, 255, (6, 8, 8, 3))
    dataset = tf.data.Dataset.from_tensor_slices(
        images.astype(np.float32)
    ).batch(3)

    def no_kernel(model, batch_size):
        raise RuntimeError("TFLite cannot convert backbone: no kernel")

    monkeypatch.setattr(lite_runtime, "LitePredictor", no_kernel)
    with pytest.raises(ValueError, match="no kernel"):
        feature_cache.extract_features(
            _tiny_backbone(), dataset, 6, progress=False, runtime="tflite"
        )

    class Garbage:  # a converter bug: features that are not the model's
        batch_size = 3

        def __call__(self, batch):
            return np.zeros((len(batch), 4), np.float32)

    monkeypatch.setattr(
        lite_runtime, "LitePredictor", lambda model, batch_size: Garbage()
    )
    # Zeros against features whose largest is F: off by F, not rounding.
    with pytest.raises(
        ValueError, match=r"differ from TensorFlow's by (\d+) \(largest "
        r"feature \1\)"
    ):
        feature_cache.extract_features(
            _tiny_backbone(), dataset, 6, progress=False, runtime="tflite"
        )


class _FakeImageDataset:
    """Same attributes as uhga_tf.data.datasets' image datasets."""

    name = "fake"
    source = "/nowhere/fake.zip"

    def __init__(self, num_examples=12):
        self.num_examples = num_examples
        self.images = np.random.default_rng(2).uniform(
            0, 255, (num_examples, 40, 40, 3)
        ).astype(np.float32)
        self.calls = []

    def to_tf_dataset(self, indices, image_size, batch_size):
        self.calls.append((list(indices), image_size, batch_size))
        images = tf.image.resize(self.images[np.asarray(indices)],
                                 (image_size, image_size))
        return tf.data.Dataset.from_tensor_slices(images).batch(batch_size)


def test_load_or_extract_features(tmp_path):
    dataset = _FakeImageDataset()
    indices = np.array([5, 0, 7, 3, 11])
    kwargs = dict(
        backbone_name="efficientnet_lite0", image_size=32,
        cache_dir=tmp_path, batch_size=2, progress=False,
    )
    features = feature_cache.load_or_extract_features(
        dataset, indices, **kwargs
    )
    assert features.shape == (5, 1280) and features.dtype == np.float32
    backbone = backbone_lib.build_backbone("efficientnet_lite0", image_size=32)
    expected = backbone(
        tf.image.resize(dataset.images[indices], (32, 32))
    ).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    assert len(dataset.calls) == 1

    again = feature_cache.load_or_extract_features(dataset, indices, **kwargs)
    assert len(dataset.calls) == 1  # served from the cache
    np.testing.assert_array_equal(again, features)

    # Other indices or another image size: another key, recomputed.
    feature_cache.load_or_extract_features(dataset, indices[:3], **kwargs)
    feature_cache.load_or_extract_features(
        dataset, indices, **dict(kwargs, image_size=48)
    )
    assert len(dataset.calls) == 3
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".npz")]) == 3

    key = feature_cache.feature_cache_key(
        dataset, indices, "efficientnet_lite0", "default", 32
    )
    assert key["backbone_fingerprint"] == (
        backbone_lib.backbone_fingerprint("efficientnet_lite0", "default", 32)
    )
    assert "runtime" not in key  # TensorFlow keys predate the runtime
    lite_key = feature_cache.feature_cache_key(
        dataset, indices, "efficientnet_lite0", "default", 32, "tflite"
    )
    assert lite_key == dict(key, runtime="tflite")
    assert key["preprocessing"] == "(x - 127) / 128"
    assert key["feature_layer"] == "global_average_pool"


def test_each_runtime_has_its_cache_entry_and_batch_size(tmp_path):
    dataset = _FakeImageDataset()
    indices = np.array([5, 0, 7, 3, 11])
    kwargs = dict(
        backbone_name="efficientnet_lite0", image_size=32,
        cache_dir=tmp_path, progress=False,
    )
    features = feature_cache.load_or_extract_features(
        dataset, indices, **kwargs
    )
    lite = feature_cache.load_or_extract_features(
        dataset, indices, runtime="tflite", **kwargs
    )
    # The batch the stored TensorFlow features were extracted with, and
    # TFLite's faster one; two cache entries, equal up to rounding.
    assert [call[2] for call in dataset.calls] == [256, 64]
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".npz")]) == 2
    np.testing.assert_allclose(lite, features, rtol=1e-4, atol=1e-4)

    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        feature_cache.load_or_extract_features(dataset, [0, 12], **kwargs)
    with pytest.raises(ValueError, match="backbone_name='resnet18'"):
        feature_cache.load_or_extract_features(
            dataset, indices, **dict(kwargs, backbone_name="resnet18")
        )
