"""Gradient attention network and the attended code gradients (eqs. (10)-(17)).

The attention path has 2 * B * B * K rows of 5 features through a
5 -> hidden -> 1 MLP (2.1 M rows at B = 128, K = 64). It is never evaluated
row by row:

* the first layer is split: H1 x = H1[:, code] u_ik + H1[:, total] P((GV)_ik)
  + c1 (per (i, k), broadcast over j) + H1[:, pair] P(e_ijk) (per row);
* the forward pass is an XLA-fused loop over hidden units, so no
  [rows, hidden] tensor is ever written to memory;
* the backward pass (only the gradient w.r.t. the attention weights is
  needed: the inputs are detached) needs S[q, h] = sum_rows R[row, q]
  1[pre_row,h > 0] with per-row weights R = df * [code, P(e) (2),
  P(total) (2), 1]. Only three of them vary over j (df, df P_log(e),
  df P_sign(e)); the rest are per-(i, k) constants. The XLA path
  (:func:`_backward_sums_fused`) accumulates the three sums over j in
  registers, one fused loop over [rows_i, K, hidden] per column chunk of
  ``BACKWARD_COLUMNS`` pairs, then contracts the per-(i, k) constants in a
  small einsum: no [rows, hidden] tensor is written. The graph path
  (``jit_compile=False``) uses one skinny matmul per row chunk on the
  materialized activity mask. dH1 = h2 * S[:5], dc1 = h2 * S[5]; the
  output-layer gradient is recovered from the same sums
  (sum_row df relu(pre_h) = sum_q H1[q, h] S[q, h] + c1[h] S[1, h]).

Cost (benchmarks/train_step.py): the forward runs near the dense-matmul
rate per CPU-second in naive-MLP FLOPs; the backward does three masked sums
per (row, h), each re-evaluating the pre-activation (XLA:CPU has no
multi-output fusion), so it is ~3x the forward.
"""

import math

import keras
import numpy as np
import tensorflow as tf

NUM_INPUTS = 5
# Rows of the first-layer kernel, in the order of x in eq. (11).
_CODE, _PAIR_LOG, _PAIR_SIGN, _TOTAL_LOG, _TOTAL_SIGN = range(NUM_INPUTS)


@keras.saving.register_keras_serializable(package="uhga_tf")
class AttentionNet(keras.layers.Layer):
    """Score one member of a pair on one bit: f_phi(x) of eq. (13).

    Input x [..., 5] = [own code, P(pair gradient) (2), P(total gradient)
    (2)]; output f [...]. ``grad_p`` is p of the preprocessing P (12), used by
    :meth:`preprocess`. Init is GA-init (PyTorch Linear default):
    U(+-1/sqrt(5)) for H1 and c1, U(+-1/sqrt(hidden_units)) for h2 and c2.

    Example:
    >>> net = AttentionNet()
    >>> logits = net(tf.zeros([7, 5]))  # [7]
    """

    def __init__(self, hidden_units=100, grad_p=10.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(hidden_units, int) or hidden_units < 1:
            raise ValueError(
                "hidden_units must be an integer >= 1; received "
                f"hidden_units={hidden_units!r}"
            )
        if not grad_p > 0:
            raise ValueError(
                f"grad_p must be > 0; received grad_p={grad_p!r}"
            )
        self.hidden_units = hidden_units
        self.grad_p = float(grad_p)
        self.seed = seed

    def _seed(self, offset):
        return None if self.seed is None else int(self.seed) * 4 + offset

    def build(self, input_shape=None):
        in_limit = 1.0 / math.sqrt(NUM_INPUTS)
        out_limit = 1.0 / math.sqrt(self.hidden_units)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(NUM_INPUTS, self.hidden_units),
            initializer=keras.initializers.VarianceScaling(
                scale=1.0 / 3.0, mode="fan_in", distribution="uniform",
                seed=self._seed(0),
            ),
        )
        self.bias = self.add_weight(
            name="bias",
            shape=(self.hidden_units,),
            initializer=keras.initializers.RandomUniform(
                -in_limit, in_limit, seed=self._seed(1)
            ),
        )
        self.output_kernel = self.add_weight(
            name="output_kernel",
            shape=(self.hidden_units, 1),
            initializer=keras.initializers.RandomUniform(
                -out_limit, out_limit, seed=self._seed(2)
            ),
        )
        self.output_bias = self.add_weight(
            name="output_bias",
            shape=(1,),
            initializer=keras.initializers.RandomUniform(
                -out_limit, out_limit, seed=self._seed(3)
            ),
        )

    def call(self, inputs):
        hidden = keras.ops.relu(keras.ops.matmul(inputs, self.kernel) + self.bias)
        return keras.ops.matmul(hidden, self.output_kernel)[..., 0] + (
            self.output_bias[0]
        )

    def preprocess(self, values):
        """P(y) of eq. (12): returns (log-or-minus-one, sign-or-scaled)."""
        return preprocess_gradient(values, self.grad_p)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_units=self.hidden_units, grad_p=self.grad_p, seed=self.seed
        )
        return config


