"""Hash head on frozen features, the end-to-end image hasher, and the
tanh-scale continuation (eq. (4))."""

import math

import keras
import tensorflow as tf

from uhga_tf import config

HASH_HEADS = config.HASH_HEADS
SCALE_SCHEDULES = config.SCALE_SCHEDULES


def _fan_in_uniform(fan_in):
    """PyTorch-default Linear init U(+-1/sqrt(fan_in)) (GA-init)."""
    limit = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-limit, limit)


@keras.saving.register_keras_serializable(package="uhga_tf")
class HashLayer(keras.layers.Layer):
    """Map features [b, D] to hash-layer pre-activations z [b, code_length].

    ``hash_head="dense"`` is one affine map D -> K; ``"mlp"`` is
    D -> hidden_units -> ReLU -> K. Kernels and biases are drawn from
    U(-1/sqrt(fan_in), +1/sqrt(fan_in)) (GA-init). The relaxed codes are
    ``tanh(s_t * z)``; binary codes are ``z >= 0 -> +1`` (eq. (21)).

    Example:
    >>> layer = HashLayer(code_length=16)
    >>> z = layer(tf.zeros([2, 1280]))  # [2, 16]
    """

    def __init__(
        self, code_length, hash_head="dense", hidden_units=1024, **kwargs
    ):
        super().__init__(**kwargs)
        if not isinstance(code_length, int) or code_length < 1:
            raise ValueError(
                "code_length must be an integer >= 1; received "
                f"code_length={code_length!r}"
            )
        if hash_head not in HASH_HEADS:
            raise ValueError(
                f"hash_head must be one of {HASH_HEADS}; received "
                f"hash_head={hash_head!r}"
            )
        if not isinstance(hidden_units, int) or hidden_units < 1:
            raise ValueError(
                "hidden_units must be an integer >= 1; received "
                f"hidden_units={hidden_units!r}"
            )
        self.code_length = code_length
        self.hash_head = hash_head
        self.hidden_units = hidden_units

    def build(self, input_shape):
        fan_in = int(input_shape[-1])
        if self.hash_head == "mlp":
            init = _fan_in_uniform(fan_in)
            self.hidden_kernel = self.add_weight(
                name="hidden_kernel",
                shape=(fan_in, self.hidden_units),
                initializer=init,
            )
            self.hidden_bias = self.add_weight(
                name="hidden_bias", shape=(self.hidden_units,), initializer=init
            )
            fan_in = self.hidden_units
        init = _fan_in_uniform(fan_in)
        self.kernel = self.add_weight(
            name="kernel", shape=(fan_in, self.code_length), initializer=init
        )
        self.bias = self.add_weight(
            name="bias", shape=(self.code_length,), initializer=init
        )

    def call(self, features):
        x = features
        if self.hash_head == "mlp":
            x = keras.ops.relu(
                keras.ops.matmul(x, self.hidden_kernel) + self.hidden_bias
            )
        return keras.ops.matmul(x, self.kernel) + self.bias

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.code_length,)

    def get_config(self):
        config = super().get_config()
        config.update(
            code_length=self.code_length,
            hash_head=self.hash_head,
            hidden_units=self.hidden_units,
        )
        return config


@keras.saving.register_keras_serializable(package="uhga_tf")
class FeatureCentring(keras.layers.Layer):
    """Fixed (x - mean) / scale in front of the hash layer; not trained.

    A choice beyond the paper (docs/product_recipe.md): backbone features after a
    ReLU are non-negative with a large common mean, so an affine hash layer
    at init puts every bit far to one side. The train-feature mean and the
    per-dimension RMS of the centred train features are stored as non-trainable
    weights, so the SavedModel, the server and the index apply the same
    centring with no extra step. ``unit_rows`` L2-normalises each row first
    (cosine geometry, as the structural references fit; the statistics are
    then those of the unit rows).
    """

    def __init__(self, mean=None, scale=1.0, unit_rows=False, **kwargs):
        super().__init__(**kwargs)
        self._initial_mean = mean
        self._initial_scale = float(scale)
        self.unit_rows = bool(unit_rows)

    def build(self, input_shape):
        dim = int(input_shape[-1])
        mean = self._initial_mean
        self.mean = self.add_weight(
            name="mean", shape=(dim,), trainable=False,
            initializer=(
                "zeros" if mean is None
                else keras.initializers.Constant(mean)
            ),
        )
        self.scale = self.add_weight(
            name="scale", shape=(), trainable=False,
            initializer=keras.initializers.Constant(self._initial_scale),
        )

    def call(self, features):
        if self.unit_rows:
            norms = keras.ops.norm(features, axis=-1, keepdims=True)
            features = features / keras.ops.maximum(norms, 1e-12)
        return (features - self.mean) / self.scale

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        # The statistics are weights: a reloaded model gets them from the
        # weights file, not from the config.
        config = super().get_config()
        config.update(unit_rows=self.unit_rows)
        return config


