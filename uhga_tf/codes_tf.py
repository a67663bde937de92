"""In-graph twins of `uhga_tf.codes` (the one code format), for SavedModels.

`codes.py` stays NumPy-only so that search and evaluation never import
TensorFlow; these two functions give the same bits inside a graph and are
pinned to `codes.binarize` / `codes.pack_codes` by tests/test_export.py.
"""

import tensorflow as tf

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def binarize_tf(logits):
    """In-graph twin of `codes.binarize`: int8, `>= 0 -> +1`, else -1.

    `logits` is the hasher's pre-activation z; sign(z) equals
    sign(tanh(s * z)), so the relaxed codes give the same bits.
    """
    return tf.where(
        logits >= 0, tf.constant(1, tf.int8), tf.constant(-1, tf.int8)
    )


def pack_codes_tf(codes):
    """In-graph twin of `codes.pack_codes` (`np.packbits` order, pad 0).

    Args:
        codes: int8 [n, code_length] in {-1, +1}, code_length static.

    Returns:
        uint8 [n, ceil(code_length / 8)].
    """
    code_length = codes.shape[-1]
    if code_length is None:
        raise ValueError("codes must have a static code_length")
    num_bytes = -(-code_length // 8)
    bits = tf.cast(codes > 0, tf.int32)
    pad = num_bytes * 8 - code_length
    if pad:
        bits = tf.pad(bits, [[0, 0], [0, pad]])
    bits = tf.reshape(bits, [-1, num_bytes, 8])
    packed = tf.reduce_sum(bits * tf.constant(_BIT_WEIGHTS, tf.int32), -1)
    return tf.cast(packed, tf.uint8)