def preprocess_gradient(values, grad_p=10.0):
    """L2L preprocessing (12); returns two tensors shaped like ``values``.

    P(y) = (ln(|y| + 1e-6) / p, sgn y) if |y| > e^-p, else (-1, e^p y).
    """
    values = tf.convert_to_tensor(values)
    magnitude = tf.abs(values)
    large = magnitude > math.exp(-grad_p)
    first = tf.where(
        large,
        tf.math.log(magnitude + 1e-6) / grad_p,
        -tf.ones_like(values),
    )
    second = tf.where(large, tf.sign(values), math.exp(grad_p) * values)
    return first, second


def _forward_kernel(own, total_log, total_sign, pair_log, pair_sign, kernel,
                    bias, output_kernel, output_bias):
    """f [R, C, K] for own/total [R, K], pair [R, C, K] (unrolled over h)."""
    hidden_units = kernel.shape[1]
    base_code = own[:, None, :]
    logits = tf.zeros_like(pair_log) + output_bias[0]
    for h in range(hidden_units):
        base = (
            base_code * kernel[_CODE, h]
            + total_log[:, None, :] * kernel[_TOTAL_LOG, h]
            + total_sign[:, None, :] * kernel[_TOTAL_SIGN, h]
            + bias[h]
        )
        pre = base + pair_log * kernel[_PAIR_LOG, h] + (
            pair_sign * kernel[_PAIR_SIGN, h]
        )
        logits = logits + output_kernel[h, 0] * tf.nn.relu(pre)
    return logits


def _row_preactivation(own, total_log, total_sign, kernel, bias):
    """The per-(row, code bit) part of the first layer, [R, K, hidden].

    Own code and P(total) are constant over the pair axis, so their share of
    the first-layer pre-activation is computed once per row; the pair terms
    are added per column by the callers.
    """
    return (
        own[:, :, None] * kernel[_CODE]
        + total_log[:, :, None] * kernel[_TOTAL_LOG]
        + total_sign[:, :, None] * kernel[_TOTAL_SIGN]
        + bias
    )


def _backward_sums(own, total_log, total_sign, pair_log, pair_sign, kernel,
                   bias, upstream):
    """S [6, hidden]: S[q, h] = sum_rows R[row, q] * 1[pre_row,h > 0].

    q indexes (code, pair_log, pair_sign, total_log, total_sign, one).
    """
    ones = tf.ones_like(pair_log)
    per_row = tf.stack(
        [
            own[:, None, :] * ones,
            pair_log,
            pair_sign,
            total_log[:, None, :] * ones,
            total_sign[:, None, :] * ones,
            ones,
        ],
        axis=-1,
    ) * upstream[..., None]
    base = _row_preactivation(own, total_log, total_sign, kernel, bias)
    pre = (
        base[:, None]
        + pair_log[..., None] * kernel[_PAIR_LOG]
        + pair_sign[..., None] * kernel[_PAIR_SIGN]
    )  # [R, C, K, H]
    active = tf.cast(pre > 0, pre.dtype)
    hidden_units = kernel.shape[1]
    return tf.matmul(
        tf.reshape(per_row, [-1, 6]),
        tf.reshape(active, [-1, hidden_units]),
        transpose_a=True,
    )


