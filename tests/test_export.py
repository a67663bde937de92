"""Tests for uhga_tf.export: signatures equal in-process codes bit for bit."""

import io
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import model_fixtures
from uhga_tf import codes as codes_lib
from uhga_tf import codes_tf
from uhga_tf import config as config_lib
from uhga_tf import saved_model
from uhga_tf.serving import model_manager

IMAGE_SIZE = model_fixtures.IMAGE_SIZE
FEATURE_DIM = model_fixtures.FEATURE_DIM
# Not a multiple of 8, so the last packed byte carries 4 pad bits.
CODE_LENGTH = 20


def tiny_models(seed=0):
    return model_fixtures.tiny_models(CODE_LENGTH, seed)


def sample_images():
    """Seeded RGB images of mixed sizes with PNG and JPEG encodings."""
    sizes = [(40, 50), (32, 32), (17, 60), (64, 24)]
    return model_fixtures.sample_images(sizes)


def decoded_pixels(encoded):
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    backbone, hasher = tiny_models()
    _, encoded = sample_images()
    base = str(tmp_path_factory.mktemp("export") / "uhga")
    path = saved_model.export_saved_model(
        backbone,
        hasher,
        base,
        image_size=IMAGE_SIZE,
        metadata={"training_data": "toy", "config": {"seed": 0}},
        warmup_images=encoded[:2],
    )
    return backbone, hasher, base, path


def reference(backbone, hasher, pixels):
    """In-process codes and logits (pre-activation z) of some images."""
    batch = np.asarray(pixels)
    if batch.ndim == 3:
        batch = batch[None]
    return saved_model.encode_in_process(backbone, hasher, batch, IMAGE_SIZE)


def test_export_writes_version_one(exported):
    _, _, base, path = exported
    assert path == os.path.join(base, "1")
    assert saved_model.list_versions(base) == [1]
    assert sorted(os.listdir(base)) == ["1"], "no temporary dir may remain"


def test_serving_default_matches_in_process(exported):
    backbone, hasher, _, path = exported
    _, encoded = sample_images()
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["serving_default"](
        image_bytes=tf.constant(encoded)
    )
    codes, packed = out["codes"].numpy(), out["packed_codes"].numpy()
    assert codes.dtype == np.int8 and codes.shape == (4, CODE_LENGTH)
    assert packed.dtype == np.uint8 and packed.shape == (4, 3)
    for i, blob in enumerate(encoded):
        expected, logits = reference(backbone, hasher, decoded_pixels(blob))
        # The comparison is only meaningful if no output sits on the
        # threshold, where float round-off could flip a bit.
        assert np.abs(logits).min() > 1e-4
        np.testing.assert_array_equal(codes[i : i + 1], expected)
    np.testing.assert_array_equal(
        codes_lib.unpack_codes(packed, CODE_LENGTH), codes
    )
    np.testing.assert_array_equal(codes_lib.pack_codes(codes), packed)
    # Pad bits (the low 4 bits of the last byte) are zero.
    assert not np.any(packed[:, -1] & 0x0F)
    # Not a constant encoder: both signs occur and images differ.
    assert (codes == 1).any() and (codes == -1).any()
    assert len({row.tobytes() for row in codes}) == 4


def test_encode_images_and_features_match_in_process(exported):
    backbone, hasher, _, path = exported
    pixels, _ = sample_images()
    loaded = tf.saved_model.load(path)
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, size=(5, 45, 70, 3), dtype=np.uint8)
    out = loaded.signatures["encode_images"](images=tf.constant(batch))
    expected, logits = reference(backbone, hasher, batch)
    assert np.abs(logits).min() > 1e-4
    np.testing.assert_array_equal(out["codes"].numpy(), expected)
    np.testing.assert_array_equal(
        out["packed_codes"].numpy(), codes_lib.pack_codes(expected)
    )
    # Any size is resized in-graph, including one already at IMAGE_SIZE.
    for image in pixels:
        out = loaded.signatures["encode_images"](
            images=tf.constant(image[None])
        )
        np.testing.assert_array_equal(
            out["codes"].numpy(), reference(backbone, hasher, image)[0]
        )

    features = rng.normal(size=(7, FEATURE_DIM)).astype(np.float32)
    out = loaded.signatures["encode_features"](features=tf.constant(features))
    logits = np.asarray(hasher(features))
    assert np.abs(logits).min() > 1e-4
    np.testing.assert_array_equal(
        out["codes"].numpy(), codes_lib.binarize(logits)
    )
    np.testing.assert_array_equal(
        out["packed_codes"].numpy(),
        codes_lib.pack_codes(codes_lib.binarize(logits)),
    )


