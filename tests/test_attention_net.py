"""Tests for uhga_tf.models.attention_net: constant attention, split first
layer, custom gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from uhga_tf.models import attention_net


def _inputs(b1=5, b2=4, k=3, seed=0, scale=1e-3):
    rng = np.random.default_rng(seed)
    u = np.tanh(rng.standard_normal((b1, k)))
    v = np.tanh(rng.standard_normal((b2, k)))
    g = rng.standard_normal((b1, b2)) * scale
    g[0, 0] = 1e-9  # some linear-branch pair gradients
    return u, v, g


def _net(dtype="float64", seed=1):
    net = attention_net.AttentionNet(hidden_units=7, seed=seed, dtype=dtype)
    net.build((None, 5))
    return net


def _brute_force_logits(net, u, v, g, p=10.0):
    """Every row as an explicit 5-vector through AttentionNet.call."""
    pu = attention_net.numpy_preprocess
    total_u = g @ v
    total_v = g.T @ u
    b1, b2 = g.shape
    k = u.shape[1]
    x1 = np.zeros((b1, b2, k, 5))
    x2 = np.zeros((b1, b2, k, 5))
    for i in range(b1):
        for j in range(b2):
            for c in range(k):
                e1 = g[i, j] * v[j, c]
                e2 = g[i, j] * u[i, c]
                x1[i, j, c] = [u[i, c], *pu(e1, p), *pu(total_u[i, c], p)]
                x2[i, j, c] = [v[j, c], *pu(e2, p), *pu(total_v[j, c], p)]
    return net(tf.constant(x1)), net(tf.constant(x2))


def _assert_gradients_match_brute_force(u, v, g, net, seed, **attend_args):
    """Compare d(random projection of attend)/d(net weights) with autodiff.

    The fast path is `attention_net.attend(..., **attend_args)` with its
    custom gradient; the reference is autodiff through the brute-force
    5-vector rows. The first three variables (kernel, bias, output kernel)
    must agree and be non-zero. Returns the fast gradients.
    """
    rng = np.random.default_rng(seed)
    ru, rv = rng.standard_normal(u.shape), rng.standard_normal(v.shape)
    variables = net.trainable_variables
    with tf.GradientTape() as tape:
        au, av = attention_net.attend(u, v, g, net, **attend_args)
        objective = tf.reduce_sum(au * ru) + tf.reduce_sum(av * rv)
    fast = tape.gradient(objective, variables)
    with tf.GradientTape() as tape:
        f1, f2 = _brute_force_logits(net, u, v, g)
        w = tf.sigmoid(f1 - f2)
        au = 2 * tf.einsum("ijk,ij,jk->ik", w, g, v)
        av = 2 * tf.einsum("ijk,ij,ik->jk", 1 - w, g, u)
        objective = tf.reduce_sum(au * ru) + tf.reduce_sum(av * rv)
    slow = tape.gradient(objective, variables)
    for a, b in zip(fast[:3], slow[:3]):
        assert np.abs(b.numpy()).max() > 0
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-8,
                                   atol=1e-14)
    return fast


def test_constant_attention_half_gives_plain_gradient():
    u, v, g = _inputs()
    net = _net()
    net.output_kernel.assign(np.zeros((7, 1)))  # f const -> a1 = a2 = 1/2
    attended_u, attended_v, stats = attention_net.attend(
        u, v, g, net, return_stats=True
    )
    np.testing.assert_allclose(attended_u.numpy(), g @ v, atol=1e-6)
    np.testing.assert_allclose(attended_v.numpy(), g.T @ u, atol=1e-6)
    assert float(stats["attention_mean"]) == pytest.approx(0.5)
    assert float(stats["attention_std"]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("jit_compile, chunk_rows", [(True, 0), (False, 2)])
def test_split_first_layer_equals_brute_force(jit_compile, chunk_rows):
    u, v, g = _inputs()
    net = _net()
    f1, f2 = _brute_force_logits(net, u, v, g)
    weights = tf.sigmoid(f1 - f2).numpy()
    np.testing.assert_allclose(
        attention_net.attention_weights(u, v, g, net,
                                        jit_compile=jit_compile).numpy(),
        weights, rtol=1e-10,
    )
    assert weights.std() > 1e-3  # not a no-op
    attended_u, attended_v = attention_net.attend(
        u, v, g, net, chunk_rows=chunk_rows, jit_compile=jit_compile
    )
    np.testing.assert_allclose(
        attended_u.numpy(),
        2 * np.einsum("ijk,ij,jk->ik", weights, g, v), rtol=1e-10,
    )
    np.testing.assert_allclose(
        attended_v.numpy(),
        2 * np.einsum("ijk,ij,ik->jk", 1 - weights, g, u), rtol=1e-10,
    )


def test_custom_gradient_equals_autodiff_of_brute_force():
    u, v, g = _inputs(seed=3)
    net = _net(seed=4)
    fast = _assert_gradients_match_brute_force(
        u, v, g, net, seed=5, chunk_rows=2
    )
    # c2 cancels in the softmax over the two members: gradient 0 (§9).
    assert abs(float(fast[3][0])) < 1e-12


def test_within_diagonal_passes_plain_gradient():
    u, _, g = _inputs(b1=4, b2=4)
    net = _net()
    big = np.zeros((5, 7))
    big[0] = 50.0  # strongly code-dependent attention
    net.kernel.assign(big)
    au, av = attention_net.attend(u, u, g, net, within=True)
    w = attention_net.attention_weights(u, u, g, net).numpy()
    eye = np.eye(4)[:, :, None]
    w1 = np.where(eye > 0, 1.0, 2 * w)
    w2 = np.where(eye > 0, 1.0, 2 * (1 - w))
    expected_u = np.einsum("ijk,ij,jk->ik", w1, g, u)
    expected_v = np.einsum("ijk,ij,ik->jk", w2, g, u)
    np.testing.assert_allclose(au.numpy(), expected_u, rtol=1e-10)
    np.testing.assert_allclose(av.numpy(), expected_v, rtol=1e-10)


def test_preprocess_branches():
    first, second = attention_net.preprocess_gradient(
        tf.constant([1e-6, -2e-5, 0.5, -3.0], tf.float64)
    )
    np.testing.assert_allclose(first.numpy()[:2], [-1.0, -1.0])
    np.testing.assert_allclose(second.numpy()[:2],
                               [np.exp(10) * 1e-6, -np.exp(10) * 2e-5])
    np.testing.assert_allclose(first.numpy()[2:],
                               np.log(np.array([0.5, 3.0]) + 1e-6) / 10)
    np.testing.assert_allclose(second.numpy()[2:], [1.0, -1.0])


def test_attention_net_serialization_and_init():
    net = attention_net.AttentionNet(hidden_units=100, grad_p=8.0, seed=3)
    net.build((None, 5))
    assert np.abs(net.kernel.numpy()).max() <= 1 / np.sqrt(5)
    assert np.abs(net.kernel.numpy()).max() > 0.9 / np.sqrt(5)
    assert np.abs(net.output_kernel.numpy()).max() <= 0.1
    config = net.get_config()
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(net)
    )
    assert isinstance(again, attention_net.AttentionNet)
    assert again.get_config() == config
    with pytest.raises(ValueError, match="hidden_units"):
        attention_net.AttentionNet(hidden_units=0)


@pytest.mark.parametrize("columns", [3, 1])
def test_fused_backward_column_chunks_equal_autodiff(monkeypatch, columns):
    # The XLA backward unrolls over at most BACKWARD_COLUMNS pair columns per
    # call and sums the calls: uneven chunks (4 = 3 + 1, 4 x 1) must give the
    # autodiff gradient of the brute-force rows.
    monkeypatch.setattr(attention_net, "BACKWARD_COLUMNS", columns)
    u, v, g = _inputs(b1=4, b2=4, seed=11)
    net = _net(seed=12)
    _assert_gradients_match_brute_force(
        u, v, g, net, seed=13, jit_compile=True
    )


def test_attention_flops_formula():
    # rows * (forward 2*5*H + 4*H + 1 + backward 2*5*H + 5*H + 1)
    assert attention_net.attention_flops(128, 128, 64, 100) == (
        2 * 128 * 128 * 64 * 2902
    )
