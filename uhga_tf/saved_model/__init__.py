"""The exported SavedModel: image bytes or pixels in, binary codes out.

Three named signatures share one graph (`graph.py`):

| signature         | input                                      |
|-------------------|--------------------------------------------|
| `serving_default` | `image_bytes`: string [None] (encoded)     |
| `encode_images`   | `images`: uint8 [None, None, None, 3]      |
| `encode_features` | `features`: float32 [None, feature_dim]    |

Each returns `codes` (int8 [None, code_length] in {-1, +1}) and
`packed_codes` (uint8 [None, ceil(code_length / 8)], `np.packbits` order),
bit for bit what `codes.binarize` / `codes.pack_codes` give in process.

Modules:
* `wire_names`: signature, input and output names (no TensorFlow);
* `versions`: the `<export_dir>/<version>/` layout (no TensorFlow);
* `graph`: decoding, resizing, the serving graph and its eager reference;
* `warmup`: TF-Serving warm-up records in `assets.extra/`;
* `export`: `export_saved_model` (write, reload, check, rename);
* `checkpoint`: `export_from_checkpoint` for a training workdir.

The wire names are imported here eagerly; every other public name loads its
module (and TensorFlow) on first use, so `from uhga_tf import saved_model`
and `saved_model.DEFAULT_MODEL_NAME` stay light for clients and flags.
"""

import importlib

from uhga_tf.saved_model.wire_names import ASSETS_EXTRA
from uhga_tf.saved_model.wire_names import DEFAULT_MODEL_NAME
from uhga_tf.saved_model.wire_names import INPUT_FEATURES
from uhga_tf.saved_model.wire_names import INPUT_IMAGE_BYTES
from uhga_tf.saved_model.wire_names import INPUT_IMAGES
from uhga_tf.saved_model.wire_names import METADATA_FILENAME
from uhga_tf.saved_model.wire_names import OUTPUT_CODES
from uhga_tf.saved_model.wire_names import OUTPUT_KEYS
from uhga_tf.saved_model.wire_names import OUTPUT_PACKED_CODES
from uhga_tf.saved_model.wire_names import SIGNATURE_FEATURES
from uhga_tf.saved_model.wire_names import SIGNATURE_IMAGE_BYTES
from uhga_tf.saved_model.wire_names import SIGNATURE_IMAGES
from uhga_tf.saved_model.wire_names import SIGNATURE_INPUTS
from uhga_tf.saved_model.wire_names import WARMUP_FILENAME

# Public name -> the submodule that defines it (loaded on first use).
_LAZY = {
    "MAX_VERSION": "versions",
    "TEMP_PREFIX": "versions",
    "check_version": "versions",
    "list_versions": "versions",
    "decode_image_bytes": "graph",
    "encode_in_process": "graph",
    "preprocess_images": "graph",
    "check_warmup_images": "warmup",
    "read_warmup_requests": "warmup",
    "synthetic_warmup_images": "warmup",
    "write_warmup_requests": "warmup",
    "FIRM_LOGIT": "export",
    "export_saved_model": "export",
    "CHECKPOINT_CONFIG_KEYS": "checkpoint",
    "export_from_checkpoint": "checkpoint",
}

__all__ = [
    "ASSETS_EXTRA",
    "DEFAULT_MODEL_NAME",
    "INPUT_FEATURES",
    "INPUT_IMAGE_BYTES",
    "INPUT_IMAGES",
    "METADATA_FILENAME",
    "OUTPUT_CODES",
    "OUTPUT_KEYS",
    "OUTPUT_PACKED_CODES",
    "SIGNATURE_FEATURES",
    "SIGNATURE_IMAGE_BYTES",
    "SIGNATURE_IMAGES",
    "SIGNATURE_INPUTS",
    "WARMUP_FILENAME",
    *_LAZY,
]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r}"
        )
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
