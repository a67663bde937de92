"""The one code format of uhga_tf.

`codes` are int8 arrays in {-1, +1} of shape [n, code_length]; `packed_codes`
are uint8 arrays of shape [n, ceil(code_length / 8)] in `np.packbits` order:
code bit 0 is the most significant bit of byte 0, and a code bit is set iff
the code is +1. Every producer (evaluation, SavedModel, search index) uses
these functions or their in-graph twins so that packed codes agree bit for
bit across the system.
"""

import numpy as np

MIN_CODE_LENGTH = 8
MAX_CODE_LENGTH = 1024

# Popcount of every byte value; the table makes Hamming distances on packed
# codes one gather plus one sum, with no unpacking.
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def binarize(relaxed_codes):
    """Map real outputs to codes with the rule `>= 0 -> +1`, else -1.

    Args:
        relaxed_codes: float array [n, code_length] (tanh outputs or logits).

    Returns:
        codes: int8 [n, code_length] in {-1, +1}; never 0 (unlike np.sign).
    """
    relaxed_codes = np.asarray(relaxed_codes)
    return np.where(relaxed_codes >= 0, 1, -1).astype(np.int8)


def validate_codes(codes, name="codes"):
    """Check that `codes` is a 2-D array of -1/+1 values; return it as int8.

    Raises:
        ValueError: naming `name` when the array is not 2-D or holds any value
            other than -1 and +1 (a 0 from `np.sign` included).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array [n, code_length]; received shape "
            f"{codes.shape}"
        )
    if codes.size and not np.all((codes == 1) | (codes == -1)):
        bad = np.unique(codes[(codes != 1) & (codes != -1)])[:5]
        raise ValueError(
            f"{name} must hold only -1 and +1; received values {bad.tolist()}"
        )
    return codes.astype(np.int8, copy=False)


def pack_codes(codes):
    """Pack int8 {-1, +1} codes into bits (`np.packbits` order, +1 -> 1).

    Returns:
        packed_codes: uint8 [n, ceil(code_length / 8)]; trailing pad bits 0.
    """
    codes = validate_codes(codes)
    return np.packbits(codes > 0, axis=1)


def unpack_codes(packed_codes, code_length):
    """Invert `pack_codes`.

    Args:
        packed_codes: uint8 [n, ceil(code_length / 8)].
        code_length: number of code bits to keep.

    Returns:
        codes: int8 [n, code_length] in {-1, +1}.
    """
    packed_codes = np.asarray(packed_codes)
    expected = -(-code_length // 8)
    if packed_codes.ndim != 2 or packed_codes.shape[1] != expected:
        raise ValueError(
            f"packed_codes must have shape [n, {expected}] for "
            f"code_length={code_length}; received shape {packed_codes.shape}"
        )
    if packed_codes.dtype != np.uint8:
        raise ValueError(
            f"packed_codes must be uint8; received dtype {packed_codes.dtype}"
        )
    bits = np.unpackbits(packed_codes, axis=1, count=code_length)
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


def hamming_distance(query_codes, database_codes):
    """Hamming distances between every query and every database code.

    d(q, n) = (code_length - q . n) / 2, computed as an integer matrix product.

    Args:
        query_codes: int8 [n_query, code_length] in {-1, +1}.
        database_codes: int8 [n_database, code_length] in {-1, +1}.

    Returns:
        int32 [n_query, n_database] in [0, code_length].
    """
    query_codes = validate_codes(query_codes, "query_codes")
    database_codes = validate_codes(database_codes, "database_codes")
    if query_codes.shape[1] != database_codes.shape[1]:
        raise ValueError(
            "query_codes and database_codes must have the same code_length; "
            f"received {query_codes.shape[1]} and {database_codes.shape[1]}"
        )
    code_length = query_codes.shape[1]
    # float32 matmul is exact for |q . n| <= 1024 and uses BLAS.
    inner = query_codes.astype(np.float32) @ database_codes.T.astype(
        np.float32
    )
    return ((code_length - inner) / 2).astype(np.int32)


def packed_hamming_distance(query_packed, database_packed):
    """Hamming distances between packed codes via a byte popcount table.

    Returns:
        int32 [n_query, n_database].
    """
    query_packed = np.asarray(query_packed, dtype=np.uint8)
    database_packed = np.asarray(database_packed, dtype=np.uint8)
    xor = np.bitwise_xor(query_packed[:, None, :], database_packed[None, :, :])
    return _POPCOUNT[xor].sum(axis=-1, dtype=np.int32)


def check_code_length(code_length):
    """Raise ValueError unless code_length is a multiple of 8 in [8, 1024]."""
    if (
        isinstance(code_length, bool)
        or not isinstance(code_length, (int, np.integer))
        or code_length % 8
        or not MIN_CODE_LENGTH <= code_length <= MAX_CODE_LENGTH
    ):
        raise ValueError(
            "code_length must be a multiple of 8 in "
            f"[{MIN_CODE_LENGTH}, {MAX_CODE_LENGTH}]; received "
            f"code_length={code_length!r}"
        )
    return int(code_length)
