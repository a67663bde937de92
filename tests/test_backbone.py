"""Tests for uhga_tf.models.torch_weights and uhga_tf.models.backbone."""

import glob
import hashlib
import importlib.util
import os
import pickle
import shutil
import zipfile

import keras
import numpy as np
import pytest
from PIL import Image

from uhga_tf.models import backbone as backbone_lib
from uhga_tf.models import torch_weights

LITE0_SHA256 = (
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
)


# --- torch_weights -----------------------------------------------------------


def test_reads_efficientnet_lite0_file():
    path = torch_weights.efficientnet_lite0_path()
    assert os.path.getsize(path) == 18_826_032
    state_dict = torch_weights.load_state_dict(path)  # verifies the sha256
    assert len(state_dict) == 296
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.3._depthwise_conv.weight"].shape == (
        144, 1, 5, 5
    )
    assert state_dict["_fc.weight"].shape == (1000, 1280)
    tracked = state_dict["_bn0.num_batches_tracked"]
    assert tracked.shape == () and tracked.dtype == np.int64
    # Storages are raw little-endian float32 in the file: the bytes we
    # return must occur in it verbatim (wrong offsets or dtypes would not).
    with open(path, "rb") as f:
        raw = f.read()
    for name in ("_fc.bias", "_bn1.running_var"):
        assert state_dict[name].tobytes() in raw, name
    # The conv and dense weights were converted from TF and are stored
    # channels-last with permuted strides, e.g. `_conv_stem.weight` has
    # strides (1, 32, 288, 96): its storage is the (kh, kw, I, O) array.
    stem = state_dict["_conv_stem.weight"]
    assert stem.tobytes() not in raw
    assert np.ascontiguousarray(stem.transpose(2, 3, 1, 0)).tobytes() in raw
    fc = state_dict["_fc.weight"]
    assert np.ascontiguousarray(fc.T).tobytes() in raw
    # Some running variances are exactly 0, hence BN epsilon 1e-3 matters.
    zero_vars = sum(
        int((v == 0).sum()) for k, v in state_dict.items()
        if k.endswith("running_var")
    )
    assert zero_vars > 0


@pytest.mark.parametrize("legacy", [False, True])
def test_state_dict_round_trip(tmp_path, legacy):
    rng = np.random.default_rng(0)
    state_dict = {
        "conv.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "half": rng.standard_normal(5).astype(np.float16),
        "double": rng.standard_normal((2, 3)),
        "ints": rng.integers(-5, 5, size=(3,)).astype(np.int32),
        "mask": np.array([True, False, True]),
        "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "fixture.pth"
    torch_weights.save_state_dict(state_dict, path, legacy=legacy)
    assert zipfile.is_zipfile(path) != legacy
    loaded = torch_weights.load_state_dict(path, expected_sha256=None)
    assert list(loaded) == list(state_dict)
    for name, array in state_dict.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)


def _malicious_pickle():
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    return pickle.dumps({"weight": Exploit()}, protocol=2)