def test_serving_default_codes_a_photo_upright(exported):
    """A phone stores a portrait photo on its side with EXIF orientation 6
    (turn clockwise) or 8; the exported model codes what a viewer shows."""
    backbone, hasher, _, path = exported
    loaded = tf.saved_model.load(path)
    stored = np.random.default_rng(2).integers(
        0, 256, size=(24, 40, 3), dtype=np.uint8)
    for orientation, turn in ((6, -1), (8, 1)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out = io.BytesIO()
        Image.fromarray(stored).save(out, "PNG")
        png = out.getvalue()
        out = io.BytesIO()
        Image.fromarray(stored).save(out, "JPEG", exif=exif.tobytes())
        jpeg = out.getvalue()
        codes = loaded.signatures["serving_default"](
            image_bytes=tf.constant([jpeg, png]))["codes"].numpy()
        upright = np.rot90(decoded_pixels(jpeg).numpy(), k=turn)
        expected, logits = reference(backbone, hasher, upright)
        assert np.abs(logits).min() > 1e-4
        np.testing.assert_array_equal(codes[:1], expected)
        # A PNG has no EXIF here: coded as stored.
        np.testing.assert_array_equal(
            codes[1:], reference(backbone, hasher, stored)[0])


def test_serving_default_reads_still_webp(exported):
    """TensorFlow's decoder reads WebP: a lossless WebP codes exactly as a
    PNG of the same pixels."""
    _, _, _, path = exported
    loaded = tf.saved_model.load(path)
    pixels = np.random.default_rng(3).integers(
        0, 256, size=(30, 44, 3), dtype=np.uint8)
    blobs = []
    for fmt, options in (("WEBP", {"lossless": True}), ("PNG", {})):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, fmt, **options)
        blobs.append(out.getvalue())
    codes = loaded.signatures["serving_default"](
        image_bytes=tf.constant(blobs))["codes"].numpy()
    np.testing.assert_array_equal(codes[0], codes[1])


def test_binarize_tf_maps_zero_to_plus_one():
    logits = tf.constant([[-1.0, -0.0, 0.0, 1e-9, -1e-9, 3.0, -2.0, 0.5, 7]])
    codes = codes_tf.binarize_tf(logits).numpy()
    np.testing.assert_array_equal(codes, codes_lib.binarize(logits.numpy()))
    np.testing.assert_array_equal(codes[0, :4], [-1, 1, 1, 1])
    np.testing.assert_array_equal(
        codes_tf.pack_codes_tf(tf.constant(codes)).numpy(),
        codes_lib.pack_codes(codes),
    )