def _backward_sums_fused(own, total_log, total_sign, pair_log, pair_sign,
                         kernel, bias, upstream):
    """S [6, hidden] like :func:`_backward_sums`, without a [rows, hidden] mask.

    For the XLA path. The reduction over the pair axis j is unrolled (j is
    the short axis, one column chunk), so the three per-(i, k, h)
    accumulators T_q = sum_j 1[pre_ijk,h > 0] * upstream_ijk * x_q,ijk,
    x_q in (1, P_log(e), P_sign(e)), stay in registers: one fused pass over
    [R, K, hidden] per column, about 2 + 3 * 2 flops per (row, h) instead
    of writing and re-reading a [rows, hidden] activity mask. The per-(i, k)
    inputs (own code, P(total), 1) are then contracted with T_1 in one small
    einsum (they are constant over j).
    """
    base = _row_preactivation(own, total_log, total_sign, kernel, bias)
    w_log, w_sign = kernel[_PAIR_LOG], kernel[_PAIR_SIGN]
    up_log = upstream * pair_log
    up_sign = upstream * pair_sign
    zero = tf.zeros([], base.dtype)
    t_one = t_log = t_sign = tf.zeros_like(base)
    for j in range(int(pair_log.shape[1])):
        pre = (
            base
            + pair_log[:, j, :, None] * w_log
            + pair_sign[:, j, :, None] * w_sign
        )
        active = pre > 0
        t_one = t_one + tf.where(active, upstream[:, j, :, None], zero)
        t_log = t_log + tf.where(active, up_log[:, j, :, None], zero)
        t_sign = t_sign + tf.where(active, up_sign[:, j, :, None], zero)
    per_ik = tf.stack(
        [own, total_log, total_sign, tf.ones_like(own)], axis=-1
    )  # [R, K, 4]
    s4 = tf.einsum("rkq,rkh->qh", per_ik, t_one)
    return tf.stack(
        [
            s4[0],
            tf.reduce_sum(t_log, [0, 1]),
            tf.reduce_sum(t_sign, [0, 1]),
            s4[1],
            s4[2],
            s4[3],
        ]
    )


# Pair columns per call of the fused XLA backward: its unrolled loop (and
# so the compile time) is bounded by this, whatever the batch size.
BACKWARD_COLUMNS = 32

_forward_xla = tf.function(_forward_kernel, jit_compile=True, autograph=False)
_backward_xla = tf.function(
    _backward_sums_fused, jit_compile=True, autograph=False
)
_forward_graph = tf.function(_forward_kernel, autograph=False)
_backward_graph = tf.function(_backward_sums, autograph=False)


def _chunks(total, chunk_rows):
    if chunk_rows <= 0 or chunk_rows >= total:
        return [(0, total)]
    return [
        (start, min(start + chunk_rows, total))
        for start in range(0, total, chunk_rows)
    ]