def centring_statistics(features, unit_rows=False):
    """(mean [D], scale) of train features for `FeatureCentring` (of their
    L2-normalised rows with ``unit_rows``)."""
    import numpy as np

    from uhga_tf.similarity import features as features_lib

    features = np.asarray(features, dtype=np.float64)
    if unit_rows:
        features = features_lib.unit_rows(features, np.float64)
    mean = features.mean(axis=0)
    # One scalar: the RMS of the centred features over all dimensions, so
    # each input is O(1) on average and the fan-in init gives
    # pre-activations of O(1) spread, above the bias.
    scale = float(np.sqrt(np.mean(np.square(features - mean))))
    return mean.astype("float32"), max(scale, 1e-12)


def build_hasher(
    feature_dim,
    code_length,
    hash_head="dense",
    hidden_units=1024,
    dropout_rate=0.0,
    name="hasher",
    centring=None,
    unit_rows=False,
):
    """Build the hashing network: features [b, D] -> z [b, K] (pre-tanh).

    ``dropout_rate`` > 0 adds Dropout on the features; its mask comes from
    the Dropout layer's seed-generator state, a non-trainable variable of
    the hasher. UHGAModel passes the same pre-step non-trainable values to
    every ``stateless_call`` of one step, so all passes of the step share
    one mask, and assigns the advanced state once at the end (method.md
    §11; tests/test_trainable_backbone.py). ``centring`` = (mean [D],
    scale), from `centring_statistics` of the train features, puts a fixed
    `FeatureCentring` first (``unit_rows``: of L2-normalised rows).
    """
    if not isinstance(feature_dim, int) or feature_dim < 1:
        raise ValueError(
            "feature_dim must be an integer >= 1; received "
            f"feature_dim={feature_dim!r}"
        )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(
            "dropout_rate must be in [0, 1); received "
            f"dropout_rate={dropout_rate!r}"
        )
    features = keras.Input(shape=(feature_dim,), name="features")
    x = features
    if centring is not None:
        mean, scale = centring
        x = FeatureCentring(mean, scale, unit_rows=unit_rows,
                            name="feature_centring")(x)
    if dropout_rate > 0:
        x = keras.layers.Dropout(dropout_rate, name="feature_dropout")(x)
    z = HashLayer(
        code_length,
        hash_head=hash_head,
        hidden_units=hidden_units,
        name="hash_layer",
    )(x)
    return keras.Model(features, z, name=name)


def linear_hasher(kernel, mean, unit_rows=False):
    """A closed-form linear hash map as a hasher: z = (rows(x) - mean) @ kernel.

    The same layers as `build_hasher` (a `FeatureCentring` with scale 1, a
    dense `HashLayer` with zero bias), so a fitted reference such as
    k-means+LS (its `linear_map`, `mean` and ``unit_rows`` option) exports,
    serves and indexes exactly like a trained head. Float32 here against the
    reference's float64: a code can differ where a bit's value is within
    rounding of zero.
    """
    import numpy as np

    kernel = np.asarray(kernel, dtype=np.float32)
    mean = np.asarray(mean, dtype=np.float32)
    if kernel.ndim != 2 or mean.shape != (kernel.shape[0],):
        raise ValueError(
            "kernel must be [D, K] and mean [D]; received kernel shape "
            f"{kernel.shape}, mean shape {mean.shape}"
        )
    hasher = build_hasher(
        kernel.shape[0], kernel.shape[1], centring=(mean, 1.0),
        unit_rows=unit_rows,
    )
    layer = hasher.get_layer("hash_layer")
    layer.kernel.assign(kernel)
    layer.bias.assign(np.zeros(kernel.shape[1], dtype=np.float32))
    return hasher


HASH_HEAD_NAME = "hash_head"


