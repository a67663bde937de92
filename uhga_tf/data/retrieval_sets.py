"""Backbone features and labels of the train/query/database/validation sets.

The one place where a dataset, its split protocol and the feature cache meet:
training, evaluation and the table reproduction all start from
`load_retrieval_sets`, so every method sees the same features.

Besides the image datasets, `dataset="features"` reads precomputed features
from an `.npz` file (`data_dir`) with arrays `features` float [N, D],
`labels` [N] or multi-hot [N, C] (leave it out for an unlabelled
collection, with `split=collection`), and either `partition` [N]
("train"/"test") or the split itself as index arrays `query`, `train`,
`database`, `validation`. It lets users bring features from any extractor.
"""

import dataclasses
import os
import typing

import numpy as np
from absl import logging

from uhga_tf.data.image_dataset import UNLABELLED, is_unlabelled

SETS = ("train", "query", "database", "validation")


@dataclasses.dataclass
class RetrievalSets:
    """Features and labels per set; `indices` index the source dataset.

    Attributes:
        features: {set: float32 [n, D]}.
        labels: {set: int64 [n] or uint8 multi-hot [n, C]}.
        indices: {set: int64 [n]}; the database in one seed-shuffled
            order (`shuffle_database`), so no tie rule can follow labels.
        feature_dim: D.
        description: provenance for logs and result headers.
        image_dataset: the `datasets.ImageDataset` that `indices` index
            (None for `dataset="features"`); the end-to-end path
            (`trainable_backbone=true`) trains and encodes on its images.
        split_seed: the seed the split and the database order were drawn
            with (None when unknown), so the same sets can be read again
            with another backbone's features.
    """

    features: dict
    labels: dict
    indices: dict
    feature_dim: int
    description: str
    image_dataset: object = None
    split_seed: typing.Optional[int] = None

    @property
    def labelled(self) -> bool:
        """False for an unlabelled collection (every label `UNLABELLED`):
        nothing that reads labels (MAP, diagnostics) may run on it."""
        return not is_unlabelled(self.labels["train"])


def validation_database_mask(sets):
    """bool [n_database]: database rows that are not validation queries.

    Validation queries are ranked against the database without themselves
    (protocol.md §1.3).
    """
    validation = set(sets.indices["validation"].tolist())
    return np.array(
        [i not in validation for i in sets.indices["database"].tolist()]
    )


# Seeds the database order together with the split seed (a constant so
# that the order never depends on anything but the split).
DATABASE_ORDER_SEED = 20170
DATABASE_ORDER = "database in seed-shuffled order"


def shuffle_database(index_sets, seed):
    """The split's sets with the database rows in one seeded random order.

    Split files list the database grouped by part and class; a Hamming
    ranking that breaks ties by database position would then order tied
    items by their labels (protocol.md §3.3). A fixed permutation drawn
    from the split seed makes every tie rule label-blind, and the
    tie-aware MAP does not depend on it at all.
    """
    database = np.asarray(index_sets["database"])
    order = np.random.default_rng([DATABASE_ORDER_SEED, seed]).permutation(
        len(database))
    return {**index_sets, "database": database[order]}


def train_from_database(index_sets, train_size, seed):
    """The sets with `train` redrawn from the database: up to `train_size`
    rows of database minus validation queries, one seeded draw that never
    reads a label (the images a user holds and searches). Returns
    (index_sets, a description suffix); unchanged for train_size = 0.
    """
    if not train_size:
        return index_sets, ""
    validation = np.asarray(index_sets["validation"])
    database = np.asarray(index_sets["database"])
    pool = np.sort(database[~np.isin(database, validation)])
    size = min(int(train_size), len(pool))
    rng = np.random.default_rng([DATABASE_ORDER_SEED, seed, 2])
    train = np.sort(rng.choice(pool, size, replace=False)).astype(np.int64)
    return ({**index_sets, "train": train},
            f", train = {size} images drawn from the database")