def member_logits(own, total_log, total_sign, pair_log, pair_sign, kernel,
                  bias, output_kernel, output_bias, chunk_rows=0,
                  jit_compile=True):
    """f_phi for one pair member on all rows: [R, C, K] (eqs. (11), (13)).

    Differentiable w.r.t. the four attention weights only (the inputs are
    detached, §9). ``chunk_rows`` > 0 bounds the backward pass memory to
    chunk_rows * C * K * hidden floats.
    """
    forward = _forward_xla if jit_compile else _forward_graph
    backward = _backward_xla if jit_compile else _backward_graph
    inputs = [
        tf.stop_gradient(t)
        for t in (own, total_log, total_sign, pair_log, pair_sign)
    ]
    if pair_log.shape.rank != 3 or None in pair_log.shape.as_list():
        raise ValueError(
            "the attention path needs static batch shapes (batch with "
            "drop_remainder=True); received pair inputs of shape "
            f"{pair_log.shape}"
        )
    rows = int(pair_log.shape[0])

    @tf.custom_gradient
    def _logits(kernel, bias, output_kernel, output_bias):
        logits = tf.concat(
            [
                forward(*[t[a:b] for t in inputs], kernel, bias,
                        output_kernel, output_bias)
                for a, b in _chunks(rows, chunk_rows)
            ],
            axis=0,
        )

        def grad(upstream):
            columns = int(pair_log.shape[1])
            column_chunks = (
                _chunks(columns, BACKWARD_COLUMNS) if jit_compile
                else [(0, columns)]
            )
            parts = []
            for a, b in _chunks(rows, chunk_rows):
                own_, total_log_, total_sign_ = (t[a:b] for t in inputs[:3])
                for c, d in column_chunks:
                    parts.append(backward(
                        own_, total_log_, total_sign_,
                        inputs[3][a:b, c:d], inputs[4][a:b, c:d], kernel,
                        bias, upstream[a:b, c:d],
                    ))
            sums = tf.add_n(parts)
            # [6, H]: code, pair_log, pair_sign, total_log, total_sign, 1
            h2 = output_kernel[:, 0]
            d_kernel = sums[:NUM_INPUTS] * h2
            d_bias = sums[NUM_INPUTS] * h2
            d_output = tf.reduce_sum(sums[:NUM_INPUTS] * kernel, 0) + (
                sums[NUM_INPUTS] * bias
            )
            d_output_bias = tf.reshape(tf.reduce_sum(upstream), [1])
            return d_kernel, d_bias, d_output[:, None], d_output_bias

        return logits, grad

    return _logits(
        tf.convert_to_tensor(kernel),
        tf.convert_to_tensor(bias),
        tf.convert_to_tensor(output_kernel),
        tf.convert_to_tensor(output_bias),
    )


def _attention_terms(relaxed_u, relaxed_v, pair_grad, attention_net,
                     grad_p, chunk_rows, within, jit_compile):
    u = tf.stop_gradient(tf.convert_to_tensor(relaxed_u))
    v = tf.stop_gradient(tf.convert_to_tensor(relaxed_v))
    g = tf.stop_gradient(tf.convert_to_tensor(pair_grad))
    g_t = tf.transpose(g)
    total_u = tf.matmul(g, v)  # (G V)_ik, eq. (9)
    total_v = tf.matmul(g_t, u)  # (G^T U)_jk
    pair_u = g[:, :, None] * v[None, :, :]  # e1_ijk = g_ij v_jk   [i, j, k]
    pair_v_t = g_t[:, :, None] * u[None, :, :]  # e2_ijk as [j, i, k]
    weights = (
        attention_net.kernel,
        attention_net.bias,
        attention_net.output_kernel,
        attention_net.output_bias,
    )
    f_u = member_logits(
        u, *preprocess_gradient(total_u, grad_p),
        *preprocess_gradient(pair_u, grad_p), *weights,
        chunk_rows=chunk_rows, jit_compile=jit_compile,
    )
    f_v_t = member_logits(
        v, *preprocess_gradient(total_v, grad_p),
        *preprocess_gradient(pair_v_t, grad_p), *weights,
        chunk_rows=chunk_rows, jit_compile=jit_compile,
    )
    attention_weights = tf.sigmoid(f_u - tf.transpose(f_v_t, [1, 0, 2]))
    return attention_weights, pair_u, tf.transpose(pair_v_t, [1, 0, 2])


def attention_weights(relaxed_u, relaxed_v, pair_grad, attention_net,
                      grad_p=10.0, jit_compile=True):
    """a1 [B, B, K] of eq. (14): weight of member 1 (u_i) on pair (i, j)."""
    weights, _, _ = _attention_terms(
        relaxed_u, relaxed_v, pair_grad, attention_net, grad_p, 0, False,
        jit_compile,
    )
    return weights


