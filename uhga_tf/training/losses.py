"""The training loss of one step: pairwise term (7) or (22) plus regularizers.

`HashingLoss` is the one place the loss is assembled. The hash update calls
`value_and_code_gradients` (value, G = dL/dQ of (8) and the regularizer's
gradient at W, all in closed form so the attention can reweight G), and the
look-ahead (19) calls `value` at W' under a tape; both read the same terms,
so the loss that is attended and the loss that is looked ahead at are one.
"""

import tensorflow as tf


def pair_loss_and_grad(u, v, similarity_block, loss="ga_logistic",
                       sigmoid_param=0.2, positive_weight=10.0):
    """Pairwise loss (7), (22) or ``l2`` and G = dL/dQ (8).

    ``l2`` is (22) with every pair weighted 1: for a graded S with no
    unlabeled entries (`coassociation`), where (22)'s |s| weight would drop
    the pairs the clusterings split evenly and skew the fit.

    Args:
        u: [B1, K], v: [B2, K] relaxed codes.
        similarity_block: [B1, B2] S entries in {-1, 0, +1} (any dtype),
            or graded in [-1, 1] (float): a labeled entry s asks for
            P(similar) = (1 + s) / 2 in the logistic loss, s itself in (22).

    Returns:
        (loss scalar, G [B1, B2]); both differentiable in u, v.
    """
    s_entries = tf.cast(similarity_block, u.dtype)
    q = tf.matmul(u, v, transpose_b=True)
    if loss == "ga_logistic":
        labeled = tf.cast(tf.not_equal(s_entries, 0.0), u.dtype)
        target = labeled * (1.0 + s_entries) / 2.0
        weight = labeled * (1.0 + (positive_weight - 1.0) * target)  # (6)
        total = tf.reduce_sum(weight)
        gq = sigmoid_param * q
        value = tf.math.divide_no_nan(
            tf.reduce_sum(weight * (tf.nn.softplus(gq) - target * gq)), total
        )
        grad = tf.math.divide_no_nan(
            sigmoid_param * weight * (tf.sigmoid(gq) - target), total
        )
        return value, grad
    code_length = tf.cast(tf.shape(u)[1], u.dtype)
    pairs = tf.cast(tf.shape(u)[0] * tf.shape(v)[0], u.dtype)
    residual = q / code_length - s_entries
    magnitude = (tf.ones_like(s_entries) if loss == "l2"
                 else tf.abs(s_entries))
    value = tf.reduce_sum(magnitude * tf.square(residual)) / pairs  # (22)
    grad = 2.0 * magnitude * residual / (code_length * pairs)
    return value, grad


def code_regularizer(relaxed_codes, quantization_weight, balance_weight):
    """Quantization and bit-balance terms of the relaxed codes.

    quantization: mean((|u| - 1)^2), the relaxed-to-binary gap;
    balance: mean over bits of (batch mean of u)^2, zero when every bit
    is +1 on half the batch (a choice beyond the paper,
    docs/product_recipe.md).
    """
    value = tf.zeros([], relaxed_codes.dtype)
    if quantization_weight > 0:
        value += float(quantization_weight) * tf.reduce_mean(
            tf.square(tf.abs(relaxed_codes) - 1.0)
        )
    if balance_weight > 0:
        value += float(balance_weight) * tf.reduce_mean(
            tf.square(tf.reduce_mean(relaxed_codes, axis=0))
        )
    return value


class HashingLoss:
    """The loss of a batch of relaxed codes under one `config.LossConfig`.

    Args:
        loss_config: `config.LossConfig` (loss, sigmoid_param, pairing and
            the regularizer weights are read).
        positive_weight: omega of eq. (6), already resolved (not "auto").
        pairing: "cross" (codes are [2B, K], the two branches stacked) or
            "within" (codes are [B, K], paired with themselves).
    """

    def __init__(self, loss_config, positive_weight, pairing):
        self.loss_config = loss_config
        self.positive_weight = positive_weight
        self.pairing = pairing

    def split(self, relaxed_codes, size):
        """(u, v): the two sides of the pairs in the batch."""
        if self.pairing == "cross":
            return relaxed_codes[:size], relaxed_codes[size:]
        return relaxed_codes, relaxed_codes

    def pair_terms(self, u, v, similarity_block):
        """(pairwise loss, G [B1, B2]) of `pair_loss_and_grad`."""
        loss = self.loss_config
        return pair_loss_and_grad(
            u, v, similarity_block, loss.loss, float(loss.sigmoid_param),
            self.positive_weight,
        )

    def regularizer(self, relaxed_codes):
        """`code_regularizer` under this config's weights."""
        loss = self.loss_config
        return code_regularizer(
            relaxed_codes, loss.quantization_weight, loss.balance_weight
        )

    @property
    def has_regularizer(self):
        loss = self.loss_config
        return loss.quantization_weight > 0 or loss.balance_weight > 0

    def value(self, relaxed_codes, size, similarity_block):
        """Loss of [2B or B, K] relaxed codes (value only, differentiable)."""
        u, v = self.split(relaxed_codes, size)
        value, _ = self.pair_terms(u, v, similarity_block)
        return value + self.regularizer(relaxed_codes)

    def value_and_code_gradients(self, relaxed_codes, size, similarity_block):
        """(loss, G, u, v, regularizer gradient or None) for the batch.

        The codes are held constant (stop_gradient): G and the regularizer
        gradient are the cotangents the caller pushes back through the
        hasher, after the attention has reweighted G.
        """
        u, v = self.split(tf.stop_gradient(relaxed_codes), size)
        value, grad = self.pair_terms(u, v, similarity_block)
        regularizer_grad = None
        if self.has_regularizer:
            c = tf.stop_gradient(relaxed_codes)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(c)
                regularizer = self.regularizer(c)
            value += regularizer
            regularizer_grad = tape.gradient(regularizer, c)
        return value, grad, u, v, regularizer_grad