def collection_subset(labels, classes, class_decay, seed):
    """Dataset rows of the collection that `classes`/`class_decay` define.

    Returns:
        (int64 sorted row ids, a name suffix such as "-classes0_1" or
        "-decay0.7071" for the split cache; "" for the whole dataset).
    """
    from uhga_tf import config

    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    ids = config.class_ids(classes)
    suffix = ""
    if (ids or class_decay < 1.0) and is_unlabelled(labels):
        raise ValueError(
            "classes and class_decay cut a collection by its labels; this "
            "one has none")
    if ids:
        if labels.ndim != 1:
            raise ValueError("classes needs single-label class ids")
        missing = sorted(set(ids) - set(labels.tolist()))
        if missing:
            raise ValueError(
                f"classes names ids with no images: {missing}; the "
                f"dataset's ids are {sorted(set(labels.tolist()))}")
        rows = rows[np.isin(labels, ids)]
        suffix += "-classes" + "_".join(str(i) for i in sorted(ids))
    if class_decay < 1.0:
        rng = np.random.default_rng([DATABASE_ORDER_SEED, seed, 1])
        kept = []
        for c in np.unique(labels[rows]):
            members = rows[labels[rows] == c]
            size = max(1, int(round(len(members) * class_decay ** int(c))))
            kept.append(rng.choice(members, size, replace=False))
        rows = np.concatenate(kept)
        suffix += f"-decay{class_decay:g}"
    return np.sort(rows).astype(np.int64), suffix


# The model fields `load_retrieval_sets` reads: the features' identity.
FEATURE_FIELDS = ("backbone", "backbone_weights", "image_size",
                  "feature_runtime")


def sets_identity(data, model):
    """What `load_retrieval_sets(data, model, seed)` depends on besides the
    seed: two configs with one identity load the same sets (so a caller can
    load them once for several experiments)."""
    return (data,) + tuple(getattr(model, name) for name in FEATURE_FIELDS)


def load_retrieval_sets(data, model, seed, progress=True):
    """Load or compute the features of every set for a data/model config.

    Args:
        data: `config.DataConfig`.
        model: `config.ModelConfig` (backbone, weights, image size).
        seed: split seed.
        progress: show the feature-extraction progress bar.
    """
    if data.dataset == "features":
        return _from_feature_file(data, seed)

    from uhga_tf.data import datasets
    from uhga_tf.data import feature_cache
    from uhga_tf.data import splits

    image_dataset = datasets.load_dataset(
        data.dataset,
        data_dir=data.data_dir or None,
        source=data.data_source,
        skip_corrupt=data.skip_corrupt,
        **({"folder_labels": data.folder_labels}
           if data.dataset == "folder" else {}),
    )
    split_kwargs = {"query_pool": data.query_pool}
    if data.split_list_dir:
        split_kwargs["list_dir"] = data.split_list_dir
    keep, collection = collection_subset(
        image_dataset.labels, data.classes, data.class_decay, seed)
    split = splits.load_or_create_split(
        os.path.join(data.cache_dir, "splits"),
        data.dataset + collection,
        data.split,
        image_dataset.labels[keep],
        image_dataset.partition[keep],
        seed,
        **split_kwargs,
    )
    index_sets = shuffle_database(
        {name: keep[np.asarray(getattr(split, name))] for name in SETS},
        seed)
    index_sets, train_note = train_from_database(
        index_sets, data.train_size, seed)
    # One cache entry for the union keeps a protocol's sets consistent and
    # lets a second protocol on the same images reuse nothing by accident.
    union = np.unique(np.concatenate(list(index_sets.values())))
    if collection:
        # A sub-collection reads the whole dataset's cache entry (for
        # CIFAR-10 the `uhga` split's) instead of extracting a new one.
        union = np.arange(image_dataset.num_examples)
    features = feature_cache.load_or_extract_features(
        image_dataset,
        union,
        backbone_name=model.backbone,
        backbone_weights=model.backbone_weights,
        image_size=model.image_size or None,
        cache_dir=os.path.join(data.cache_dir, "features"),
        progress=progress,
        runtime=model.feature_runtime,
    )
    position = np.searchsorted(union, np.arange(image_dataset.num_examples))
    sets = RetrievalSets(
        features={
            n: features[position[idx]] for n, idx in index_sets.items()
        },
        labels={n: image_dataset.labels[idx] for n, idx in index_sets.items()},
        indices=index_sets,
        feature_dim=features.shape[1],
        description=_describe(
            data, model, image_dataset.source, seed, collection, train_note,
            image_dataset.labelled),
        image_dataset=image_dataset,
        split_seed=int(seed),
    )
    _log_sizes(sets)
    return sets


