"""Versioned SavedModel export: image bytes or pixels in, binary codes out.

The exported graph holds the whole encoder: decode (JPEG/PNG/GIF/BMP),
bilinear resize to the backbone's `image_size`, the backbone (its
normalisation is inside it), the hash head and the sign rule of
`uhga_tf.codes.binarize` (`>= 0 -> +1`). Three named signatures share it:

| signature         | input                                      |
|-------------------|--------------------------------------------|
| `serving_default` | `image_bytes`: string [None] (encoded)     |
| `encode_images`   | `images`: uint8 [None, None, None, 3]      |
| `encode_features` | `features`: float32 [None, feature_dim]    |

Each returns `codes` (int8 [None, code_length] in {-1, +1}) and
`packed_codes` (uint8 [None, ceil(code_length / 8)], `np.packbits` order),
bit for bit what `codes.binarize` / `codes.pack_codes` give in process.

A model is written to `<export_dir>/<version>/` by way of a temporary
directory beside it (named `.tmp-<version>-<random>`, never an integer, so
TF-Serving and `uhga_tf.serving.server` ignore it), reloaded once with
`tf.saved_model.load` and checked, then moved into place with one
`os.rename`. A poller of the base path therefore never sees a half-written
version; an export killed before the rename leaves only a temporary
directory, which the next export does not reuse.
"""

import datetime
import json
import os
import re
import secrets
import shutil
import subprocess
import zipfile

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from uhga_tf import codes as codes_lib
from uhga_tf import config as config_lib

# Wire names of the exported signatures, their inputs and outputs: the one
# place they are spelled; the server, clients, retrieval and benchmarks
# import them from here.
SIGNATURE_IMAGE_BYTES = "serving_default"
SIGNATURE_IMAGES = "encode_images"
SIGNATURE_FEATURES = "encode_features"
INPUT_IMAGE_BYTES = "image_bytes"
INPUT_IMAGES = "images"
INPUT_FEATURES = "features"
SIGNATURE_INPUTS = {
    SIGNATURE_IMAGE_BYTES: INPUT_IMAGE_BYTES,
    SIGNATURE_IMAGES: INPUT_IMAGES,
    SIGNATURE_FEATURES: INPUT_FEATURES,
}
OUTPUT_CODES = "codes"
OUTPUT_PACKED_CODES = "packed_codes"
OUTPUT_KEYS = (OUTPUT_CODES, OUTPUT_PACKED_CODES)
DEFAULT_MODEL_NAME = "uhga"
# A code bit whose |logit| is below this is not compared between the
# SavedModel and the in-process reference: graph and eager float round-off
# may legitimately flip it.
FIRM_LOGIT = 1e-4
METADATA_FILENAME = "uhga_tf.json"
WARMUP_FILENAME = "tf_serving_warmup_requests"
ASSETS_EXTRA = "assets.extra"
TEMP_PREFIX = ".tmp-"
# Keys of <workdir>/config.json that `export_from_checkpoint` needs.
CHECKPOINT_CONFIG_KEYS = (
    "data.dataset",
    "model.backbone",
    "model.backbone_weights",
    "model.image_size",
    "model.code_length",
)
HASHER_FILENAME = "hasher.keras"
CONFIG_FILENAME = "config.json"

_VERSION_RE = re.compile(r"^[0-9]+$")
# TF-Serving's model_spec.version is an Int64Value.
MAX_VERSION = 2**63 - 1
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def list_versions(base_path):
    """Return the sorted integer versions under `base_path` (servable dirs).

    Only directories whose whole name is a non-negative integer count, as in
    TF-Serving's file-system source; temporary export directories and files
    are ignored. A missing base path has no versions.
    """
    try:
        names = os.listdir(base_path)
    except FileNotFoundError:
        return []
    return sorted(
        int(name)
        for name in names
        if _VERSION_RE.match(name)
        and int(name) <= MAX_VERSION
        and os.path.isdir(os.path.join(base_path, name))
    )


def preprocess_images(images, image_size):
    """Resize images to the backbone input (bilinear, no antialias).

    Args:
        images: uint8 or float [n, h, w, 3] RGB in [0, 255]; any h, w.
        image_size: side of the square backbone input, in pixels.

    Returns:
        float32 [n, image_size, image_size, 3] in [0, 255].
    """
    images = tf.cast(images, tf.float32)
    return tf.image.resize(
        images, [image_size, image_size], method="bilinear", antialias=False
    )


