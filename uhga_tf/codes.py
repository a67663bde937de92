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


def bit_balance(codes):
    """Mean over bits of |mean of the bit|: 0 when every bit splits the
    items in half, 1 when every bit is constant."""
    codes = validate_codes(codes)
    return float(np.mean(np.abs(codes.mean(axis=0, dtype=np.float64))))


def code_statistics(codes):
    """What no label is needed for: how the codes spread over the items.

    Returns:
        {"bit_balance": `bit_balance`, "distinct_codes_share": distinct
        codes over items (1: every item its own code), "largest_bucket_share":
        the largest group of items with one code over items (a query that
        falls there gets that many ties at distance 0)}.
    """
    codes = validate_codes(codes)
    if not len(codes):
        raise ValueError("code_statistics needs at least one code")
    _, counts = np.unique(pack_codes(codes), axis=0, return_counts=True)
    return {
        "bit_balance": bit_balance(codes),
        "distinct_codes_share": len(counts) / len(codes),
        "largest_bucket_share": int(counts.max()) / len(codes),
    }


def describe_code_statistics(statistics):
    """One line of `code_statistics` for the command lines."""
    return (f"{statistics['distinct_codes_share']:.1%} of them distinct, the "
            f"largest bucket {statistics['largest_bucket_share']:.2%} of the "
            f"items, bit balance {statistics['bit_balance']:.3f} (0 is ideal)")


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


def distance_dtype(code_length):
    """Smallest unsigned dtype holding a distance in [0, code_length]."""
    return np.uint8 if code_length <= np.iinfo(np.uint8).max else np.uint16


def _packed_words(packed_codes):
    """Packed codes as 64-bit words, [num_words, n] uint64 (zero pad bits)."""
    num_words = -(-packed_codes.shape[1] // 8)
    padded = np.zeros((packed_codes.shape[0], 8 * num_words), dtype=np.uint8)
    padded[:, : packed_codes.shape[1]] = packed_codes
    return np.ascontiguousarray(padded.view(np.uint64).T)


def _augmented(codes, scale, constant):
    """float32 [n, K + 1]: codes * scale with a constant last column."""
    augmented = np.empty((codes.shape[0], codes.shape[1] + 1), np.float32)
    augmented[:, :-1] = codes
    augmented[:, :-1] *= scale
    augmented[:, -1] = constant
    return augmented


def _database_matrix(database_codes):
    """float32 [K + 1, n]: database codes as columns over a row of ones."""
    return np.ascontiguousarray(_augmented(database_codes, 1.0, 1.0).T)


class DistanceKernel:
    """Hamming distances of query batches against one fixed database.

    The one Hamming distance of uhga_tf: d = popcount(q xor n) = (code_length
    - q . n) / 2, computed on the packed bits (`pack_codes`) as 64-bit words
    with `np.bitwise_count`; the database is packed once. With NumPy < 2.0
    (no `bitwise_count`) it falls back to one float32 matrix product with an
    appended constant column, so the product is the distance itself (exact:
    every value is an integer below 2**24).

    Args:
        database_codes: int8 [n_database, code_length] in {-1, +1}.
        use_popcount: None picks popcount when NumPy has `bitwise_count`.
    """

    def __init__(self, database_codes, use_popcount=None):
        database_codes = np.asarray(database_codes, dtype=np.int8)
        self._configure(*database_codes.shape[::-1], use_popcount)
        if self.use_popcount:
            self._database_words = _packed_words(pack_codes(database_codes))
        else:
            self._database_t = _database_matrix(database_codes)

    @classmethod
    def from_packed(cls, database_packed, code_length, use_popcount=None):
        """A kernel over packed_codes uint8 [n_database, ceil(K / 8)]."""
        database_packed = np.asarray(database_packed, dtype=np.uint8)
        kernel = cls.__new__(cls)
        kernel._configure(code_length, database_packed.shape[0], use_popcount)
        if kernel.use_popcount:
            kernel._database_words = _packed_words(database_packed)
        else:
            database_codes = unpack_codes(database_packed, code_length)
            kernel._database_t = _database_matrix(database_codes)
        return kernel

    def _configure(self, code_length, num_database, use_popcount):
        self.code_length = int(code_length)
        self.num_database = int(num_database)
        self.dtype = distance_dtype(self.code_length)
        if use_popcount is None:
            use_popcount = hasattr(np, "bitwise_count")
        self.use_popcount = use_popcount

    def __call__(self, query_codes):
        """Distances, [n_query, num_database] uint8/uint16 in [0, K]."""
        query_codes = np.asarray(query_codes)
        if self.use_popcount:
            return self._popcount(_packed_words(pack_codes(query_codes)))
        return self._matmul(query_codes)

    def packed(self, query_packed):
        """`__call__` for packed query codes uint8 [n_query, ceil(K / 8)]."""
        query_packed = np.asarray(query_packed, dtype=np.uint8)
        if self.use_popcount:
            return self._popcount(_packed_words(query_packed))
        return self._matmul(unpack_codes(query_packed, self.code_length))

    def _matmul(self, query_codes):
        augmented = _augmented(query_codes, -0.5, self.code_length / 2)
        return (augmented @ self._database_t).astype(self.dtype)

    def _popcount(self, query_words):
        shape = (query_words.shape[1], self.num_database)
        if not len(query_words):  # code_length 0
            return np.zeros(shape, dtype=self.dtype)
        xor = np.empty(shape, dtype=np.uint64)
        counts = np.empty(shape, dtype=np.uint8)
        if len(query_words) == 1 and self.dtype == np.uint8:
            np.bitwise_xor(query_words[0][:, None],
                           self._database_words[0][None, :], out=xor)
            return np.bitwise_count(xor, out=counts)
        distances = None
        for query_word, database_word in zip(
            query_words, self._database_words
        ):
            np.bitwise_xor(query_word[:, None], database_word[None, :],
                           out=xor)
            np.bitwise_count(xor, out=counts)
            if distances is None:
                distances = counts.astype(self.dtype)
            else:
                distances += counts
        return distances


def hamming_distance(query_codes, database_codes):
    """Hamming distances between every query and every database code.

    d(q, n) = (code_length - q . n) / 2, computed by `DistanceKernel`.

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
    return DistanceKernel(database_codes)(query_codes).astype(np.int32)


def packed_hamming_distance(query_packed, database_packed):
    """Hamming distances between packed codes (`DistanceKernel.packed`).

    Returns:
        int32 [n_query, n_database].
    """
    database_packed = np.asarray(database_packed, dtype=np.uint8)
    kernel = DistanceKernel.from_packed(
        database_packed, 8 * database_packed.shape[1]
    )
    return kernel.packed(query_packed).astype(np.int32)


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
