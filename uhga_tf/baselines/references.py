"""The cheap code references the tables and training compare against.

A reference is a registered shallow hasher, its options and the set it fits
on; `shallow_codes` fits one and encodes the retrieval sets. Training
(`training.run.itq_map`) and the paper tables (`uhga_tf.tables`) both call
it, so it lives here rather than in either of them.
"""

import dataclasses

SHALLOW_METHODS = {"LSH": "lsh", "SH": "sh", "SpH": "sph", "ITQ": "itq",
                   "DSH": "dsh", "PCAH": "pcah"}


@dataclasses.dataclass(frozen=True)
class Reference:
    """A code reference: a registered hasher, its options, what it fits on.

    ``fit_set`` "database" fits on the whole unlabelled database, as a user
    with the collection in hand can (the query set is never seen).
    """

    hasher: str
    options: tuple = ()
    fit_set: str = "train"


# The strongest cheap code references (protocol.md §6.6): ITQ in three
# preparations and two that use the product's kNN graph and clusters
# without learning (baselines/structural.py). "ITQ (best)" is the ITQ
# variant with the best validation MAP, chosen in benchmarks/quality.py.
REFERENCES = {
    **{name: Reference(key) for name, key in SHALLOW_METHODS.items()},
    "ITQ (unit)": Reference("itq", (("unit_rows", True),)),
    "ITQ (unit, database)": Reference(
        "itq", (("unit_rows", True),), "database"),
    "Spectral+ITQ": Reference("spectral_itq"),
    "k-means+LS": Reference("kmeans_ls"),
    # The same two on a 10-NN graph (k-means+LS also on the product's
    # ladder, cluster size 80): better on CIFAR-10 validation at 20,000
    # train images from 32 bits on, so each reference gets its best
    # chance; the margins take the best of every row.
    "Spectral+ITQ (k=10)": Reference("spectral_itq", (("knn", 10),)),
    "k-means+LS (k=10)": Reference(
        "kmeans_ls", (("knn", 10), ("cluster_size", 80))),
}
ITQ_VARIANTS = ("ITQ", "ITQ (unit)", "ITQ (unit, database)")
STRUCTURAL_REFERENCES = ("Spectral+ITQ", "k-means+LS", "Spectral+ITQ (k=10)",
                         "k-means+LS (k=10)")


def reference_settings(method):
    """What a reference fits with: hasher, every option, the fit set."""
    from uhga_tf.baselines import base

    reference = REFERENCES[method]
    defaults = base.HASHERS[reference.hasher].DEFAULT_OPTIONS
    return {"hasher": reference.hasher,
            "options": {**defaults, **dict(reference.options)},
            "fit_set": reference.fit_set}


def shallow_codes(method, code_length, sets, seed,
                  encode=("query", "database")):
    """Fit a reference as `REFERENCES` says; codes of the `encode` sets."""
    # Imported here: the registry pulls in structural.py (and TensorFlow
    # through the similarity modules); the names above must stay light.
    from uhga_tf.baselines import base

    hasher = fit_reference(method, code_length, sets, seed)
    return tuple(hasher.encode(sets.features[name]) for name in encode)


def fit_reference(method, code_length, sets, seed):
    """The reference's hasher as `REFERENCES` says, fitted on its fit set."""
    from uhga_tf.baselines import base

    reference = REFERENCES[method]
    hasher = base.get_hasher(
        reference.hasher, code_length, **dict(reference.options))
    return hasher.fit(sets.features[reference.fit_set], seed=seed)
