"""Tests for UHGAModel and HashOptimizer: JVP vs second-order look-ahead,
attention off = plain SGD, look-ahead finite differences, §8, (18)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from uhga_tf import config
from uhga_tf.models import attention_net
from uhga_tf.models.hash_layer import HashLayer
from uhga_tf.training.hash_optimizer import HashOptimizer
from uhga_tf.training.losses import pair_loss_and_grad
from uhga_tf.training.uhga_model import UHGAModel

N, D, K, B = 24, 6, 4, 4


def _data(seed=0):
    rng = np.random.default_rng(seed)
    features = rng.random((N, D))
    matrix = rng.choice([-1, 0, 1], size=(N, N)).astype(np.int8)
    return features, matrix


def _model(attention=True, lookahead="jvp", pairing="cross", lr=0.05,
           **loss_fields):
    features, matrix = _data()
    keras.utils.set_random_seed(0)
    hasher = keras.Sequential(
        [keras.Input((D,), dtype="float64"), HashLayer(K, dtype="float64")]
    )
    model = UHGAModel(
        hasher, matrix,
        config.LossConfig(pairing=pairing, positive_weight=3.0,
                          **loss_fields),
        config.AttentionConfig(attention=attention, lookahead=lookahead,
                               attention_hidden=8),
        attention_dtype="float64",
    )
    model.compile(
        hash_optimizer=HashOptimizer(lr),
        attention_optimizer=keras.optimizers.Adam(0.01, epsilon=1e-8),
    )
    return model, features


def _batch(features, start=0):
    f = tf.constant(features)
    i = tf.range(N, dtype=tf.int32)
    return ((f[start:start + B], i[start:start + B]),
            (f[start + B:start + 2 * B], i[start + B:start + 2 * B]))


def test_jvp_lookahead_equals_second_order():
    model, features = _model()
    data = _batch(features)
    jvp = model.compute_step(data)["attention_grads"]
    model.lookahead = "second_order"
    second = model.compute_step(data)["attention_grads"]
    for a, b in zip(jvp[:3], second[:3]):
        assert np.abs(b.numpy()).max() > 1e-8
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4,
                                   atol=1e-12)


def test_lookahead_gradient_matches_finite_difference():
    model, features = _model(lr=0.5)
    data = _batch(features)
    grads = model.compute_step(data)["attention_grads"]
    variables = model.attention_net.trainable_variables
    base = [v.numpy() for v in variables]
    rng = np.random.default_rng(7)
    direction = [rng.standard_normal(b.shape) for b in base]
    direction[3] = np.zeros_like(base[3])
    analytic = sum(float(np.sum(g.numpy() * d))
                   for g, d in zip(grads, direction))
    eps = 1e-5

    def lookahead(sign):
        for v, b, d in zip(variables, base, direction):
            v.assign(b + sign * eps * d)
        return float(model.compute_step(data)["lookahead_loss"])

    numeric = (lookahead(1) - lookahead(-1)) / (2 * eps)
    for v, b in zip(variables, base):
        v.assign(b)
    assert abs(analytic) > 1e-7
    assert abs(numeric - analytic) <= 1e-3 * abs(analytic)


def test_train_step_changes_attention_and_hasher_weights():
    model, features = _model()
    before_phi = [v.numpy().copy() for v in
                  model.attention_net.trainable_variables]
    before_w = [v.numpy().copy() for v in model.hasher.trainable_variables]
    logs = model.train_step(_batch(features))
    for a, v in zip(before_phi[:3], model.attention_net.trainable_variables):
        assert np.abs(a - v.numpy()).max() > 1e-4  # Adam moves ~lr
    for a, v in zip(before_w, model.hasher.trainable_variables):
        assert np.abs(a - v.numpy()).max() > 1e-6
    assert int(model.step) == 1
    assert set(logs) == {"pair_loss", "scale", "learning_rate",
                         "lookahead_loss", "attention_loss",
                         "attention_mean", "attention_std"}
    assert float(logs["lookahead_loss"]) < float(logs["pair_loss"])
    assert float(logs["scale"]) == 1.0


@pytest.mark.parametrize("pairing", ["cross", "within"])
def test_attention_off_is_plain_sgd_on_loss(pairing):
    model, features = _model(attention=False, pairing=pairing)
    data = _batch(features) if pairing == "cross" else (
        tf.constant(features[:6]), tf.range(6))
    w0 = [tf.constant(v.numpy()) for v in model.hasher.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(w0)
        z, _ = model.hasher.stateless_call(
            w0, [], tf.concat([data[0][0], data[1][0]], 0)
            if pairing == "cross" else data[0])
        codes = tf.tanh(z)
        if pairing == "cross":
            u, v = codes[:B], codes[B:]
            idx1, idx2 = data[0][1], data[1][1]
        else:
            u = v = codes
            idx1 = idx2 = data[1]
        s = tf.gather(tf.gather(_data()[1], idx1), idx2, axis=1)
        loss, _ = pair_loss_and_grad(u, v, s, sigmoid_param=0.2,
                                     positive_weight=3.0)
    grads = tape.gradient(loss, w0)
    logs = model.train_step(data)
    lr = float(np.float32(0.05)) * 10.0  # float32 schedule, x10 multiplier
    for w, g, v in zip(w0, grads, model.hasher.trainable_variables):
        expected = w - lr * 1.9 * (g + 5e-4 * w)  # (18), zero momentum
        np.testing.assert_allclose(v.numpy(), expected.numpy(), rtol=1e-12)
        assert np.abs(v.numpy() - w.numpy()).max() > 1e-4
    assert float(logs["pair_loss"]) == pytest.approx(float(loss), rel=1e-6)


def test_dilemma_example_of_section_8():
    u = tf.constant([[0.5]], tf.float64)
    v = tf.constant([[-0.5]], tf.float64)
    _, g = pair_loss_and_grad(u, v, tf.constant([[1]]), sigmoid_param=1.0,
                              positive_weight=1.0)
    assert g.numpy().item() == pytest.approx(-0.5622, abs=5e-5)
    plain_u, plain_v = (g * v).numpy().item(), (g * u).numpy().item()
    assert plain_u == pytest.approx(0.2811, abs=5e-5)
    for eta, expected in [(1.5, 0.0784), (3.0, -0.3433)]:
        assert round(0.5 - eta * plain_u, 4) == expected
        assert round(-0.5 - eta * plain_v, 4) == -expected
    # Attention (a_u, a_v) = (0, 1): an AttentionNet that scores by own code.
    net = attention_net.AttentionNet(hidden_units=1, dtype="float64")
    net.build((None, 5))
    net.kernel.assign([[-1000.0], [0.0], [0.0], [0.0], [0.0]])
    net.bias.assign([0.0])
    net.output_kernel.assign([[1.0]])
    attended_u, attended_v = attention_net.attend(u, v, g, net, budget=2.0)
    assert round(0.5 - 1.5 * attended_u.numpy().item(), 4) == 0.5
    assert round(-0.5 - 1.5 * attended_v.numpy().item(), 4) == 0.3433


def test_explicit_update_closed_form_and_keras_sgd():
    rng = np.random.default_rng(0)
    w_init = rng.standard_normal((3, 2))
    grads = [rng.standard_normal((3, 2)) for _ in range(3)]
    # Closed form with weight decay and a multiplier.
    optimizer = HashOptimizer(0.1, weight_decay=5e-4, lr_step_steps=2,
                              lr_decay=0.5)
    var = tf.Variable(w_init)
    optimizer.build([var], [10.0])
    w, nu = w_init.copy(), np.zeros_like(w_init)
    for t, g in enumerate(grads, start=1):
        lr = float(np.float32(0.1 * 0.5 ** ((t - 1) // 2))) * 10.0
        d = g + 5e-4 * w
        expected = w - lr * (1.9 * d) - lr * 0.81 * nu
        optimizer.apply([tf.constant(g)], [var])
        nu = 0.9 * nu + d
        w = expected
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-12)
    np.testing.assert_allclose(optimizer.momenta[0].numpy(), nu, rtol=1e-12)
    assert int(optimizer.iterations) == 3
    # Equal to keras SGD(momentum=0.9, nesterov=True), constant lr, wd = 0.
    ours = HashOptimizer(0.1, weight_decay=0.0, lr_step_steps=100)
    a = tf.Variable(w_init)
    ours.build([a])
    b = keras.Variable(w_init, dtype="float64")
    sgd = keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
    for g in grads:
        ours.apply([tf.constant(g)], [a])
        sgd.apply([tf.constant(g)], [b])
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    assert np.abs(a.numpy() - w_init).max() > 0.1


def test_compile_refuses_generic_keywords_and_bad_args():
    model, _ = _model()
    with pytest.raises(ValueError, match="optimizer="):
        model.compile(optimizer="sgd", hash_optimizer=HashOptimizer())
    with pytest.raises(ValueError, match="loss="):
        model.compile(loss="mse", hash_optimizer=HashOptimizer())
    with pytest.raises(ValueError, match="attention_optimizer"):
        model.compile(hash_optimizer=HashOptimizer())
    with pytest.raises(ValueError, match="lookahead"):
        UHGAModel(model.hasher, _data()[1],
                  attention_config=config.AttentionConfig(lookahead="fd"))
    with pytest.raises(ValueError, match="momentum"):
        HashOptimizer(momentum=1.0)


def test_fit_in_graph_and_checkpoint_restores_step_and_momenta(tmp_path):
    model, features = _model(scale_step=2, scale_gamma=0.5)
    dataset = tf.data.Dataset.from_tensors(_batch(features)).repeat(3)
    history = model.fit(dataset, epochs=1, verbose=0)
    assert int(model.step) == 3
    # s_t = sqrt(1 + floor(t / 2)): 1, sqrt(2), sqrt(2).
    assert history.history["scale"][0] == pytest.approx(
        (1 + 2 * np.sqrt(2)) / 3, rel=1e-6)
    checkpoint = tf.train.Checkpoint(model=model,
                                     hash_optimizer=model.hash_optimizer)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    momentum = model.hash_optimizer.momenta[0].numpy().copy()
    assert np.abs(momentum).max() > 0
    model.step.assign(0)
    model.hash_optimizer.momenta[0].assign(tf.zeros_like(momentum))
    checkpoint.restore(path)
    assert int(model.step) == 3
    np.testing.assert_array_equal(model.hash_optimizer.momenta[0].numpy(),
                                  momentum)
    codes = model.relaxed_codes(tf.constant(features[:3])).numpy()
    assert codes.shape == (3, K) and np.all(np.abs(codes) < 1)


@pytest.mark.parametrize("mode", ["knn", "manifold"])
def test_structured_similarity_step_equals_its_dense_matrix(mode):
    """A structured S built per batch trains exactly as its materialised
    N x N matrix, with GA and the balance and quantization terms on."""
    from uhga_tf.similarity import structured

    features, _ = _data()
    structure = structured.build_structured_similarity(
        features, similarity=mode, similarity_knn=3, similarity_clusters=3,
        similarity_runs=2, similarity_dissimilar_quantile=0.5, seed=0,
    )
    rows = np.arange(N)
    dense = structure.block(rows, rows).numpy()
    assert (dense == 1).sum() > N and (dense == -1).any()
    steps = []
    for similarity in (structure, dense):
        keras.utils.set_random_seed(0)
        hasher = keras.Sequential(
            [keras.Input((D,), dtype="float64"),
             HashLayer(K, dtype="float64")])
        model = UHGAModel(
            hasher, similarity,
            config.LossConfig(positive_weight=3.0, balance_weight=0.5,
                              quantization_weight=0.5),
            config.AttentionConfig(attention_hidden=8),
            attention_dtype="float64",
        )
        model.compile(
            hash_optimizer=HashOptimizer(0.05),
            attention_optimizer=keras.optimizers.Adam(0.01, epsilon=1e-8),
        )
        steps.append(model.compute_step(_batch(features)))
    for key in ("pair_loss", "lookahead_loss"):
        np.testing.assert_allclose(
            steps[0][key].numpy(), steps[1][key].numpy(), rtol=1e-12)
    for a, b in zip(steps[0]["new_values"], steps[1]["new_values"]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
    for a, b in zip(steps[0]["attention_grads"], steps[1]["attention_grads"]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10)


def test_balance_term_gradient_matches_finite_differences():
    model, features = _model(balance_weight=0.7, quantization_weight=0.3)
    codes = tf.constant(
        np.random.default_rng(4).uniform(-0.9, 0.9, size=(2 * B, K)))
    _, _, _, _, extra = model.hashing_loss.value_and_code_gradients(
        codes, B, tf.zeros([B, B], tf.int8))
    eps = 1e-6
    flat = codes.numpy().ravel()
    numeric = np.empty_like(flat)
    for i in range(flat.size):
        plus, minus = flat.copy(), flat.copy()
        plus[i] += eps
        minus[i] -= eps
        regularizer = model.hashing_loss.regularizer
        numeric[i] = (
            regularizer(tf.constant(plus.reshape(codes.shape)))
            - regularizer(tf.constant(minus.reshape(codes.shape)))
        ).numpy() / (2 * eps)
    np.testing.assert_allclose(extra.numpy().ravel(), numeric, atol=1e-8)


def test_graded_entries_are_soft_logistic_targets():
    """s in {-1, +1} reads as before (int8 or float); a graded s asks for
    P(similar) = (1 + s) / 2, so G vanishes where sigmoid(gamma q) does."""
    rng = np.random.default_rng(0)
    u = tf.constant(rng.normal(size=(3, 8)), tf.float32)
    v = tf.constant(rng.normal(size=(4, 8)), tf.float32)
    ternary = np.array([[1, -1, 0, 1], [-1, -1, 1, 0], [0, 1, 1, -1]])
    a = pair_loss_and_grad(u, v, ternary.astype(np.int8), positive_weight=3.)
    b = pair_loss_and_grad(u, v, ternary.astype(np.float32),
                           positive_weight=3.)
    np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(a[1].numpy(), b[1].numpy(), rtol=1e-6)
    # One pair, q = 8 * 0.25 * 0.5 = 1: sigmoid(0.2 * 1) is the target for
    # s = 2 sigmoid(0.2) - 1, so the gradient is zero there.
    code = tf.constant([[0.25] * 8], tf.float32)
    s = 2.0 / (1.0 + np.exp(-0.2)) - 1.0
    _, grad = pair_loss_and_grad(code, 2 * code, np.array([[s]], np.float32))
    assert abs(float(grad.numpy()[0, 0])) < 1e-7
    _, pulled = pair_loss_and_grad(code, 2 * code,
                                   np.array([[s + 0.1]], np.float32))
    assert float(pulled.numpy()[0, 0]) < -1e-3  # wants q larger


def test_l2_loss_weighs_every_pair_and_ssdh_l2_weighs_by_magnitude():
    # Two pairs, K = 2: q = [[2, 0]] -> q / K = [1, 0]; S = [0.5, 0].
    u = tf.constant([[1.0, 1.0]], tf.float64)
    v = tf.constant([[1.0, 1.0], [1.0, -1.0]], tf.float64)
    s = np.array([[0.5, 0.0]])
    value, grad = pair_loss_and_grad(u, v, s, loss="l2")
    # ((1 - 0.5)^2 + 0^2) / 2 pairs; G = 2 r / (K pairs) = [0.25, 0].
    assert float(value) == pytest.approx(0.125)
    np.testing.assert_allclose(grad.numpy(), [[0.25, 0.0]])
    s = np.array([[0.5, -0.5]])
    value, grad = pair_loss_and_grad(u, v, s, loss="l2")
    assert float(value) == pytest.approx((0.25 + 0.25) / 2)
    np.testing.assert_allclose(grad.numpy(), [[0.25, 0.25]])
    # (22) weighs each pair by |s|: half of l2's loss here.
    value, grad = pair_loss_and_grad(u, v, s, loss="ssdh_l2")
    assert float(value) == pytest.approx(0.125)
    np.testing.assert_allclose(grad.numpy(), [[0.125, 0.125]])