def test_refuses_foreign_globals_zip(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", _malicious_pickle())
    with pytest.raises(ValueError, match="refusing to unpickle global"):
        torch_weights.load_state_dict(path, expected_sha256=None)


def test_refuses_foreign_globals_legacy(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            f.write(pickle.dumps(header, protocol=2))
        f.write(_malicious_pickle())
    with pytest.raises(ValueError, match="refusing to unpickle global"):
        torch_weights.load_state_dict(path, expected_sha256=None)


def test_rejects_tampered_and_truncated_files(tmp_path):
    original = torch_weights.efficientnet_lite0_path()
    tampered = tmp_path / os.path.basename(original)
    shutil.copyfile(original, tampered)
    with open(tampered, "r+b") as f:
        f.seek(10_000_000)
        byte = f.read(1)
        f.seek(10_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=LITE0_SHA256) as info:
        torch_weights.load_state_dict(tampered)
    assert str(tampered) in str(info.value)
    assert "received" in str(info.value)

    truncated = tmp_path / "truncated.pth"
    with open(original, "rb") as f:
        truncated.write_bytes(f.read(18_000_000))
    with pytest.raises(ValueError, match="truncated"):
        torch_weights.load_state_dict(truncated, expected_sha256=None)

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        torch_weights.load_state_dict(tmp_path / "missing.pth")


# --- EfficientNet-Lite0 on ImageNet samples ---------------------------------


def _foolbox_imagenet_samples():
    """The 20 ImageNet samples foolbox ships, BOX-resized to 224x224.

    The files are read directly (foolbox itself is not imported). Labels are
    the `<label>` in `imagenet_XX_<label>.jpg`.
    """
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.skip("foolbox (dev extra) is not installed")
    data_dir = os.path.join(spec.submodule_search_locations[0], "data")
    files = sorted(glob.glob(os.path.join(data_dir, "imagenet_*_*.jpg")))
    assert len(files) == 20
    images = np.stack([
        np.asarray(
            Image.open(f).convert("RGB").resize((224, 224), Image.BOX),
            np.float32,
        )
        for f in files
    ])
    labels = np.array([int(f[:-4].rsplit("_", 1)[1]) for f in files])
    return images, labels


@pytest.fixture(scope="module")
def imagenet_samples():
    return _foolbox_imagenet_samples()


def _mean_log_likelihood(logits, labels):
    logits = logits - logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(log_p[np.arange(len(labels)), labels].mean())


def test_file_digest_is_remembered_until_the_file_changes(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"first")
    first = torch_weights.sha256_file(path)
    assert first == hashlib.sha256(b"first").hexdigest()
    assert torch_weights.sha256_file(path) == first
    path.write_bytes(b"second, longer")
    assert torch_weights.sha256_file(path) == (
        hashlib.sha256(b"second, longer").hexdigest())


def test_efficientnet_lite0_classifies_imagenet_samples(imagenet_samples):
    """Top-1 on foolbox's 20 ImageNet samples, and the padding choice.

    Measured here (TF 2.21, CPU), TF "same" padding: 19/20 with the BOX
    filter used below (mean log-likelihood -0.567), 19/20 NEAREST, 18/20
    LANCZOS, 17/20 BILINEAR and BICUBIC (foolbox's own `samples()` resize).
    Two images (#3, #14) sit within 0.4 logits of the runner-up under every
    filter; #7 is always wrong. PyTorch's symmetric padding scores a lower
    likelihood under every filter (-0.683 with BOX), which shows the
    weights were trained with TF padding.
    """
    images, labels = imagenet_samples
    model = backbone_lib.build_backbone("efficientnet_lite0", include_top=True)
    assert model.output_shape == (None, 1000)
    logits = model.predict(images, batch_size=20, verbose=0)
    top1 = int((logits.argmax(axis=1) == labels).sum())
    assert top1 >= 18, f"top-1 {top1}/20, expected >= 18 (19 measured)"
    same_ll = _mean_log_likelihood(logits, labels)
    assert same_ll > -0.65, same_ll

    symmetric = backbone_lib._efficientnet_lite0(
        224, include_top=True, padding="symmetric"
    )
    backbone_lib.load_efficientnet_lite0_weights(
        symmetric, torch_weights.efficientnet_lite0_path()
    )
    symmetric_ll = _mean_log_likelihood(
        symmetric.predict(images, batch_size=20, verbose=0), labels
    )
    assert same_ll > symmetric_ll + 0.05, (same_ll, symmetric_ll)

    # Features are the pooled head; the ImageNet classifier on top of them
    # reproduces the logits.
    features_model = backbone_lib.build_backbone("efficientnet_lite0")
    assert features_model.output_shape == (None, 1280)
    features = features_model.predict(images[:4], verbose=0)
    assert features.dtype == np.float32
    assert features.min() >= 0.0 and features.max() <= 6.0  # ReLU6, pooled
    state_dict = torch_weights.load_state_dict(
        torch_weights.efficientnet_lite0_path()
    )
    np.testing.assert_allclose(
        features @ state_dict["_fc.weight"].T + state_dict["_fc.bias"],
        logits[:4], rtol=1e-4, atol=1e-3,
    )


def test_efficientnet_lite0_small_input():
    model = backbone_lib.build_backbone("efficientnet_lite0", image_size=96)
    images = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3))
    features = model(images.astype(np.float32)).numpy()
    assert features.shape == (2, 1280)
    assert np.isfinite(features).all() and features.std() > 0.01


# --- AlexNet ----------------------------------------------------------------


