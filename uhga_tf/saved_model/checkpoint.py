"""Export a training workdir (config.json + hasher.keras) as a version."""

import os
import zipfile

import keras

from uhga_tf import codes as codes_lib
from uhga_tf import config as config_lib
from uhga_tf.saved_model import export as export_lib
from uhga_tf.saved_model import graph
from uhga_tf.saved_model import versions
from uhga_tf.saved_model import warmup
from uhga_tf.saved_model import wire_names

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
    model_name=wire_names.DEFAULT_MODEL_NAME,
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
        versions.check_version(version)
    if warmup_images is not None:
        warmup.check_warmup_images(warmup_images)
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
    _, code_length = graph.probe_dims(backbone, hasher, image_size)
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
    return export_lib.export_saved_model(
        backbone,
        hasher,
        export_dir,
        image_size=image_size,
        version=version,
        metadata=metadata,
        warmup_images=warmup_images,
    )
