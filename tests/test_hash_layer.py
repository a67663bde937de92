"""Tests for uhga_tf.models.hash_layer: scale schedule, init, serialization."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from uhga_tf.models import hash_layer


def test_scale_at_step_grows_as_sqrt_every_200_steps():
    assert hash_layer.scale_at_step(199) == 1.0
    assert hash_layer.scale_at_step(200) == pytest.approx(math.sqrt(2))
    assert hash_layer.scale_at_step(12040) == pytest.approx(math.sqrt(61))
    steps = tf.constant([1, 199, 200, 12040], tf.int64)
    np.testing.assert_allclose(
        hash_layer.scale_at_step(steps).numpy(),
        [1.0, 1.0, math.sqrt(2), math.sqrt(61)],
        rtol=1e-6,
    )
    assert hash_layer.scale_at_step(12040, scale_schedule="none") == 1.0
    with pytest.raises(ValueError, match="scale_schedule"):
        hash_layer.scale_at_step(1, scale_schedule="linear")


@pytest.mark.parametrize("head", ["dense", "mlp"])
def test_hash_layer_init_and_output(head):
    keras.utils.set_random_seed(0)
    layer = hash_layer.HashLayer(8, hash_head=head, hidden_units=50)
    features = np.random.default_rng(0).random((3, 400)).astype("float32")
    z = layer(features).numpy()
    assert z.shape == (3, 8)
    kernel = layer.kernel.numpy()
    fan_in = 50 if head == "mlp" else 400
    assert np.abs(kernel).max() <= 1 / math.sqrt(fan_in)
    assert np.abs(kernel).max() > 0.9 / math.sqrt(fan_in)
    x = features
    if head == "mlp":
        x = np.maximum(x @ layer.hidden_kernel.numpy()
                       + layer.hidden_bias.numpy(), 0)
    np.testing.assert_allclose(z, x @ kernel + layer.bias.numpy(), atol=1e-5)


def test_hash_layer_serialization_round_trip():
    layer = hash_layer.HashLayer(16, hash_head="mlp", hidden_units=32,
                                 name="hl")
    config = layer.get_config()
    restored = hash_layer.HashLayer.from_config(config)
    assert restored.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    again = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(again, hash_layer.HashLayer)
    assert again.get_config() == config


def test_build_hasher_and_bad_args():
    hasher = hash_layer.build_hasher(12, 4, dropout_rate=0.1)
    assert hasher(np.zeros((2, 12), "float32")).shape == (2, 4)
    with pytest.raises(ValueError, match="code_length"):
        hash_layer.HashLayer(0)
    with pytest.raises(ValueError, match="hash_head"):
        hash_layer.HashLayer(8, hash_head="conv")
    with pytest.raises(ValueError, match="dropout_rate"):
        hash_layer.build_hasher(12, 4, dropout_rate=1.0)