def _random_alexnet_state_dict(rng):
    """Random weights in torchvision's `alexnet-owt-4df8aa71.pth` layout."""
    shapes = {
        "features.0": (64, 3, 11, 11), "features.3": (192, 64, 5, 5),
        "features.6": (384, 192, 3, 3), "features.8": (256, 384, 3, 3),
        "features.10": (256, 256, 3, 3), "classifier.1": (4096, 9216),
        "classifier.4": (4096, 4096), "classifier.6": (1000, 4096),
    }
    state_dict = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        state_dict[name + ".weight"] = rng.standard_normal(
            shape, dtype=np.float32
        ) * np.float32(np.sqrt(2.0 / fan_in))
        state_dict[name + ".bias"] = rng.uniform(
            -0.1, 0.1, shape[0]
        ).astype(np.float32)
    return state_dict


def _conv_chw(x, weight, bias, stride, padding):
    """Reference PyTorch Conv2d on one C,H,W image (float64)."""
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding)))
    kh, kw = weight.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), (1, 2))
    windows = windows[:, ::stride, ::stride]  # C, Ho, Wo, kh, kw
    out = np.tensordot(weight, windows, axes=([1, 2, 3], [0, 3, 4]))
    return out + bias[:, None, None]


def _max_pool_chw(x):
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), (1, 2))
    return windows[:, ::2, ::2].max(axis=(3, 4))


def _alexnet_reference(image, state_dict):
    """torchvision AlexNet forward (eval mode) in NumPy, C,H,W layout."""
    w = {k: v.astype(np.float64) for k, v in state_dict.items()}
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    x = ((image / 255.0 - mean) / std).transpose(2, 0, 1)
    for index, _, _, stride, padding in backbone_lib._ALEXNET_CONVS:
        x = np.maximum(_conv_chw(
            x, w[f"features.{index}.weight"], w[f"features.{index}.bias"],
            stride, padding,
        ), 0)
        if index in (0, 3, 10):
            x = _max_pool_chw(x)
    assert x.shape == (256, 6, 6)
    x = x.reshape(-1)  # torch flattens C,H,W
    fc6 = np.maximum(w["classifier.1.weight"] @ x + w["classifier.1.bias"], 0)
    fc7 = np.maximum(w["classifier.4.weight"] @ fc6 + w["classifier.4.bias"], 0)
    logits = w["classifier.6.weight"] @ fc7 + w["classifier.6.bias"]
    return fc7, logits


def test_alexnet_matches_torch_layout_reference(tmp_path):
    rng = np.random.default_rng(0)
    state_dict = _random_alexnet_state_dict(rng)
    path = tmp_path / "alexnet-random.pth"
    torch_weights.save_state_dict(state_dict, path)
    image = rng.uniform(0, 255, (224, 224, 3))
    fc7_ref, logits_ref = _alexnet_reference(image, state_dict)
    assert (fc7_ref > 0).mean() > 0.1  # the check is not vacuous

    top = backbone_lib.build_backbone(
        "alexnet", weights=str(path), include_top=True
    )
    assert top.output_shape == (None, 1000)
    # One build serves both checks: fc7 (the features) is classifier.4.
    model = keras.Model(top.input, top.get_layer("classifier.4").output)
    fc7, logits = (
        y.numpy()[0]
        for y in keras.Model(top.input, [model.output, top.output])(
            image[None].astype(np.float32)
        )
    )
    np.testing.assert_allclose(fc7, fc7_ref, atol=1e-4 * np.abs(fc7_ref).max())
    np.testing.assert_allclose(
        logits, logits_ref, atol=1e-4 * np.abs(logits_ref).max()
    )
    assert backbone_lib.backbone_fingerprint("alexnet", str(path)) == (
        f"alexnet:{torch_weights.sha256_file(path)}:224"
    )


# --- keras.applications ------------------------------------------------------


@pytest.mark.parametrize(
    "name, dim",
    [("vgg16", 4096), ("resnet50", 2048), ("efficientnet_b0", 1280)],
)
def test_keras_applications_shapes(name, dim):
    model = backbone_lib.build_backbone(name, weights=None, image_size=32)
    assert model.output_shape == (None, dim)
    assert backbone_lib.BACKBONES[name].feature_dim == dim
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
    features = model(images.astype(np.float32)).numpy()
    assert features.shape == (2, dim) and np.isfinite(features).all()
    if name == "vgg16":
        assert features.min() >= 0.0  # fc2 is taken after its ReLU


