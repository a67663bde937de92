"""Export backbone + hasher + sign as a versioned, verified SavedModel.

A model is written to `<export_dir>/<version>/` by way of a temporary
directory beside it (named `.tmp-<version>-<random>`, never an integer, so
TF-Serving and `uhga_tf.serving.server` ignore it), reloaded once with
`tf.saved_model.load` and checked against `graph.encode_in_process`, then
moved into place with one `os.rename`. A poller of the base path therefore
never sees a half-written version; an export killed before the rename
leaves only a temporary directory, which the next export does not reuse.
"""

import datetime
import json
import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from uhga_tf import codes as codes_lib
from uhga_tf import io_utils
from uhga_tf import provenance
from uhga_tf.data import image_decode
from uhga_tf.saved_model import graph
from uhga_tf.saved_model import versions
from uhga_tf.saved_model import warmup
from uhga_tf.saved_model import wire_names

# A code bit whose |logit| is below this is not compared between the
# SavedModel and the in-process reference: graph and eager float round-off
# may legitimately flip it.
FIRM_LOGIT = 1e-4


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
    missing = set(wire_names.SIGNATURE_INPUTS) - set(loaded.signatures)
    if missing:
        raise RuntimeError(
            f"exported SavedModel lacks signatures {sorted(missing)}"
        )
    for name, (inputs, expected, logits) in checks.items():
        fn = loaded.signatures[name]
        input_name = wire_names.SIGNATURE_INPUTS[name]
        outputs = fn(**{input_name: tf.constant(inputs)})
        got = outputs[wire_names.OUTPUT_CODES].numpy()
        packed = outputs[wire_names.OUTPUT_PACKED_CODES].numpy()
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
        version = versions.next_version(export_dir)
    versions.check_version(version)
    version = int(version)
    return version, os.path.join(export_dir, str(version))


def _reference_checks(backbone, hasher, warmup_images, image_size):
    """In-process reference codes for the reload check, per signature.

    Returns:
        {signature_name: (input_array, expected_codes, logits)} as
        `_check_reloaded` takes it; `encode_images` gets the first image's
        pixels, the other two all warm-up images (as bytes or features).
    """
    decoded = graph.decode_image_bytes(
        tf.constant(warmup_images), image_size
    )
    features = backbone(decoded, training=False)
    logits = np.asarray(hasher(features, training=False), np.float32)
    codes = codes_lib.binarize(logits)
    pixels = np.stack(
        [
            image_decode.decode_upright(b).numpy()
            for b in warmup_images[:1]
        ]
    )
    codes_pixels, logits_pixels = graph.encode_in_process(
        backbone, hasher, pixels, image_size
    )
    return {
        wire_names.SIGNATURE_IMAGE_BYTES: (
            np.array(warmup_images, dtype=object), codes, logits
        ),
        wire_names.SIGNATURE_IMAGES: (pixels, codes_pixels, logits_pixels),
        wire_names.SIGNATURE_FEATURES: (
            np.asarray(features, np.float32), codes, logits
        ),
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
            name: {"input": key, "outputs": list(wire_names.OUTPUT_KEYS)}
            for name, key in wire_names.SIGNATURE_INPUTS.items()
        },
        "code_format": (
            "codes int8 in {-1,+1} (>= 0 -> +1); packed_codes uint8 in "
            "np.packbits order"
        ),
        "git_sha": provenance.git_sha(),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc)
        .replace(microsecond=0)
        .isoformat(),
    }


def _write_extras(directory, info, warmup_images):
    """Write `assets.extra/` (metadata JSON, warm-up records) in `directory`."""
    extra = os.path.join(directory, wire_names.ASSETS_EXTRA)
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, wire_names.METADATA_FILENAME), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True, default=str)
    warmup.write_warmup_requests(
        os.path.join(extra, wire_names.WARMUP_FILENAME),
        warmup_images,
        model_name=str(
            info.get("model_name", wire_names.DEFAULT_MODEL_NAME)
        ),
    )


def _write_version(archive, target, info, warmup_images, checks):
    """Write, check and move a version into place as one folder rename.

    The archive goes to a `.tmp-<version>-*` folder beside `target` (the
    version poller skips that prefix), is reloaded and checked, then
    renamed; on any failure `target` never appears.
    """
    version = os.path.basename(target)
    prefix = f"{versions.TEMP_PREFIX}{version}-"
    with io_utils.atomic_directory(target, prefix=prefix) as temp:
        archive.write_out(temp, verbose=False)
        _write_extras(temp, info, warmup_images)
        _check_reloaded(temp, checks)
        if os.path.exists(target):
            raise ValueError(
                f"version {version} appeared at {target} during the export; "
                "refusing to overwrite it"
            )


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
        warmup.check_warmup_images(warmup_images)
    os.makedirs(export_dir, exist_ok=True)
    if os.path.exists(target):
        raise ValueError(
            f"version {version} already exists at {target}; refusing to "
            "overwrite it (omit --version to use the next one)"
        )
    if warmup_images is None:
        warmup_images = warmup.synthetic_warmup_images()
    warmup_images = [bytes(b) for b in warmup_images]
    if not warmup_images:
        raise ValueError("warmup_images must hold at least one image")

    feature_dim, code_length = graph.probe_dims(backbone, hasher, image_size)
    # References come from the given models, so the reload check also
    # covers any renaming clone `_exportable` makes.
    checks = _reference_checks(backbone, hasher, warmup_images, image_size)
    info = _export_info(
        backbone, code_length, feature_dim, image_size, version
    )
    info.update(metadata or {})
    archive = graph.build_archive(
        graph.exportable(backbone),
        graph.exportable(hasher),
        image_size,
        feature_dim,
    )
    _write_version(archive, target, info, warmup_images, checks)
    logging.info(
        "Exported code_length=%d image_size=%d to %s",
        code_length,
        image_size,
        target,
    )
    return target