def decode_image_bytes(image_bytes, image_size):
    """Decode a batch of encoded images and resize each to `image_size`.

    Args:
        image_bytes: string [n]; JPEG, PNG, GIF (first frame) or BMP.
        image_size: side of the square backbone input, in pixels.

    Returns:
        float32 [n, image_size, image_size, 3] RGB in [0, 255]; grey and
        RGBA inputs are converted to 3 channels.
    """

    def decode_one(encoded):
        image = tf.io.decode_image(
            encoded, channels=3, expand_animations=False, dtype=tf.uint8
        )
        return preprocess_images(image[tf.newaxis], image_size)[0]

    return tf.map_fn(
        decode_one,
        image_bytes,
        fn_output_signature=tf.TensorSpec(
            [image_size, image_size, 3], tf.float32
        ),
    )


def binarize_tf(logits):
    """In-graph twin of `codes.binarize`: int8, `>= 0 -> +1`, else -1.

    `logits` is the hasher's pre-activation z; sign(z) equals
    sign(tanh(s * z)), so the relaxed codes give the same bits.
    """
    return tf.where(
        logits >= 0, tf.constant(1, tf.int8), tf.constant(-1, tf.int8)
    )


def pack_codes_tf(codes):
    """In-graph twin of `codes.pack_codes` (`np.packbits` order, pad 0).

    Args:
        codes: int8 [n, code_length] in {-1, +1}, code_length static.

    Returns:
        uint8 [n, ceil(code_length / 8)].
    """
    code_length = codes.shape[-1]
    if code_length is None:
        raise ValueError("codes must have a static code_length")
    num_bytes = -(-code_length // 8)
    bits = tf.cast(codes > 0, tf.int32)
    pad = num_bytes * 8 - code_length
    if pad:
        bits = tf.pad(bits, [[0, 0], [0, pad]])
    bits = tf.reshape(bits, [-1, num_bytes, 8])
    packed = tf.reduce_sum(bits * tf.constant(_BIT_WEIGHTS, tf.int32), -1)
    return tf.cast(packed, tf.uint8)


def encode_in_process(backbone, hasher, images, image_size):
    """Encode uint8 images eagerly, as the `encode_images` signature does.

    The reference that tests and the export check compare the SavedModel
    against: preprocessing, backbone, hasher, then `codes.binarize`.

    Returns:
        (codes int8 [n, code_length] in {-1, +1}, logits float32
        [n, code_length]) where `logits` is the hasher's pre-activation z
        (not the relaxed codes tanh(s * z)); codes = binarize(logits).
    """
    pixels = preprocess_images(images, image_size)
    features = backbone(pixels, training=False)
    logits = np.asarray(hasher(features, training=False), np.float32)
    return codes_lib.binarize(logits), logits


def _probe_dims(backbone, hasher, image_size):
    """Return (feature_dim, code_length) by running each model once."""
    features = backbone(
        tf.zeros([1, image_size, image_size, 3], tf.float32), training=False
    )
    if len(features.shape) != 2:
        raise ValueError(
            "backbone must map [n, image_size, image_size, 3] to features "
            f"[n, feature_dim]; received output shape {features.shape}"
        )
    logits = hasher(features, training=False)
    if len(logits.shape) != 2:
        raise ValueError(
            "hasher must map features [n, feature_dim] to [n, code_length]; "
            f"received output shape {logits.shape}"
        )
    return int(features.shape[-1]), int(logits.shape[-1])


# TF's rule for the root scope names the SavedModel writer gives variables.
_SCOPE_RE = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$")


def _exportable(model):
    """Return `model`, or a clone whose layer names TF can save.

    tf.saved_model rejects variables whose names start with "_" (layer names
    copied from torch state-dict keys such as "_blocks.0._bn0"). The clone
    strips the leading underscores and carries the same weights.
    """
    bad = [
        layer.name
        for layer in model._flatten_layers(include_self=False)
        if layer.weights and not _SCOPE_RE.match(layer.name)
    ]
    if not bad:
        return model
    logging.warning(
        "Renaming %d layers of %s for the SavedModel (e.g. %s -> %s)",
        len(bad),
        model.name,
        bad[0],
        bad[0].lstrip("_"),
    )

    def clone_layer(layer):
        config = layer.get_config()
        if not _SCOPE_RE.match(config.get("name", "x")):
            config["name"] = config["name"].lstrip("_") or "layer"
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


def _build_archive(backbone, hasher, image_size, feature_dim):
    """Build a `keras.export.ExportArchive` with the three signatures."""
    archive = keras.export.ExportArchive()
    archive.track(backbone)
    archive.track(hasher)

    def from_features(features):
        codes = binarize_tf(hasher(features, training=False))
        return {
            OUTPUT_CODES: codes,
            OUTPUT_PACKED_CODES: pack_codes_tf(codes),
        }

    def from_pixels(pixels):
        return from_features(backbone(pixels, training=False))

    def serving_default(image_bytes):
        return from_pixels(decode_image_bytes(image_bytes, image_size))

    def encode_images(images):
        return from_pixels(preprocess_images(images, image_size))

    def encode_features(features):
        return from_features(features)

    archive.add_endpoint(
        SIGNATURE_IMAGE_BYTES,
        serving_default,
        input_signature=[
            tf.TensorSpec([None], tf.string, name=INPUT_IMAGE_BYTES)
        ],
    )
    archive.add_endpoint(
        SIGNATURE_IMAGES,
        encode_images,
        input_signature=[
            tf.TensorSpec(
                [None, None, None, 3], tf.uint8, name=INPUT_IMAGES
            )
        ],
    )
    archive.add_endpoint(
        SIGNATURE_FEATURES,
        encode_features,
        input_signature=[
            tf.TensorSpec(
                [None, feature_dim], tf.float32, name=INPUT_FEATURES
            )
        ],
    )
    return archive


def synthetic_warmup_images(num_images=3, seed=0):
    """Return a few seeded encoded test images (PNG and JPEG, mixed sizes).

    Used for warm-up records when no real images are given.
    """
    rng = np.random.default_rng(seed)
    encoded = []
    for i in range(num_images):
        height, width = 48 + 16 * i, 64 - 8 * i
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        if i % 2:
            encoded.append(tf.io.encode_jpeg(pixels, quality=90).numpy())
        else:
            encoded.append(tf.io.encode_png(pixels).numpy())
    return encoded


def write_warmup_requests(
    path, image_bytes_list, model_name=DEFAULT_MODEL_NAME
):
    """Write TF-Serving warm-up records: one PredictionLog per image.

    Each record is a `PredictionLog` whose `predict_log.request` is a
    `PredictRequest` for `serving_default` with a one-image `image_bytes`.
    """
    # Imported here so that encoding images never needs the serving protos.
    from tensorflow_serving.apis import model_pb2
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_log_pb2

    with tf.io.TFRecordWriter(path) as writer:
        for encoded in image_bytes_list:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(
                    name=model_name, signature_name=SIGNATURE_IMAGE_BYTES
                )
            )
            request.inputs[INPUT_IMAGE_BYTES].CopyFrom(
                tf.make_tensor_proto([encoded], dtype=tf.string)
            )
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def read_warmup_requests(path):
    """Parse a warm-up file back into a list of `PredictRequest` protos."""
    from tensorflow_serving.apis import prediction_log_pb2

    requests = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        requests.append(log.predict_log.request)
    return requests