def build_image_hasher(
    backbone,
    code_length,
    hash_head="dense",
    hidden_units=1024,
    dropout_rate=0.0,
    centring=None,
    unit_rows=False,
):
    """Build the end-to-end hasher: images -> backbone -> head -> z.

    Args:
        backbone: `keras.Model`, float32 [b, S, S, 3] RGB in [0, 255] ->
            features [b, D] (preprocessing inside); it is fine-tuned, and
            its BatchNormalization layers are frozen here (see below).
        code_length, hash_head, hidden_units, dropout_rate: as in
            `build_hasher`, whose model becomes the nested ``hash_head``.

    Returns:
        `keras.Model` named "hasher": float32 [b, S, S, 3] in [0, 255] ->
        z [b, code_length]; its layers are the input, `backbone` and the
        ``hash_head`` sub-model (`split_image_hasher` recovers the two).
    ``centring`` = (mean, scale) of the frozen features puts a
    `FeatureCentring` at the head's input (``unit_rows`` as in
    `build_hasher`).
    """
    shape = tuple(backbone.input_shape[1:])
    if len(shape) != 3 or shape[-1] != 3 or None in shape:
        raise ValueError(
            "backbone must take images [b, S, S, 3] of a fixed size; "
            f"received input shape {backbone.input_shape}"
        )
    feature_dim = backbone.output_shape[-1]
    if len(backbone.output_shape) != 2 or feature_dim is None:
        raise ValueError(
            "backbone must return features [b, D]; received output shape "
            f"{backbone.output_shape}"
        )
    # BatchNormalization stays in inference mode (frozen moving statistics,
    # and gamma/beta not trained): the per-replica batches of a GA step are
    # small (2B = 128 images per replica at most, fewer on several GPUs) and
    # batch statistics would couple the codes of a batch; above all, the
    # first pass, the look-ahead pass at W' and the JVP pass of one step
    # must see the same normalisation, which batch statistics (they change
    # with W') and moving-average updates (three per step) would break. A
    # Keras BatchNormalization with trainable=False normalises with its
    # moving statistics even under training=True.
    for layer in backbone._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    head = build_hasher(
        int(feature_dim),
        code_length,
        hash_head=hash_head,
        hidden_units=hidden_units,
        dropout_rate=dropout_rate,
        name=HASH_HEAD_NAME,
        centring=centring,
        unit_rows=unit_rows,
    )
    images = keras.Input(shape=shape, name="images")
    z = head(backbone(images))
    return keras.Model(images, z, name="hasher")


def split_image_hasher(hasher):
    """Return (backbone, hash head) of a `build_image_hasher` model.

    Works on a reloaded ``hasher.keras`` too; the two share the hasher's
    weights.

    Raises:
        ValueError: when `hasher` is not an image hasher.
    """
    models = [
        layer for layer in hasher.layers if isinstance(layer, keras.Model)
    ]
    heads = [m for m in models if m.name == HASH_HEAD_NAME]
    backbones = [m for m in models if m.name != HASH_HEAD_NAME]
    if len(heads) != 1 or len(backbones) != 1:
        raise ValueError(
            "hasher must be an image hasher (input, backbone, "
            f"{HASH_HEAD_NAME!r} sub-models); received layers "
            f"{[layer.name for layer in hasher.layers]}"
        )
    return backbones[0], heads[0]


def scale_at_step(
    step,
    scale_schedule="sqrt_step",
    scale_step=200,
    scale_gamma=0.005,
    scale_power=0.5,
):
    """Return s_t = (1 + gamma * scale_step * floor(t / scale_step))^power.

    Eq. (4) with the 1-based step t; with the defaults s_t =
    sqrt(1 + floor(t / 200)): s_199 = 1, s_200 = sqrt(2), s_12040 = sqrt(61).
    ``scale_schedule="none"`` gives s_t = 1. A tf tensor step gives a float32
    tensor (usable in-graph); a Python number gives a float.
    """
    if scale_schedule not in SCALE_SCHEDULES:
        raise ValueError(
            f"scale_schedule must be one of {SCALE_SCHEDULES}; received "
            f"scale_schedule={scale_schedule!r}"
        )
    if tf.is_tensor(step):
        if scale_schedule == "none":
            return tf.ones([], tf.float32)
        t = tf.cast(step, tf.float64)
        stage = tf.floor(t / float(scale_step))
        value = tf.pow(1.0 + scale_gamma * scale_step * stage, scale_power)
        return tf.cast(value, tf.float32)
    if scale_schedule == "none":
        return 1.0
    stage = math.floor(step / scale_step)
    return float((1.0 + scale_gamma * scale_step * stage) ** scale_power)
