"""The `Hasher` interface of the shallow baselines and the `register` hook.

A hasher is fitted on train features (protocol §5: the train-split mean is
subtracted first when `center=True`) and encodes features into codes:
int8 [n, code_length] in {-1, +1}. Every method owns a
`np.random.default_rng(seed)` made in `fit`; nothing touches the global
`np.random` state. `save` writes one .npz holding the method name,
code_length, options (JSON) and the fitted arrays; `load` refuses a file
written by another method.

Example:
    hasher = base.get_hasher("itq", 32).fit(train_features, seed=0)
    codes = hasher.encode(database_features)
"""

import json
import os

import numpy as np

from uhga_tf import codes as codes_lib
from uhga_tf import io_utils

HASHERS = {}


def register(cls):
    """Class decorator: add a Hasher subclass to HASHERS under cls.name."""
    HASHERS[cls.name] = cls
    return cls


def validate_features(features, name="features", num_dims=None):
    """Return features as a finite float64 [n, D] array.

    Raises:
        ValueError: not 2-D, empty, non-finite, or D != num_dims.
    """
    from uhga_tf.similarity import features as features_lib

    return features_lib.check_features(
        features, name, num_dims=num_dims, dtype=np.float64)


def validate_seed(seed):
    """Return seed as an int; raise ValueError unless it is an int >= 0."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or seed < 0
    ):
        raise ValueError(f"seed must be an int >= 0; received seed={seed!r}")
    return int(seed)


class Hasher:
    """Base class: fit on train features, encode to {-1, +1} codes.

    Subclasses set `name`, `DEFAULT_OPTIONS` (every option and its default;
    `center` and `unit_rows`, L2-normalise rows before centring, are common
    to all), implement `_fit(features, rng)` on centred
    features and `_encode(features)` returning int8 codes, and list their
    fitted arrays in `ARRAYS`.
    """

    name = ""
    DEFAULT_OPTIONS = {}
    ARRAYS = ()

    def __init__(self, code_length, **options):
        self.code_length = codes_lib.check_code_length(code_length)
        defaults = {"center": True, "unit_rows": False,
                    **self.DEFAULT_OPTIONS}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ValueError(
                f"{self.name} options must be among {sorted(defaults)}; "
                f"received {unknown}"
            )
        self.options = {**defaults, **options}
        for key in ("center", "unit_rows"):
            if not isinstance(self.options[key], (bool, np.bool_)):
                raise ValueError(
                    f"{key} must be True or False; received "
                    f"{key}={self.options[key]!r}"
                )
        self._validate_options()
        self.mean = None

    def _validate_options(self):
        """Check method options; raise ValueError naming the bad one."""

    @staticmethod
    def _check_int_option(name, value, low, high=None):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or value < low
            or (high is not None and value > high)
        ):
            limit = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(
                f"{name} must be an int {limit}; received {name}={value!r}"
            )

    @property
    def fitted(self):
        return self.mean is not None

    def _center(self, features):
        if self.options["unit_rows"]:
            from uhga_tf.similarity import features as features_lib

            # Cosine geometry: the features' norms carry no similarity.
            features = features_lib.unit_rows(features, dtype=features.dtype)
        return features - self.mean

    def fit(self, features, seed):
        """Fit on train features [n, D]; return self.

        The train mean is stored and subtracted (zeros when center=False).
        All randomness comes from np.random.default_rng(seed).
        """
        features = validate_features(features, "features")
        seed = validate_seed(seed)
        self.mean = np.zeros(features.shape[1])
        if self.options["center"]:
            self.mean = self._center(features).mean(axis=0)
        self._fit(self._center(features), np.random.default_rng(seed))
        return self

    def encode(self, features):
        """Codes of features [n, D]: int8 [n, code_length] in {-1, +1}."""
        if not self.fitted:
            raise ValueError(f"{self.name} hasher must be fitted before encode")
        features = validate_features(features, "features",
                                     num_dims=self.mean.shape[0])
        return self._encode(self._center(features))

    def _fit(self, features, rng):
        raise NotImplementedError

    def _encode(self, features):
        raise NotImplementedError

    def linear_map(self):
        """Kernel [D, K] with codes = sgn(centred rows @ kernel).

        Only hashers that encode by one matrix product and a sign have one
        (ITQ, the structural references); it is what lets a fitted hasher
        become a Keras hasher and a SavedModel (`keras_hasher`).
        """
        raise ValueError(
            f"{self.name} does not encode by one matrix product and a sign, "
            "so it has no linear map to export"
        )

    def save(self, path):
        """Write name, code_length, options and fitted arrays to an .npz."""
        if not self.fitted:
            raise ValueError(f"{self.name} hasher must be fitted before save")
        path = os.fspath(path)
        arrays = {f"array_{k}": getattr(self, k) for k in self.ARRAYS}
        # The ".npz" suffix stops np.savez from renaming the temporary file.
        with io_utils.atomic_path(path, suffix=".npz") as tmp:
            np.savez(
                tmp,
                name=np.array(self.name),
                code_length=np.array(self.code_length),
                options=np.array(json.dumps(self.options, sort_keys=True)),
                mean=self.mean,
                **arrays,
            )
        return path

    @classmethod
    def load(cls, path):
        """Read a hasher written by `save`.

        Called on `Hasher`, returns the class named in the file; called on a
        subclass, refuses a file written by another method. The class must
        be registered: importing `uhga_tf.baselines.base` registers them all.

        Raises:
            ValueError: the file's method differs from cls, or is unknown.
        """
        with np.load(os.fspath(path), allow_pickle=False) as data:
            name = str(data["name"])
            if cls is not Hasher and name != cls.name:
                raise ValueError(
                    f"path holds a {name!r} hasher, not {cls.name!r}; "
                    f"received path={os.fspath(path)!r}"
                )
            if name not in HASHERS:
                raise ValueError(
                    f"path holds an unknown hasher {name!r}; known: "
                    f"{sorted(HASHERS)}"
                )
            hasher = HASHERS[name](
                int(data["code_length"]), **json.loads(str(data["options"]))
            )
            hasher.mean = data["mean"]
            for key in hasher.ARRAYS:
                setattr(hasher, key, data[f"array_{key}"])
        return hasher