def _describe(data, model, source, seed, collection, train_note, labelled):
    """The provenance line of image sets (`RetrievalSets.description`)."""
    from uhga_tf.models import backbone as backbone_lib

    # Stored descriptions predate the feature runtime: it is named only
    # when it is not TensorFlow.
    runtime = (f" runtime={model.feature_runtime}"
               if model.feature_runtime != "tensorflow" else "")
    return (
        f"{data.dataset} ({source}), split={data.split} seed={seed}, "
        f"backbone={model.backbone} "
        f"weights={backbone_lib.weights_identity(model.backbone_weights)} "
        f"image_size={model.image_size or 'default'}{runtime}, "
        f"{DATABASE_ORDER}"
        + (f", collection{collection}" if collection else "")
        + train_note
        + ("" if labelled else ", unlabelled")
    )


def _from_feature_file(data, seed):
    path = data.data_dir
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            "dataset=features needs data_dir pointing at an .npz file with "
            f"'features' (and 'labels'); received data_dir={path!r}"
        )
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if "features" not in arrays:
        raise ValueError(f"{path}: missing array 'features'")
    features = arrays["features"].astype(np.float32)
    labelled = "labels" in arrays
    labels = (arrays["labels"] if labelled
              else np.full(len(features), UNLABELLED, np.int64))
    if len(labels) != len(features):
        raise ValueError(
            f"{path}: labels has {len(labels)} rows, features {len(features)}"
        )
    if all(name in arrays for name in SETS):
        index_sets = {name: arrays[name].astype(np.int64) for name in SETS}
    else:
        from uhga_tf.data import splits

        blind = data.split in splits.LABEL_BLIND_PROTOCOLS
        if "partition" not in arrays and not blind:
            raise ValueError(
                f"{path}: needs either 'partition' or the index arrays "
                f"{', '.join(SETS)} (or split=collection, which reads "
                "neither labels nor partition)"
            )
        split = splits.load_or_create_split(
            os.path.join(data.cache_dir, "splits"),
            "features-" + os.path.basename(path),
            data.split,
            labels,
            arrays.get("partition",
                       np.full(len(features), "train", dtype=object)),
            seed,
            query_pool=data.query_pool,
        )
        index_sets = {name: np.asarray(getattr(split, name)) for name in SETS}
    index_sets, train_note = train_from_database(
        shuffle_database(index_sets, seed), data.train_size, seed)
    for name, idx in index_sets.items():
        if idx.size == 0 or idx.min() < 0 or idx.max() >= len(features):
            raise ValueError(
                f"{path}: {name} indices must be non-empty and in "
                f"[0, {len(features)})"
            )
    sets = RetrievalSets(
        features={n: features[idx] for n, idx in index_sets.items()},
        labels={n: labels[idx] for n, idx in index_sets.items()},
        indices=index_sets,
        feature_dim=features.shape[1],
        description=f"features from {path}, {DATABASE_ORDER}{train_note}"
        + ("" if labelled else ", unlabelled"),
        split_seed=int(seed),
    )
    _log_sizes(sets)
    return sets


def _log_sizes(sets):
    logging.info(
        "retrieval sets: %s; %s",
        ", ".join(f"{n}={len(sets.indices[n])}" for n in SETS),
        sets.description,
    )
