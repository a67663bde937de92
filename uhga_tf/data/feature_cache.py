"""Backbone features cached on disk, keyed by everything that determines them.

A cache entry is two files in `cache_dir`:

* `features-<fp16>.npz`: the array under the name "features" (uncompressed,
  so a 60,000 x 1280 float32 array reloads in about a second);
* `features-<fp16>.json`: the sidecar with the key, shape, dtype, the sha256
  of the array bytes and the uhga_tf version that wrote it.

`<fp16>` is the first 16 hex digits of the sha256 of `json.dumps(key,
sort_keys=True)`. Both files are written to a temporary file in the same
directory, fsync'ed and moved into place with `os.replace`, array first and
sidecar last; an entry is trusted only when the sidecar's key equals the
requested key and the array's shape, dtype and digest equal the sidecar's.
So a process killed mid-write, a truncated file or a stale entry is never
used: it is logged and recomputed.
"""

import hashlib
import importlib.metadata
import json
import os
import time
import weakref
import zipfile

import numpy as np
import tensorflow as tf
from absl import logging
from tqdm import tqdm

from uhga_tf import config
from uhga_tf import io_utils
from uhga_tf.data import image_decode
from uhga_tf.models import backbone as backbone_lib
from uhga_tf.models import lite_runtime

_ARRAY_NAME = "features"
_FORMAT_VERSION = 1

# backbone -> its traced predict step, so repeated extractions with one
# backbone (query, database, train sets) trace the graph once.
_PREDICT_STEPS = weakref.WeakKeyDictionary()
# backbone -> {batch size: LitePredictor}, converted once each.
_LITE_PREDICTORS = weakref.WeakKeyDictionary()

# Extraction batch per runtime: TFLite runs fastest at 64 on 2 cores.
BATCH_SIZES = {"tensorflow": 256, "tflite": 64}
# Largest difference from TensorFlow on the first batch, relative to the
# largest feature, before TFLite is trusted; rounding gives about 1e-5.
LITE_TOLERANCE = 1e-3