def attend(relaxed_u, relaxed_v, pair_grad, attention_net, budget=2.0,
           grad_p=10.0, chunk_rows=0, within=False, return_stats=False,
           jit_compile=True):
    """Attended code gradients of eqs. (10)-(17).

    Args:
        relaxed_u: [B1, K] relaxed codes of branch 1 (detached here).
        relaxed_v: [B2, K] relaxed codes of branch 2 (for ``within``, the
            same tensor as relaxed_u).
        pair_grad: G [B1, B2], g_ij = dL/dq_ij.
        attention_net: AttentionNet (built).
        budget: per-pair budget (2 = eq. (15)); a1 = a2 = 1/2 gives the
            plain gradient.
        grad_p: p of the preprocessing (12).
        chunk_rows: > 0 processes the attention rows i in chunks of this
            many (bounds backward memory); 0 = one chunk.
        within: pairs of a batch with itself; the diagonal pairs (i, i) take
            no attention and pass their plain gradient unchanged.
        return_stats: also return {"attention_mean", "attention_std"} of a1
            (off-diagonal entries for ``within``).
        jit_compile: use the XLA-fused kernels (False = plain graph ops).

    Returns:
        (attended_u [B1, K], attended_v [B2, K]) = (Ĝ^U, Ĝ^V); for
        ``within`` the code gradient is their sum. With return_stats, a
        third element, the stats dict.
    """
    weights, pair_u, pair_v = _attention_terms(
        relaxed_u, relaxed_v, pair_grad, attention_net, grad_p, chunk_rows,
        within, jit_compile,
    )
    weight_u = budget * weights
    weight_v = budget * (1.0 - weights)
    if within:
        size = tf.shape(weights)[0]
        diagonal = tf.eye(size, dtype=tf.bool)[:, :, None]
        weight_u = tf.where(diagonal, tf.ones_like(weight_u), weight_u)
        weight_v = tf.where(diagonal, tf.ones_like(weight_v), weight_v)
    attended_u = tf.reduce_sum(weight_u * pair_u, axis=1)  # eq. (16)
    attended_v = tf.reduce_sum(weight_v * pair_v, axis=0)  # eq. (17)
    if not return_stats:
        return attended_u, attended_v
    stats_weights = tf.stop_gradient(weights)
    if within:
        size = tf.shape(weights)[0]
        off = tf.logical_not(tf.eye(size, dtype=tf.bool))
        stats_weights = tf.boolean_mask(stats_weights, off)
    mean = tf.reduce_mean(stats_weights)
    std = tf.sqrt(tf.reduce_mean(tf.square(stats_weights - mean)))
    return attended_u, attended_v, {"attention_mean": mean,
                                    "attention_std": std}


def attention_flops(batch_u, batch_v, code_length, hidden_units=100):
    """Analytic FLOPs of one forward + backward of the naive MLP rows.

    Per row: forward 2*5*H + H (bias) + H (ReLU) + 2*H (output) + 1;
    backward (weights only; inputs are detached) 2*H (dpre) + 2*5*H (dH1)
    + H (dc1) + 2*H (dh2) + 1. Rows = 2 * B1 * B2 * K.
    """
    forward = 2 * NUM_INPUTS * hidden_units + 4 * hidden_units + 1
    backward = 2 * NUM_INPUTS * hidden_units + 5 * hidden_units + 1
    rows = 2 * batch_u * batch_v * code_length
    return float(rows) * (forward + backward)


def numpy_preprocess(values, grad_p=10.0):
    """NumPy reference of (12) for tests."""
    values = np.asarray(values)
    large = np.abs(values) > math.exp(-grad_p)
    first = np.where(large, np.log(np.abs(values) + 1e-6) / grad_p, -1.0)
    second = np.where(large, np.sign(values), math.exp(grad_p) * values)
    return first, second
