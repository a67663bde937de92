"""The shallow baselines by name: `get_hasher` over the registry.

Importing this module registers every method (shallow.py: LSH, SH, SpH,
ITQ, DSH, PCAH; structural.py: the references built on the kNN graph and
clusters). The `Hasher` interface itself lives in `hasher.py`, which the
methods import, so no method module imports this one back.

Example:
    hasher = get_hasher("itq", 32).fit(train_features, seed=0)
    codes = hasher.encode(database_features)
"""

from uhga_tf.baselines import shallow  # noqa: F401 (registers its methods)
from uhga_tf.baselines import structural  # noqa: F401 (registers its methods)
from uhga_tf.baselines.hasher import HASHERS
from uhga_tf.baselines.hasher import Hasher
from uhga_tf.baselines.hasher import register
from uhga_tf.baselines.hasher import validate_features
from uhga_tf.baselines.hasher import validate_seed

__all__ = [
    "HASHERS",
    "Hasher",
    "get_hasher",
    "register",
    "validate_features",
    "validate_seed",
]


def get_hasher(name, code_length, **options):
    """Build an unfitted hasher by registry name (lsh, sh, sph, itq, dsh, pcah).

    Raises:
        ValueError: unknown name (the message lists the known ones), invalid
            code_length or options.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in HASHERS:
        raise ValueError(
            f"name must be one of {sorted(HASHERS)}; received name={name!r}"
        )
    return HASHERS[key](code_length, **options)
