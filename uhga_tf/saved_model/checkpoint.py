"""Export a training workdir (config.json + hasher.keras) as a version."""

import os
import zipfile

import keras

from uhga_tf import config as config_lib
from uhga_tf.saved_model import export as export_lib
from uhga_tf.saved_model import graph
from uhga_tf.saved_model import versions
from uhga_tf.saved_model import warmup
from uhga_tf.saved_model import wire_names

# Keys <workdir>/config.json must hold itself (not as defaults) for
# `export_from_checkpoint`.
CHECKPOINT_CONFIG_KEYS = (
    "data.dataset",
    "model.backbone",
    "model.backbone_weights",
    "model.image_size",
    "model.code_length",
)
HASHER_FILENAME = "hasher.keras"
CONFIG_FILENAME = "config.json"


def _check_hasher_file(checkpoint_dir):
    """Refuse a missing or damaged hasher.keras before anything is built."""
    hasher_path = os.path.join(checkpoint_dir, HASHER_FILENAME)
    if not os.path.isfile(hasher_path):
        raise FileNotFoundError(f"no {HASHER_FILENAME} in {checkpoint_dir}")
    if not zipfile.is_zipfile(hasher_path):
        raise ValueError(_damaged_hasher(hasher_path))


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
    experiment = config_lib.load_experiment(
        checkpoint_dir, required=CHECKPOINT_CONFIG_KEYS)
    model = experiment.model
    _check_hasher_file(checkpoint_dir)
    # Registers the hash layer classes before the hasher is deserialised.
    from uhga_tf.models import backbone as backbone_lib
    from uhga_tf.models import hash_layer

    if model.trainable_backbone:
        backbone, hasher = hash_layer.split_image_hasher(
            _load_hasher(checkpoint_dir)
        )
    else:
        # image_size 0 is the backbone's default size, as in training.
        backbone = backbone_lib.build_backbone(
            model.backbone,
            weights=model.backbone_weights,
            image_size=model.image_size or None,
        )
        hasher = _load_hasher(checkpoint_dir)
    image_size = int(backbone.input_shape[1])
    _, code_length = graph.probe_dims(backbone, hasher, image_size)
    if code_length != model.code_length:
        raise ValueError(
            f"the hasher in {checkpoint_dir} emits code_length={code_length} "
            f"but config.json says model.code_length={model.code_length}"
        )
    metadata = {
        "backbone": model.backbone,
        "backbone_weights": (
            "fine-tuned (hasher.keras)" if model.trainable_backbone
            else model.backbone_weights
        ),
        "trainable_backbone": model.trainable_backbone,
        "training_data": experiment.data.dataset,
        "checkpoint": os.path.abspath(checkpoint_dir),
        "model_name": model_name,
        "config": experiment.to_dict(),
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