def _uhga_tf_version():
    try:
        return importlib.metadata.version("uhga_tf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def key_fingerprint(key):
    """Return the sha256 hex digest of `json.dumps(key, sort_keys=True)`.

    Raises:
        ValueError: when `key` is not a dict of JSON-serialisable values.
    """
    if not isinstance(key, dict):
        raise ValueError(
            f"key must be a dict of JSON values; received {type(key).__name__}"
            f" key={key!r}"
        )
    try:
        text = json.dumps(key, sort_keys=True)
    except TypeError as e:
        raise ValueError(
            f"key must hold only JSON-serialisable values; received key={key!r}"
        ) from e
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_paths(cache_dir, key):
    """Return (array path, sidecar path) of the cache entry for `key`."""
    base = os.path.join(
        os.fspath(cache_dir), f"features-{key_fingerprint(key)[:16]}"
    )
    return base + ".npz", base + ".json"


def _array_sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _write_durably(path, write_fn):
    """`io_utils.atomic_path` plus an fsync of the folder (durable rename)."""
    with io_utils.atomic_path(path) as tmp_path:
        with open(tmp_path, "wb") as f:
            write_fn(f)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _load_trusted(array_path, sidecar_path, key):
    """Return the cached array, or None (with a warning) if not trustworthy."""
    if not os.path.exists(array_path) and not os.path.exists(sidecar_path):
        return None
    try:
        with open(sidecar_path, encoding="utf-8") as f:
            sidecar = json.load(f)
        if json.dumps(sidecar.get("key"), sort_keys=True) != json.dumps(
            key, sort_keys=True
        ):
            raise ValueError(
                f"sidecar key {sidecar.get('key')!r} differs from the "
                f"requested key {key!r}"
            )
        with np.load(array_path, allow_pickle=False) as npz:
            array = npz[_ARRAY_NAME]
        if list(array.shape) != sidecar["shape"] or str(
            array.dtype
        ) != sidecar["dtype"]:
            raise ValueError(
                f"array is {array.dtype} {list(array.shape)}, sidecar says "
                f"{sidecar['dtype']} {sidecar['shape']}"
            )
        digest = _array_sha256(array)
        if digest != sidecar["sha256"]:
            raise ValueError(
                f"array sha256 {digest} differs from the sidecar's "
                f"{sidecar['sha256']}"
            )
    except (
        OSError, ValueError, KeyError, TypeError, EOFError,
        zipfile.BadZipFile, json.JSONDecodeError,
    ) as e:
        logging.warning(
            "Not trusting feature cache %s (%s: %s); recomputing",
            array_path, type(e).__name__, e,
        )
        return None
    return array


def load_or_compute(cache_dir, key, compute_fn):
    """Return the array cached under `key`, computing and caching it if needed.

    Args:
        cache_dir: directory of cache entries (created if missing).
        key: dict of JSON values that determines the array completely.
        compute_fn: no-argument callable returning the array.

    Returns:
        The cached or freshly computed numpy array.

    Raises:
        ValueError: `key` is not a JSON dict, or `compute_fn` returned
            something that is not a numeric array.
    """
    cache_dir = os.fspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    array_path, sidecar_path = cache_paths(cache_dir, key)
    start = time.perf_counter()
    array = _load_trusted(array_path, sidecar_path, key)
    if array is not None:
        logging.info(
            "Loaded cached features %s %s from %s in %.2f s", array.dtype,
            array.shape, array_path, time.perf_counter() - start,
        )
        return array
    array = compute_fn()
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise ValueError(
            "compute_fn must return a numeric numpy array; received "
            f"{type(array).__name__}"
            + (f" of dtype {array.dtype}" if hasattr(array, "dtype") else "")
        )
    array = np.ascontiguousarray(array)
    sidecar = {
        "key": key,
        "fingerprint": key_fingerprint(key),
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "sha256": _array_sha256(array),
        "uhga_tf_version": _uhga_tf_version(),
        "format_version": _FORMAT_VERSION,
        "created_unix_s": time.time(),
    }
    _write_durably(
        array_path, lambda f: np.savez(f, **{_ARRAY_NAME: array})
    )
    _write_durably(
        sidecar_path,
        lambda f: f.write(
            json.dumps(sidecar, sort_keys=True, indent=1).encode("utf-8")
        ),
    )
    logging.info(
        "Cached features %s %s to %s", array.dtype, array.shape, array_path
    )
    return array


def _predict_step(backbone):
    step = _PREDICT_STEPS.get(backbone)
    if step is None:

        @tf.function(reduce_retracing=True)
        def step(images):
            return tf.cast(backbone(images, training=False), tf.float32)

        _PREDICT_STEPS[backbone] = step
    return step


def _checked_lite_predictor(backbone, batch, predict_step):
    """The TFLite predictor, once its first batch matched TensorFlow's.

    Raises:
        ValueError: TFLite is missing, cannot convert the backbone, or its
            features differ from TensorFlow's by more than rounding.
    """
    batch_size = int(batch.shape[0])
    per_size = _LITE_PREDICTORS.setdefault(backbone, {})
    if batch_size in per_size:
        return per_size[batch_size]
    try:
        lite = lite_runtime.LitePredictor(backbone, batch_size)
    except RuntimeError as e:
        raise ValueError(f"feature_runtime='tflite': {e}") from e
    expected = predict_step(batch).numpy()
    scale = max(float(np.abs(expected).max()), 1.0)
    error = float(np.abs(lite(batch.numpy()) - expected).max())
    if not error <= LITE_TOLERANCE * scale:  # also catches NaN
        raise ValueError(
            f"feature_runtime='tflite': TFLite features differ from "
            f"TensorFlow's by {error:.3g} (largest feature {scale:.3g}) on "
            "the first batch; use feature_runtime='tensorflow'"
        )
    per_size[batch_size] = lite
    return lite


def extract_features(
    backbone, dataset, num_examples, progress=True, runtime="tensorflow",
):
    """Run `backbone` over `dataset` in inference mode.

    Args:
        backbone: `keras.Model` images -> features `[b, D]`.
        dataset: `tf.data.Dataset` of float32 `[b, S, S, 3]` batches (or
            tuples whose first element is that).
        num_examples: how many images the dataset yields in total.
        progress: show a tqdm bar in images/s.
        runtime: `tensorflow` (a tf.function) or `tflite` (the backbone
            converted to TFLite, XNNPACK kernels: about twice as fast on
            CPU, equal up to float rounding; see `lite_runtime`). TFLite's
            first batch is checked against TensorFlow's.

    Returns:
        features: float32 `[num_examples, D]` in dataset order.

    Raises:
        ValueError: when the dataset yields a different number of images,
            for an unknown runtime, or when TFLite cannot run the backbone.
    """
    num_examples = int(num_examples)
    if num_examples < 0:
        raise ValueError(
            f"num_examples must be >= 0; received num_examples={num_examples}"
        )
    config.check_choice("runtime", runtime, config.FEATURE_RUNTIMES)

    predict_step = _predict_step(backbone)
    feature_dim = backbone.output_shape[-1]
    features = np.empty((num_examples, feature_dim), np.float32)
    count = 0
    lite = None
    with tqdm(
        total=num_examples, unit="img", disable=not progress,
        desc="features", dynamic_ncols=True,
    ) as bar:
        for batch in dataset:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            if runtime == "tflite" and lite is None:
                # The first batch is the largest: convert for its size.
                lite = _checked_lite_predictor(backbone, batch, predict_step)
            if lite is not None:
                batch_features = lite(batch.numpy())
            else:
                batch_features = predict_step(batch).numpy()
            n = batch_features.shape[0]
            if count + n > num_examples:
                raise ValueError(
                    f"dataset yields more than num_examples={num_examples} "
                    "images"
                )
            features[count:count + n] = batch_features
            count += n
            bar.update(n)
    if count != num_examples:
        raise ValueError(
            f"dataset yielded {count} images; expected num_examples="
            f"{num_examples}"
        )
    return features


def feature_cache_key(
    image_dataset, indices, backbone_name, backbone_weights="default",
    image_size=None, runtime="tensorflow",
):
    """Return the cache key of `load_or_extract_features` (a JSON dict)."""
    if backbone_name not in backbone_lib.BACKBONES:
        raise ValueError(
            f"unknown backbone; received backbone_name={backbone_name!r}, "
            f"expected one of {sorted(backbone_lib.BACKBONES)}"
        )
    config.check_choice("runtime", runtime, config.FEATURE_RUNTIMES)
    spec = backbone_lib.BACKBONES[backbone_name]
    indices = np.asarray(indices)
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise ValueError(
            "indices must be a 1-D integer array; received "
            f"{indices.dtype} array of shape {indices.shape}"
        )
    indices = indices.astype("<i8")
    size = spec.default_image_size if image_size is None else int(image_size)
    key = {
        "dataset": str(image_dataset.name),
        "source": str(image_dataset.source),
        "num_indices": int(indices.size),
        "indices_sha256": hashlib.sha256(indices.tobytes()).hexdigest(),
        "backbone": backbone_name,
        "backbone_fingerprint": backbone_lib.backbone_fingerprint(
            backbone_name, backbone_weights, size
        ),
        "image_size": size,
        "preprocessing": spec.preprocessing,
        "feature_layer": spec.feature_layer,
        "format_version": _FORMAT_VERSION,
    }
    if runtime != "tensorflow":  # keys of TensorFlow features predate this
        key["runtime"] = runtime
    images = getattr(image_dataset, "images", None)
    if getattr(image_dataset, "paths", None) is not None or (
            images is not None and max(images.shape[1:3]) > size):
        # Files are decoded upright by their EXIF orientation, and images
        # larger than the input are shrunk with an antialiasing filter
        # (`image_decode`); features cached before either are not reused.
        # CIFAR-10's and Fashion-MNIST's arrays only grow, as before.
        key["decode"] = image_decode.DECODE
    return key


def load_or_extract_features(
    image_dataset, indices, *, backbone_name,
    backbone_weights="default", image_size=None, cache_dir, batch_size=None,
    progress=True, runtime="tensorflow",
):
    """Backbone features of `image_dataset[indices]`, cached on disk.

    Args:
        image_dataset: object with `.name`, `.source`, `.num_examples` and
            `.to_tf_dataset(indices, image_size, batch_size)` yielding float32
            `[b, S, S, 3]` RGB in [0, 255] in `indices` order.
        indices: int array `[N]` of example indices.
        backbone_name, backbone_weights, image_size: as in
            `uhga_tf.models.backbone.build_backbone`.
        cache_dir: directory of the cache.
        batch_size: extraction batch size (not part of the key); None
            means `BATCH_SIZES[runtime]`. TensorFlow's features move by
            float rounding (3e-6 at 160 px) with the batch size, so its
            default stays the 256 that the stored results used.
        progress: show a tqdm bar while extracting.
        runtime: as in `extract_features`. The runtimes agree up to float
            rounding, which can still move what is computed from the
            features (a sign, an iteration of ITQ), so `tflite` features
            are cached under their own key.

    Returns:
        features: float32 `[N, D]`, row i for `indices[i]`.
    """
    indices = np.asarray(indices)
    key = feature_cache_key(
        image_dataset, indices, backbone_name, backbone_weights, image_size,
        runtime,
    )
    if batch_size is None:
        batch_size = BATCH_SIZES[runtime]
    num_examples = int(image_dataset.num_examples)
    if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
        raise ValueError(
            f"indices must lie in [0, {num_examples}) for dataset "
            f"{image_dataset.name!r}; received range [{indices.min()}, "
            f"{indices.max()}]"
        )

    def compute():
        backbone = backbone_lib.build_backbone(
            backbone_name, backbone_weights, key["image_size"]
        )
        dataset = image_dataset.to_tf_dataset(
            indices, key["image_size"], batch_size
        )
        logging.info(
            "Extracting %s features of %d %s images at %d px",
            backbone_name, indices.size, image_dataset.name,
            key["image_size"],
        )
        return extract_features(
            backbone, dataset, indices.size, progress, runtime
        )

    return load_or_compute(cache_dir, key, compute)