# Keras's own h5 writer trips NumPy 2's copy-keyword deprecation.
@pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)
def test_keras_applications_weights_file(tmp_path):
    base = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3),
        pooling="avg",
    )
    path = str(tmp_path / "mobilenet_v2.weights.h5")
    base.save_weights(path)
    model = backbone_lib.build_backbone(
        "mobilenet_v2", weights=path, image_size=32
    )
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3))
    images = images.astype(np.float32)
    np.testing.assert_allclose(
        model(images).numpy(), base(images / 127.5 - 1.0).numpy(),
        rtol=1e-5, atol=1e-5,
    )


# --- preprocessing, fingerprints and errors ---------------------------------


def test_preprocessing_modes():
    images = np.array([[[[0.0, 127.0, 255.0]]]], np.float32)
    expected = {
        "lite": [-127 / 128, 0.0, 128 / 128],
        "caffe": [255 - 103.939, 127 - 116.779, 0 - 123.68],
        "torch": [(0 - 0.485) / 0.229, (127 / 255 - 0.456) / 0.224,
                  (1 - 0.406) / 0.225],
        "tf": [-1.0, 127 / 127.5 - 1, 1.0],
        "none": [0.0, 127.0, 255.0],
    }
    for mode, values in expected.items():
        layer = backbone_lib.ImagePreprocessing(mode)
        np.testing.assert_allclose(
            layer(images).numpy().reshape(-1), values, rtol=1e-6, atol=1e-5,
            err_msg=mode,
        )
        clone = backbone_lib.ImagePreprocessing.from_config(layer.get_config())
        assert clone.mode == mode
    with pytest.raises(ValueError, match="received mode='bgr'"):
        backbone_lib.ImagePreprocessing("bgr")


def test_fingerprints():
    fingerprint = backbone_lib.backbone_fingerprint("efficientnet_lite0")
    assert fingerprint == f"efficientnet_lite0:{LITE0_SHA256}:224"
    assert backbone_lib.backbone_fingerprint(
        "efficientnet_lite0", None, 128
    ) == "efficientnet_lite0:random:128"
    assert backbone_lib.backbone_fingerprint(
        "vgg16", "imagenet"
    ) == "vgg16:imagenet:224"


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="received name='resnet18'") as info:
        backbone_lib.build_backbone("resnet18")
    assert "efficientnet_lite0" in str(info.value)
    with pytest.raises(ValueError, match="image_size=16"):
        backbone_lib.build_backbone("efficientnet_lite0", image_size=16)
    with pytest.raises(ValueError, match="image_size=128"):
        backbone_lib.build_backbone("alexnet", weights=None, image_size=128)
    with pytest.raises(ValueError, match="received weights='imagenet'"):
        backbone_lib.build_backbone("efficientnet_lite0", weights="imagenet")
    with pytest.raises(ValueError, match="received weights=3"):
        backbone_lib.backbone_fingerprint("vgg16", weights=3)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        backbone_lib.build_backbone(
            "efficientnet_lite0", weights=str(tmp_path / "nope.pth")
        )
    wrong = tmp_path / "wrong.pth"
    torch_weights.save_state_dict(
        {"_conv_stem.weight": np.zeros((8, 3, 3, 3), np.float32)}, wrong
    )
    with pytest.raises(ValueError, match="wrong.pth"):
        backbone_lib.build_backbone("efficientnet_lite0", weights=str(wrong))


def test_efficientnet_lite0_reads_its_own_keras_weights_file(tmp_path):
    """A fine-tuned backbone written as `backbone.weights.h5` builds again
    from that path, with its own fingerprint (a new feature cache key)."""
    model = backbone_lib.build_backbone("efficientnet_lite0", image_size=96)
    kernel = model.get_layer("_conv_head").kernel
    kernel.assign(kernel * 1.5)  # stands in for fine-tuning
    path = str(tmp_path / backbone_lib.FINE_TUNED_WEIGHTS_FILE)
    model.save_weights(path)
    again = backbone_lib.build_backbone(
        "efficientnet_lite0", weights=path, image_size=96)
    images = np.random.default_rng(1).uniform(0, 255, (2, 96, 96, 3))
    images = images.astype(np.float32)
    np.testing.assert_array_equal(again(images).numpy(), model(images).numpy())
    fingerprint = backbone_lib.backbone_fingerprint(
        "efficientnet_lite0", path, 96)
    assert fingerprint != backbone_lib.backbone_fingerprint(
        "efficientnet_lite0", "default", 96)