def test_saved_model_cli_lists_signatures(exported):
    _, _, _, path = exported
    result = subprocess.run(
        ["saved_model_cli", "show", "--dir", path, "--all"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    for name, key in saved_model.SIGNATURE_INPUTS.items():
        assert f"signature_def['{name}']" in text
        assert f"inputs['{key}']" in text
    assert text.count("outputs['codes']") == 3
    assert text.count("outputs['packed_codes']") == 3
    assert text.count("dtype: DT_INT8") == 3
    assert text.count("shape: (-1, 20)") == 3
    assert text.count("shape: (-1, 3)") == 3
    assert text.count("Method name is: tensorflow/serving/predict") == 3


def test_metadata_and_warmup_records(exported):
    backbone, hasher, _, path = exported
    extra = os.path.join(path, "assets.extra")
    with open(os.path.join(extra, "uhga_tf.json")) as f:
        info = json.load(f)
    assert info["code_length"] == CODE_LENGTH
    assert info["feature_dim"] == FEATURE_DIM
    assert info["image_size"] == IMAGE_SIZE
    assert info["backbone"] == "tiny_backbone"
    assert info["training_data"] == "toy"
    assert info["config"] == {"seed": 0}
    assert info["version"] == 1
    assert "git_sha" in info
    assert set(info["signatures"]) == set(saved_model.SIGNATURE_INPUTS)

    requests = saved_model.read_warmup_requests(
        os.path.join(extra, "tf_serving_warmup_requests")
    )
    _, encoded = sample_images()
    assert len(requests) == 2
    loaded = tf.saved_model.load(path)
    for request, blob in zip(requests, encoded):
        assert request.model_spec.name == "uhga"
        assert request.model_spec.signature_name == "serving_default"
        image_bytes = tf.make_ndarray(request.inputs["image_bytes"])
        assert image_bytes.tolist() == [blob]
        out = loaded.signatures["serving_default"](
            image_bytes=tf.constant(image_bytes)
        )
        np.testing.assert_array_equal(
            out["codes"].numpy(),
            reference(backbone, hasher, decoded_pixels(blob))[0],
        )


def test_layer_names_with_leading_underscore_are_exportable(tmp_path):
    """Torch-style names ("_blocks.0._bn0") are renamed, codes unchanged."""
    keras.utils.set_random_seed(2)
    backbone = keras.Sequential(
        [
            keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
            keras.layers.Conv2D(8, 3, name="_conv_stem"),
            keras.layers.BatchNormalization(name="_blocks.0._bn0"),
            keras.layers.GlobalAveragePooling2D(),
        ]
    )
    hasher = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, name="_fc")]
    )
    path = saved_model.export_saved_model(
        backbone, hasher, str(tmp_path), image_size=IMAGE_SIZE
    )
    images = np.random.default_rng(4).integers(
        0, 256, size=(3, 20, 20, 3), dtype=np.uint8
    )
    out = tf.saved_model.load(path).signatures["encode_images"](
        images=tf.constant(images)
    )
    expected, logits = reference(backbone, hasher, images)
    assert np.abs(logits).min() > 1e-4
    np.testing.assert_array_equal(out["codes"].numpy(), expected)
    assert [layer.name for layer in backbone.layers][0] == "_conv_stem"


def test_serving_configs_parse():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    root = os.path.join(os.path.dirname(__file__), "..", "serving")
    with open(os.path.join(root, "models.config")) as f:
        config = text_format.Parse(
            f.read(), model_server_config_pb2.ModelServerConfig()
        )
    (model,) = config.model_config_list.config
    assert model.name == "uhga" and model.model_platform == "tensorflow"
    assert model.model_version_policy.latest.num_versions == 2
    assert dict(model.version_labels) == {"stable": 1, "canary": 2}


def test_versions_increment_and_never_overwrite(tmp_path):
    backbone, hasher = tiny_models()
    base = str(tmp_path / "m")
    os.makedirs(os.path.join(base, "notes"))
    os.makedirs(os.path.join(base, ".tmp-7-deadbeef"))
    open(os.path.join(base, "12"), "w").close()  # a file, not a version
    assert saved_model.list_versions(base) == []
    first = saved_model.export_saved_model(
        backbone, hasher, base, image_size=IMAGE_SIZE, version=3
    )
    second = saved_model.export_saved_model(
        backbone, hasher, base, image_size=IMAGE_SIZE
    )
    assert first.endswith(os.sep + "3") and second.endswith(os.sep + "4")
    assert saved_model.list_versions(base) == [3, 4]
    mtime = os.path.getmtime(os.path.join(first, "saved_model.pb"))
    with pytest.raises(ValueError, match="version 3 already exists"):
        saved_model.export_saved_model(
            backbone, hasher, base, image_size=IMAGE_SIZE, version=3
        )
    assert os.path.getmtime(os.path.join(first, "saved_model.pb")) == mtime
    with pytest.raises(ValueError, match="version must be an integer in"):
        saved_model.export_saved_model(
            backbone, hasher, base, image_size=IMAGE_SIZE, version=0
        )
    with pytest.raises(ValueError, match="image_size must be a positive"):
        saved_model.export_saved_model(backbone, hasher, base, image_size=0)
    assert saved_model.list_versions(base) == [3, 4]


def test_failed_rename_leaves_no_version(tmp_path, monkeypatch):
    backbone, hasher = tiny_models()
    base = str(tmp_path / "m")

    def broken_rename(src, dst):
        raise OSError(f"simulated crash renaming {src} -> {dst}")

    # The export renames through os.rename, wherever the helper lives.
    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError, match="simulated crash"):
        saved_model.export_saved_model(
            backbone, hasher, base, image_size=IMAGE_SIZE
        )
    assert os.listdir(base) == []
    assert saved_model.list_versions(base) == []