def git_sha():
    """Return the git commit of the source tree, or None outside a repo."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def check_version(version):
    """Refuse a version TF-Serving could not address (ValueError)."""
    if (
        isinstance(version, bool)
        or not isinstance(version, (int, np.integer))
        or not 1 <= version <= MAX_VERSION
    ):
        raise ValueError(
            f"version must be an integer in [1, {MAX_VERSION}] (int64, as "
            f"model_spec.version); received version={version!r}"
        )


def check_warmup_images(warmup_images):
    """Refuse warm-up images the server would refuse (ValueError).

    The same header checks as `uhga_tf.serving.request_checks`: JPEG, PNG,
    GIF or BMP, within the default pixel limit.
    """
    from uhga_tf.serving import request_checks

    limits = request_checks.RequestLimits()
    total = 0
    for i, encoded in enumerate(warmup_images):
        try:
            total += request_checks.check_encoded_image(
                bytes(encoded), f"warmup_images[{i}]", limits
            )
        except request_checks.RequestError as e:
            raise ValueError(
                f"{e.message}; expected what the server accepts"
            ) from e
    if total > limits.max_request_pixels:
        raise ValueError(
            f"warmup_images hold {total} pixels, over max_request_pixels="
            f"{limits.max_request_pixels}"
        )


def _next_version(export_dir):
    versions = list_versions(export_dir)
    return versions[-1] + 1 if versions else 1


def _check_reloaded(path, checks):
    """Reload the SavedModel at `path` and compare every signature.

    Args:
        checks: {signature_name: (input_array, expected_codes, logits)};
            a code bit whose |logit| < FIRM_LOGIT is not compared (graph
            and eager float round-off may legitimately flip it).

    Raises:
        RuntimeError: when a signature is missing or its codes differ.
    """
    loaded = tf.saved_model.load(path)
    missing = set(SIGNATURE_INPUTS) - set(loaded.signatures)
    if missing:
        raise RuntimeError(
            f"exported SavedModel lacks signatures {sorted(missing)}"
        )
    for name, (inputs, expected, logits) in checks.items():
        fn = loaded.signatures[name]
        outputs = fn(**{SIGNATURE_INPUTS[name]: tf.constant(inputs)})
        got = outputs[OUTPUT_CODES].numpy()
        packed = outputs[OUTPUT_PACKED_CODES].numpy()
        if got.dtype != np.int8 or packed.dtype != np.uint8:
            raise RuntimeError(
                f"signature {name} returned dtypes {got.dtype}, "
                f"{packed.dtype}; expected int8, uint8"
            )
        if not np.array_equal(
            codes_lib.unpack_codes(packed, got.shape[1]), got
        ):
            raise RuntimeError(f"signature {name}: packed_codes != codes")
        if expected is None:
            continue
        firm = np.abs(logits) >= FIRM_LOGIT
        if got.shape != expected.shape or not np.array_equal(
            got[firm], expected[firm]
        ):
            raise RuntimeError(
                f"signature {name} codes differ from the in-process codes"
            )


def _checked_image_size(image_size):
    """Return `image_size` as an int, or raise ValueError."""
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, (int, np.integer))
        or image_size < 1
    ):
        raise ValueError(
            f"image_size must be a positive integer; received "
            f"image_size={image_size!r}"
        )
    return int(image_size)


def _new_version_path(export_dir, version):
    """Check `export_dir` and `version`; return (version, target path).

    Creates `export_dir` if needed; refuses a file there or an existing
    version directory (ValueError).
    """
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ValueError(
            f"export_dir ({export_dir}) is a file: expected a folder of "
            "versions"
        )
    if version is None:
        version = _next_version(export_dir)
    check_version(version)
    version = int(version)
    return version, os.path.join(export_dir, str(version))


def _reference_checks(backbone, hasher, warmup_images, image_size):
    """In-process reference codes for the reload check, per signature.

    Returns:
        {signature_name: (input_array, expected_codes, logits)} as
        `_check_reloaded` takes it; `encode_images` gets the first image's
        pixels, the other two all warm-up images (as bytes or features).
    """
    decoded = decode_image_bytes(tf.constant(warmup_images), image_size)
    features = backbone(decoded, training=False)
    logits = np.asarray(hasher(features, training=False), np.float32)
    codes = codes_lib.binarize(logits)
    pixels = np.stack(
        [
            tf.io.decode_image(b, channels=3, expand_animations=False).numpy()
            for b in warmup_images[:1]
        ]
    )
    codes_pixels, logits_pixels = encode_in_process(
        backbone, hasher, pixels, image_size
    )
    return {
        SIGNATURE_IMAGE_BYTES: (
            np.array(warmup_images, dtype=object), codes, logits
        ),
        SIGNATURE_IMAGES: (pixels, codes_pixels, logits_pixels),
        SIGNATURE_FEATURES: (np.asarray(features, np.float32), codes, logits),
    }


def _export_info(backbone, code_length, feature_dim, image_size, version):
    """The `uhga_tf.json` fields every export writes (before `metadata`)."""
    return {
        "code_length": code_length,
        "feature_dim": feature_dim,
        "image_size": image_size,
        "backbone": getattr(backbone, "name", None),
        "version": version,
        "signatures": {
            name: {"input": key, "outputs": list(OUTPUT_KEYS)}
            for name, key in SIGNATURE_INPUTS.items()
        },
        "code_format": (
            "codes int8 in {-1,+1} (>= 0 -> +1); packed_codes uint8 in "
            "np.packbits order"
        ),
        "git_sha": git_sha(),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc)
        .replace(microsecond=0)
        .isoformat(),
    }


def _write_extras(directory, info, warmup_images):
    """Write `assets.extra/` (metadata JSON, warm-up records) in `directory`."""
    extra = os.path.join(directory, ASSETS_EXTRA)
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, METADATA_FILENAME), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True, default=str)
    write_warmup_requests(
        os.path.join(extra, WARMUP_FILENAME),
        warmup_images,
        model_name=str(info.get("model_name", DEFAULT_MODEL_NAME)),
    )


def _write_version(archive, target, info, warmup_images, checks):
    """Write, check and move a version into place as one directory rename.

    The SavedModel is a folder, so `io_utils.atomic_path` (one file) does
    not fit: the archive goes to a `.tmp-<version>-<random>` folder beside
    `target`, is reloaded and checked, then renamed; on any failure the
    temporary folder is removed and `target` never appears.
    """
    export_dir = os.path.dirname(target)
    version = os.path.basename(target)
    temp = os.path.join(
        export_dir, f"{TEMP_PREFIX}{version}-{secrets.token_hex(4)}"
    )
    renamed = False
    try:
        archive.write_out(temp, verbose=False)
        _write_extras(temp, info, warmup_images)
        _check_reloaded(temp, checks)
        if os.path.exists(target):
            raise ValueError(
                f"version {version} appeared at {target} during the export; "
                "refusing to overwrite it"
            )
        os.rename(temp, target)
        renamed = True
    finally:
        if not renamed:
            shutil.rmtree(temp, ignore_errors=True)


def export_saved_model(
    backbone,
    hasher,
    export_dir,
    *,
    image_size,
    version=None,
    metadata=None,
    warmup_images=None,
):
    """Export backbone + hasher + sign as a versioned, verified SavedModel.

    Args:
        backbone: keras.Model, float32 [n, image_size, image_size, 3] RGB in
            [0, 255] -> features float32 [n, feature_dim].
        hasher: keras.Model, features -> logits (pre-activation z)
            [n, code_length].
        export_dir: base path; the model goes to `<export_dir>/<version>/`.
        image_size: side of the square backbone input, in pixels.
        version: positive integer; default one more than the newest version.
        metadata: extra JSON-serialisable fields for `uhga_tf.json`
            (backbone name, training data, config, ...).
        warmup_images: encoded JPEG/PNG bytes for the warm-up records and the
            reload check; default three seeded synthetic images.

    Returns:
        The path of the new version directory.

    Raises:
        ValueError: for a bad `image_size`/`version`, or when the version
            directory already exists.
    """
    image_size = _checked_image_size(image_size)
    version, target = _new_version_path(export_dir, version)
    if warmup_images is not None:
        check_warmup_images(warmup_images)
    os.makedirs(export_dir, exist_ok=True)
    if os.path.exists(target):
        raise ValueError(
            f"version {version} already exists at {target}; refusing to "
            "overwrite it (omit --version to use the next one)"
        )
    if warmup_images is None:
        warmup_images = synthetic_warmup_images()
    warmup_images = [bytes(b) for b in warmup_images]
    if not warmup_images:
        raise ValueError("warmup_images must hold at least one image")

    feature_dim, code_length = _probe_dims(backbone, hasher, image_size)
    # References come from the given models, so the reload check also
    # covers any renaming clone `_exportable` makes.
    checks = _reference_checks(backbone, hasher, warmup_images, image_size)
    info = _export_info(
        backbone, code_length, feature_dim, image_size, version
    )
    info.update(metadata or {})
    archive = _build_archive(
        _exportable(backbone), _exportable(hasher), image_size, feature_dim
    )
    _write_version(archive, target, info, warmup_images, checks)
    logging.info(
        "Exported code_length=%d image_size=%d to %s",
        code_length,
        image_size,
        target,
    )
    return target


def read_checkpoint_config(checkpoint_dir):
    """Read `<checkpoint_dir>/config.json`; return the fields export needs.

    Returns:
        (config dict, {dotted key: value} for CHECKPOINT_CONFIG_KEYS).

    Raises:
        FileNotFoundError: when config.json or hasher.keras is missing.
        ValueError: naming the first missing or malformed key.
    """
    path = os.path.join(checkpoint_dir, CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILENAME} in {checkpoint_dir}")
    config = config_lib.read_json(path)
    values = {}
    for key in CHECKPOINT_CONFIG_KEYS:
        node = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{path} lacks the key {key!r}")
            node = node[part]
        values[key] = node
    codes_lib.check_code_length(values["model.code_length"])
    image_size = values["model.image_size"]
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(
            f"{path}: model.image_size must be an integer; received "
            f"{image_size!r}"
        )
    hasher_path = os.path.join(checkpoint_dir, HASHER_FILENAME)
    if not os.path.isfile(hasher_path):
        raise FileNotFoundError(f"no {HASHER_FILENAME} in {checkpoint_dir}")
    if not zipfile.is_zipfile(hasher_path):
        raise ValueError(_damaged_hasher(hasher_path))
    return config, values


def _damaged_hasher(path):
    # Keras calls any file that is not a zip archive "File not found",
    # which misleads when the file is there but truncated or overwritten.
    return (
        f"{path} is damaged (not a readable .keras zip archive); expected "
        "the hasher.keras that uhga_tf.train writes: re-run or resume "
        "training"
    )


def _load_hasher(checkpoint_dir):
    """Load `hasher.keras`; a damaged archive is named as damaged."""
    path = os.path.join(checkpoint_dir, HASHER_FILENAME)
    try:
        return keras.saving.load_model(path)
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(
            f"{_damaged_hasher(path)} ({type(e).__name__}: {e})"
        ) from e


def export_from_checkpoint(
    checkpoint_dir,
    export_dir,
    *,
    version=None,
    warmup_images=None,
    model_name=DEFAULT_MODEL_NAME,
):
    """Export a training workdir (config.json + hasher.keras) as a version.

    Frozen-backbone runs: builds the backbone named in the config with
    `uhga_tf.models.backbone.build_backbone`, loads the hasher (features ->
    z) with `keras.saving.load_model` and calls `export_saved_model`.
    End-to-end runs (`model.trainable_backbone` true in config.json):
    `hasher.keras` is the whole fine-tuned images -> z network; its
    backbone and hash head (`hash_layer.split_image_hasher`) are exported,
    so `encode_features` takes the fine-tuned backbone's features.

    Returns:
        The path of the new version directory.
    """
    # Refuse what serving would refuse before anything is loaded or written.
    config_lib.check_writable_dir(export_dir, "export_dir")
    if version is not None:
        check_version(version)
    if warmup_images is not None:
        check_warmup_images(warmup_images)
    config, values = read_checkpoint_config(checkpoint_dir)
    # Registers the hash layer classes before the hasher is deserialised.
    from uhga_tf.models import backbone as backbone_lib
    from uhga_tf.models import hash_layer

    trainable_backbone = bool(
        config.get("model", {}).get("trainable_backbone", False)
    )
    if trainable_backbone:
        backbone, hasher = hash_layer.split_image_hasher(
            _load_hasher(checkpoint_dir)
        )
        image_size = int(backbone.input_shape[1])
    else:
        backbone = backbone_lib.build_backbone(
            values["model.backbone"],
            weights=values["model.backbone_weights"],
            image_size=values["model.image_size"],
        )
        hasher = _load_hasher(checkpoint_dir)
        image_size = values["model.image_size"]
    _, code_length = _probe_dims(backbone, hasher, image_size)
    if code_length != values["model.code_length"]:
        raise ValueError(
            f"the hasher in {checkpoint_dir} emits code_length={code_length} "
            f"but config.json says model.code_length="
            f"{values['model.code_length']}"
        )
    metadata = {
        "backbone": values["model.backbone"],
        "backbone_weights": (
            "fine-tuned (hasher.keras)" if trainable_backbone
            else values["model.backbone_weights"]
        ),
        "trainable_backbone": trainable_backbone,
        "training_data": values["data.dataset"],
        "checkpoint": os.path.abspath(checkpoint_dir),
        "model_name": model_name,
        "config": config,
    }
    return export_saved_model(
        backbone,
        hasher,
        export_dir,
        image_size=image_size,
        version=version,
        metadata=metadata,
        warmup_images=warmup_images,
    )
