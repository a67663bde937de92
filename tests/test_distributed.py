"""MirroredStrategy on two logical CPUs equals a single-device reference."""

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

N, D, K, B = 32, 6, 4, 4  # B per branch per replica


def _build(matrix, lookahead="jvp"):
    keras.utils.set_random_seed(0)
    hasher = keras.Sequential(
        [keras.Input((D,), dtype="float64"), HashLayer(K, dtype="float64")]
    )
    model = UHGAModel(
        hasher, matrix, config.LossConfig(positive_weight=3.0),
        config.AttentionConfig(attention_hidden=8, lookahead=lookahead),
        attention_dtype="float64",
    )
    model.compile(
        hash_optimizer=HashOptimizer(0.2),
        attention_optimizer=keras.optimizers.Adam(0.01, epsilon=1e-8),
    )
    return model


def _reference_step(model, halves, matrix):
    """Literal (second-order) step averaging the two half-batch steps."""
    w0 = [tf.convert_to_tensor(v) for v in model.hasher.trainable_variables]
    phi = model.attention_net.trainable_variables
    lr = model.hash_optimizer.learning_rate_at(model.step + 1)
    losses = []
    with tf.GradientTape() as outer:
        grads = None
        for (f1, i1), (f2, i2) in halves:
            with tf.GradientTape() as tape:
                tape.watch(w0)
                z, _ = model.hasher.stateless_call(w0, [], tf.concat([f1, f2], 0))
                codes = tf.tanh(z)
            s = tf.gather(tf.gather(matrix, i1), i2, axis=1)
            u, v = tf.stop_gradient(codes[:B]), tf.stop_gradient(codes[B:])
            loss, g = pair_loss_and_grad(u, v, s, positive_weight=3.0)
            losses.append(float(loss))
            au, av = attention_net.attend(u, v, g, model.attention_net)
            half = tape.gradient(codes, w0,
                                 output_gradients=tf.concat([au, av], 0))
            grads = half if grads is None else [a + b for a, b in
                                                zip(grads, half)]
        grads = [g / 2 for g in grads]
        w1, momenta = model.hash_optimizer.update(w0, grads, lr)
        lookahead = 0.0
        for (f1, i1), (f2, i2) in halves:
            z, _ = model.hasher.stateless_call(w1, [], tf.concat([f1, f2], 0))
            codes = tf.tanh(z)
            s = tf.gather(tf.gather(matrix, i1), i2, axis=1)
            loss, _ = pair_loss_and_grad(codes[:B], codes[B:], s,
                                         positive_weight=3.0)
            lookahead += loss / 2
    dphi = outer.gradient(lookahead, phi)
    for v, w in zip(model.hasher.trainable_variables, w1):
        v.assign(w)
    for m, value in zip(model.hash_optimizer.momenta, momenta):
        m.assign(value)
    model.attention_optimizer.apply(dphi, phi)
    model.step.assign_add(1)
    return float(np.mean(losses))


def _run_both(lookahead):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < 2:
        pytest.skip("needs two logical CPU devices (tests/conftest.py)")
    rng = np.random.default_rng(0)
    features = rng.random((N, D))
    matrix = rng.choice([-1, 0, 1], size=(N, N)).astype(np.int8)
    steps = []
    for t in range(3):
        idx = rng.permutation(N)[: 4 * B]
        # Global batch of 2B per branch; replica r gets rows r*B:(r+1)*B.
        i1, i2 = idx[: 2 * B], idx[2 * B:]
        steps.append((i1, i2))

    reference = _build(matrix)  # literal second-order reference
    ref_losses = []
    for i1, i2 in steps:
        halves = [((tf.constant(features[i1[r * B:(r + 1) * B]]),
                    tf.constant(i1[r * B:(r + 1) * B])),
                   (tf.constant(features[i2[r * B:(r + 1) * B]]),
                    tf.constant(i2[r * B:(r + 1) * B]))) for r in range(2)]
        ref_losses.append(_reference_step(reference, halves, matrix))

    strategy = tf.distribute.MirroredStrategy(devices[:2])
    with strategy.scope():
        model = _build(matrix, lookahead)
    # fit() distributes each global batch (replica r: rows r*B:(r+1)*B);
    # train_on_batch would hand every replica the whole batch.
    batches = [((features[i1], i1), (features[i2], i2)) for i1, i2 in steps]
    dataset = tf.data.Dataset.from_tensor_slices((
        (np.stack([b[0][0] for b in batches]),
         np.stack([b[0][1] for b in batches])),
        (np.stack([b[1][0] for b in batches]),
         np.stack([b[1][1] for b in batches])),
    ))  # known cardinality: exactly 3 steps
    history = model.fit(dataset, epochs=1, verbose=0)
    logged = history.history["pair_loss"][0]  # mean over the 3 steps
    return model, reference, logged, ref_losses


@pytest.fixture(scope="module", params=["jvp", "second_order"])
def both(request):
    return _run_both(request.param)


def test_mirrored_ga_hasher_and_loss_equal_single_device_halves(both):
    model, reference, logged, ref_losses = both
    for a, b in zip(model.hasher.trainable_variables,
                    reference.hasher.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=0)
    assert np.abs(model.hasher.get_weights()[0]
                  - _build(np.zeros((N, N), np.int8)).hasher.get_weights()[0]
                  ).max() > 1e-3  # the weights moved
    np.testing.assert_allclose(logged, np.mean(ref_losses), atol=1e-5)
    assert int(model.step.numpy()) == 3


def test_mirrored_ga_attention_weights_equal_single_device_halves(both):
    # Regression: the JVP path once left the 1/num_replicas of each
    # replica's code cotangent outside the phi tape, so the Keras optimizer
    # (which SUMS the per-replica phi gradients) applied 2x dphi; Adam hid
    # it to ~3e-4.
    model, reference, _, _ = both
    initial = _build(np.zeros((N, N), np.int8))
    for a, b, c in zip(model.attention_net.trainable_variables[:3],
                       reference.attention_net.trainable_variables[:3],
                       initial.attention_net.trainable_variables[:3]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=0)
        assert np.abs(a.numpy() - c.numpy()).max() > 1e-3  # phi moved
    # c2 cancels in (14): its gradient is ~0 and it barely moves.
    np.testing.assert_allclose(
        model.attention_net.output_bias.numpy(),
        reference.attention_net.output_bias.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, fragment", [
    ({"global_batch_size": 6}, "3 distinct images per branch and step must "
     "divide evenly over 2 replicas; received global_batch_size=6"),
    ({"global_batch_size": 10, "paired_views": True, "pairing": "within"},
     "5 distinct images per branch and step must divide evenly over 2 "
     "replicas (paired_views with pairing=within keeps both views of an "
     "image on one replica)"),
])
def test_batches_that_do_not_split_over_replicas_are_refused(
        tmp_path, overrides, fragment):
    from uhga_tf.training import run

    experiment = config.experiment_from_flat({
        "strategy": "mirrored", "workdir": str(tmp_path / "run"),
        **overrides})
    assert run.prepare(config.with_values(
        experiment, {"global_batch_size": 8 if "pairing" not in overrides
                     else 16})).num_replicas_in_sync == 2
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")
                       .replace(")", r"\)")):
        run.prepare(experiment)
    assert not (tmp_path / "run").exists()