def test_killed_export_is_invisible_to_the_server(tmp_path):
    """SIGKILL an export right before its rename; nothing gets served."""
    backbone, hasher = tiny_models()
    base = str(tmp_path / "m")
    saved_model.export_saved_model(backbone, hasher, base, image_size=32)
    script = textwrap.dedent(
        f"""
        import os, signal
        import keras
        from uhga_tf import saved_model
        def die(src, dst):
            os.kill(os.getpid(), signal.SIGKILL)
        os.rename = die
        keras.utils.set_random_seed(1)
        backbone = keras.Sequential([
            keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3),
            keras.layers.GlobalAveragePooling2D()])
        hasher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)])
        saved_model.export_saved_model(
            backbone, hasher, {base!r}, image_size=32)
        """
    )
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == -9, result.stderr[-2000:]
    leftovers = sorted(os.listdir(base))
    temps = [name for name in leftovers if name.startswith(".tmp-2-")]
    assert len(leftovers) == 2 and "1" in leftovers and len(temps) == 1
    # The temporary dir holds a complete-looking SavedModel; it must still
    # not be discovered.
    assert os.path.exists(os.path.join(base, temps[0], "saved_model.pb"))
    assert saved_model.list_versions(base) == [1]
    manager = model_manager.ModelManager(base, num_versions=5)
    assert manager.poll() == [1]
    assert manager.versions() == [1]
    # The next export takes version 2 and does not reuse the leftover.
    path = saved_model.export_saved_model(
        backbone, hasher, base, image_size=32
    )
    assert path == os.path.join(base, "2")
    assert manager.poll() == [2]


def test_checkpoint_config_names_missing_key(tmp_path):
    keys = saved_model.CHECKPOINT_CONFIG_KEYS
    with pytest.raises(FileNotFoundError, match="no config.json"):
        config_lib.load_experiment(str(tmp_path), required=keys)
    config = {
        "data": {"dataset": "cifar10"},
        "model": {
            "backbone": "efficientnet_lite0",
            "backbone_weights": "default",
            "image_size": 224,
        },
    }
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    # Not required, a missing key reads as its default; required, refused.
    assert config_lib.load_experiment(str(tmp_path)).model.code_length == 64
    with pytest.raises(ValueError, match="lacks the key 'model.code_length'"):
        config_lib.load_experiment(str(tmp_path), required=keys)
    config["model"]["code_length"] = 32
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    experiment = config_lib.load_experiment(str(tmp_path), required=keys)
    assert experiment.model.code_length == 32
    assert experiment.data.dataset == "cifar10"
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no hasher.keras"):
        saved_model.export_from_checkpoint(str(tmp_path), out)
    open(tmp_path / "hasher.keras", "wb").close()
    with pytest.raises(ValueError, match="hasher.keras is damaged"):
        saved_model.export_from_checkpoint(str(tmp_path), out)
    assert not os.path.exists(out)


def test_export_cli_reports_user_errors(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "uhga_tf.export",
            f"--checkpoint={tmp_path}",
            f"--export_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"uhga_tf.export: no config.json in {tmp_path}"
    )


def test_feature_centring_travels_inside_the_saved_model(tmp_path):
    """The product recipe's fixed centring is part of the exported model."""
    from uhga_tf.models import hash_layer

    backbone, _ = tiny_models()
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(6, IMAGE_SIZE, IMAGE_SIZE, 3),
                          dtype=np.uint8)
    features = np.asarray(
        backbone(saved_model.preprocess_images(pixels, IMAGE_SIZE)))
    # A large common offset: without the centring every code would be the
    # same; with it the codes vary.
    centring = hash_layer.centring_statistics(features + 50.0)
    keras.utils.set_random_seed(3)
    hasher = hash_layer.build_hasher(
        FEATURE_DIM, CODE_LENGTH, centring=centring)
    hasher(features + 50.0)
    path = str(tmp_path / "hasher.keras")
    hasher.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(
        reloaded.get_layer("feature_centring").get_weights()[0],
        centring[0],
    )
    shifted = features + 50.0
    expected = codes_lib.binarize(np.asarray(hasher(shifted)))
    assert len({row.tobytes() for row in expected}) > 1
    out_dir = saved_model.export_saved_model(
        backbone, reloaded, str(tmp_path / "uhga"), image_size=IMAGE_SIZE)
    loaded = tf.saved_model.load(out_dir)
    served = loaded.signatures["encode_features"](
        features=tf.constant(shifted))["codes"].numpy()
    np.testing.assert_array_equal(served, expected)
