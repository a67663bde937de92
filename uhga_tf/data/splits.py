"""Named query / train / database / validation protocols (protocol.md §1).

A split is drawn once from `np.random.default_rng(seed)`, written as index
files by `load_or_create_split` and afterwards only read. Every index array
is int64, sorted ascending and indexes the dataset's examples; the sorted
`database` order is the database index used to break ranking ties.

Protocols (counts for CIFAR-10; `per_class` overrides the per-class ones):

- `uhga`: query 100/class from the official test part (`query_pool="all"`:
  from all images); database every non-query image; train 500/class drawn
  from the database (train ⊂ database).
- `disjoint54k`: query 100/class, train 500/class, database the rest
  (5,400/class); all three disjoint, drawn from all images.
- `ssdh_lists`: query the official test part; database the official train
  part; train 5,000 random from the database (not class-balanced).
- `ga_lists`: `test.txt`, `train.txt`, `database.txt` of `list_dir`
  (GradAttnHash lists; query and database overlap).
- `nus_wide21`: query 100 and train 500 per concept; database every
  non-query image (train ⊂ database).
- `demo`: query 50/class from the test part; database 1,000/class drawn from
  the non-query images; train 200/class from the database.
- `collection`: never reads a label, so it splits an unlabelled collection
  (a user's photos; the only protocol that does) as well as a labelled one:
  query 1,000 random images of all, database every non-query image, train
  5,000 random from the database; each capped for small collections
  (query and validation at a tenth of the images, train at what the
  database leaves beside the validation queries).

`nus_wide21`: for each concept in descending frequency (ties: column order),
100 query and 500 train images are drawn uniformly from the images that carry
it and were not chosen before, so sizes scale with the number of concepts.
`demo` is a small single-label protocol for fast demonstrations only; its
numbers are not comparable with published ones.

Validation (protocol.md §1.3, model selection only): drawn from
database \\ train \\ query; 100/class for single-label protocols (20/class for
`demo`), 1,000 random images for multi-label ones and `collection`.
"""

import dataclasses
import hashlib
import json
import os
import re

import numpy as np
from absl import logging

from uhga_tf import config
from uhga_tf import io_utils
from uhga_tf.data.image_dataset import is_unlabelled

SPLIT_PROTOCOLS = config.SPLIT_PROTOCOLS
SPLIT_SETS = ("query", "train", "database", "validation")
QUERY_POOLS = config.QUERY_POOLS
MULTI_LABEL_PROTOCOLS = ("nus_wide21",)
# Protocols that never read a label; the only ones an unlabelled collection
# can take.
LABEL_BLIND_PROTOCOLS = ("collection",)

# Per-class counts; for nus_wide21 "query"/"train" are per concept and
# "validation" is a total (the multi-label validation set is not balanced).
_PER_CLASS = {
    "uhga": {"query": 100, "train": 500, "validation": 100},
    "disjoint54k": {"query": 100, "train": 500, "validation": 100},
    "ssdh_lists": {"train": 5000, "validation": 100},
    "ga_lists": {"validation": 100},
    "nus_wide21": {"query": 100, "train": 500, "validation": 1000},
    "demo": {"query": 50, "train": 200, "database": 1000, "validation": 20},
    # Totals, capped for small collections (`_draw_collection`).
    "collection": {"query": 1000, "train": 5000, "validation": 1000},
}
_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Split:
    """Index sets of one protocol draw.

    Attributes:
        query, train, database, validation: int64 [n] sorted dataset indices.
            Row order of `database` is the database index used for ties.
        protocol: one of `SPLIT_PROTOCOLS`.
        seed: seed of the `np.random.default_rng` the draw came from.
    """

    query: np.ndarray
    train: np.ndarray
    database: np.ndarray
    validation: np.ndarray
    protocol: str
    seed: int

    def sizes(self) -> dict:
        return {name: len(getattr(self, name)) for name in SPLIT_SETS}


def labels_fingerprint(labels, partition) -> str:
    """Return a sha256 digest of labels and partition (dtype-normalised)."""
    labels = np.asarray(labels)
    labels = labels.astype(np.uint8 if labels.ndim == 2 else np.int64)
    h = hashlib.sha256()
    h.update(f"{labels.ndim}:{labels.shape}".encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    h.update("\n".join(str(p) for p in partition).encode())
    return h.hexdigest()


def _resolve_counts(protocol, per_class):
    counts = dict(_PER_CLASS[protocol])
    if per_class:
        unknown = set(per_class) - set(counts)
        if unknown:
            raise ValueError(
                f"per_class keys for protocol {protocol!r} must be in "
                f"{sorted(counts)}; received {sorted(unknown)}"
            )
        for key, value in per_class.items():
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(
                    f"per_class[{key!r}] must be a non-negative int; "
                    f"received {value!r}"
                )
            counts[key] = int(value)
    return counts


def _choose(rng, pool, size, what):
    """Draw `size` of `pool` uniformly without replacement."""
    if len(pool) < size:
        raise ValueError(
            f"too few images for {what}: need {size}, received {len(pool)}"
        )
    return rng.choice(pool, size=size, replace=False)


def _by_class(labels, candidates, cls):
    return candidates[labels[candidates] == cls]


def _balanced(rng, labels, candidates, per_class, num_classes, what):
    """Draw `per_class` per class from `candidates` (class order)."""
    picks = [
        _choose(
            rng,
            _by_class(labels, candidates, c),
            per_class,
            f"{what} of class {c} ({per_class}/class)",
        )
        for c in range(num_classes)
    ]
    return np.concatenate(picks) if picks else np.zeros(0, np.int64)


def _sorted(x):
    return np.sort(np.asarray(x, dtype=np.int64))


def make_split(
    protocol,
    labels,
    partition,
    seed,
    *,
    query_pool="test",
    list_dir=None,
    per_class=None,
) -> Split:
    """Draw the `protocol` split of a dataset (see the module docstring).

    Args:
        protocol: one of `SPLIT_PROTOCOLS`.
        labels: int [N] class ids, or 0/1 [N, C] multi-hot (`nus_wide21`).
        partition: [N] "train"/"test", the dataset's official split.
        seed: int seed of `np.random.default_rng`.
        query_pool: `uhga`/`demo` only: "test" (official test part) or "all".
        list_dir: `ga_lists` only: folder holding test.txt, train.txt and
            database.txt.
        per_class: optional overrides of the per-class counts, e.g.
            {"query": 10, "train": 50, "validation": 10}.
    """
    _check_split_options(protocol, query_pool, seed)
    labels, partition = _check_split_labels(protocol, labels, partition)
    n = len(labels)
    counts = _resolve_counts(protocol, per_class)
    if protocol == "collection":
        counts = _collection_counts(counts, n)
    draw = _Draw(
        rng=np.random.default_rng(int(seed)),
        labels=labels,
        partition=partition,
        counts=counts,
        everything=np.arange(n, dtype=np.int64),
        num_classes=(
            int(labels.max()) + 1
            if (protocol not in MULTI_LABEL_PROTOCOLS and n) else 0
        ),
    )
    if protocol in ("uhga", "demo"):
        query, train, database = _draw_uhga(draw, protocol, query_pool)
    elif protocol == "disjoint54k":
        query, train, database = _draw_disjoint54k(draw)
    elif protocol == "ssdh_lists":
        query, train, database = _draw_ssdh_lists(draw)
    elif protocol == "ga_lists":
        query, train, database = _read_ga_lists(list_dir, labels, partition)
    elif protocol == "collection":
        query, train, database = _draw_collection(draw)
    else:  # nus_wide21
        query, train, database = _draw_nus_wide21(draw)
    validation = _draw_validation(
        draw, protocol in MULTI_LABEL_PROTOCOLS + LABEL_BLIND_PROTOCOLS,
        query, train, database
    )
    split = Split(
        query=_sorted(query),
        train=_sorted(train),
        database=_sorted(database),
        validation=_sorted(validation),
        protocol=protocol,
        seed=int(seed),
    )
    logging.info("Split %s seed=%d: %s", protocol, seed, split.sizes())
    return split


def _check_split_options(protocol, query_pool, seed):
    """Raise ValueError for an unknown protocol, query_pool or a bad seed."""
    if protocol not in SPLIT_PROTOCOLS:
        raise ValueError(
            f"unknown split protocol; received protocol={protocol!r}, "
            f"expected one of {SPLIT_PROTOCOLS}"
        )
    if query_pool not in QUERY_POOLS:
        raise ValueError(
            f"query_pool must be one of {QUERY_POOLS}; received "
            f"query_pool={query_pool!r}"
        )
    if query_pool != "test" and protocol not in ("uhga", "demo"):
        raise ValueError(
            "query_pool applies to the uhga and demo protocols only; "
            f"received query_pool={query_pool!r} with protocol={protocol!r}"
        )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(
            f"seed must be a non-negative int; received seed={seed!r}"
        )


def _check_split_labels(protocol, labels, partition):
    """Return labels and partition as arrays of one length and right rank."""
    labels = np.asarray(labels)
    partition = np.asarray(partition)
    n = len(labels)
    if partition.shape != (n,):
        raise ValueError(
            f"partition must have shape ({n},) like labels; received "
            f"shape={partition.shape}"
        )
    multi = protocol in MULTI_LABEL_PROTOCOLS
    if multi and labels.ndim != 2:
        raise ValueError(
            f"protocol {protocol!r} needs multi-hot labels [N, C]; received "
            f"shape={labels.shape}"
        )
    if not multi and labels.ndim != 1:
        raise ValueError(
            f"protocol {protocol!r} needs single-label class ids [N]; "
            f"received shape={labels.shape}"
        )
    if protocol not in LABEL_BLIND_PROTOCOLS and is_unlabelled(labels):
        raise ValueError(
            f"protocol {protocol!r} draws by class, but this collection "
            "has no labels; use split=collection (label-blind)"
        )
    return labels, partition


@dataclasses.dataclass(frozen=True)
class _Draw:
    """What every protocol's draw reads: the generator, labels and counts."""

    rng: np.random.Generator
    labels: np.ndarray
    partition: np.ndarray
    counts: dict
    everything: np.ndarray
    num_classes: int

    def balanced(self, candidates, key, what):
        """`counts[key]` per class from `candidates` (class order)."""
        return _balanced(self.rng, self.labels, candidates, self.counts[key],
                         self.num_classes, what)


def _draw_uhga(draw, protocol, query_pool):
    """uhga / demo: balanced query, database the rest (demo: balanced)."""
    everything, partition = draw.everything, draw.partition
    pool = (
        everything if query_pool == "all" else everything[partition == "test"]
    )
    if query_pool == "test" and len(everything) and not len(pool):
        raise ValueError(
            "no images in a test/ part (query_pool=test): the data is "
            "one flat class-per-folder set; expected train/ and test/ "
            "parts, or pass --query_pool=all to draw the queries from "
            "all images"
        )
    query = _sorted(draw.balanced(pool, "query", "query"))
    rest = np.setdiff1d(everything, query)
    if protocol == "demo":
        database = _sorted(draw.balanced(rest, "database", "database"))
    else:
        database = rest
    train = _sorted(draw.balanced(database, "train", "train"))
    return query, train, database


def _draw_disjoint54k(draw):
    """Per class: query, train and database cut from one permutation."""
    counts = draw.counts
    num_query, num_train = counts["query"], counts["train"]
    need = num_query + num_train + counts["validation"]
    query, train, database = [], [], []
    for c in range(draw.num_classes):
        members = draw.rng.permutation(draw.everything[draw.labels == c])
        if len(members) < need:
            raise ValueError(
                f"too few images for class {c}: need at least {need} "
                f"(query + train + validation per class), received "
                f"{len(members)}"
            )
        query.append(members[:num_query])
        train.append(members[num_query:num_query + num_train])
        database.append(members[num_query + num_train:])
    return tuple(_sorted(np.concatenate(x)) for x in (query, train, database))


def _draw_ssdh_lists(draw):
    """Query the official test part, database the train part."""
    query = draw.everything[draw.partition == "test"]
    database = draw.everything[draw.partition == "train"]
    if not len(query) or not len(database):
        raise ValueError(
            "ssdh_lists needs an official train and test partition; "
            f"received {len(database)} train and {len(query)} test images"
        )
    train = _sorted(
        _choose(draw.rng, database, draw.counts["train"],
                "train (ssdh_lists)")
    )
    return query, train, database


def _draw_nus_wide21(draw):
    """Per concept by descending frequency: query + train not yet chosen."""
    labels, counts = draw.labels, draw.counts
    frequency = labels.sum(axis=0, dtype=np.int64)
    chosen = np.zeros(len(labels), bool)
    query, train = [], []
    per_concept = counts["query"] + counts["train"]
    for c in np.argsort(-frequency, kind="stable"):
        pool = draw.everything[(labels[:, c] > 0) & ~chosen]
        pick = _choose(
            draw.rng,
            pool,
            per_concept,
            f"query + train of concept {c} (images carrying it, not "
            "yet chosen)",
        )
        chosen[pick] = True
        query.append(pick[: counts["query"]])
        train.append(pick[counts["query"] :])
    query = _sorted(np.concatenate(query))
    train = _sorted(np.concatenate(train))
    return query, train, np.setdiff1d(draw.everything, query)


def _collection_counts(counts, n):
    """`collection`'s totals capped for n images: query and validation at
    a tenth of them (train is capped by `_draw_collection`)."""
    tenth = n // 10
    if tenth < 1:
        raise ValueError(
            f"split=collection needs at least 10 images; received {n}")
    return {**counts, "query": min(counts["query"], tenth),
            "validation": min(counts["validation"], tenth)}


def _draw_collection(draw):
    """Random query, database the rest, random train from the database
    leaving room for the validation queries."""
    counts = draw.counts
    query = _sorted(_choose(draw.rng, draw.everything, counts["query"],
                            "query (collection)"))
    database = np.setdiff1d(draw.everything, query)
    size = min(counts["train"], len(database) - counts["validation"])
    train = _sorted(_choose(draw.rng, database, size, "train (collection)"))
    return query, train, database


def _draw_validation(draw, unbalanced, query, train, database):
    """Validation from database \\ train \\ query (protocol.md §1.3);
    random when `unbalanced`, else balanced over the classes."""
    candidates = np.setdiff1d(np.setdiff1d(database, train), query)
    if unbalanced:
        return _choose(
            draw.rng, candidates, draw.counts["validation"], "validation"
        )
    return draw.balanced(
        candidates, "validation", "validation (database minus train and query)"
    )


# ---------------------------------------------------------------- GA lists


_GA_PATH = re.compile(r"(?:^|/)(?:(train|test)/)?([^/]+)/(\d+)\.[A-Za-z]+$")


def _read_ga_lists(list_dir, labels, partition):
    """Map GradAttnHash list files to dataset indices.

    Lines are `path l_0 ... l_{C-1}` (one-hot). A path is matched by its
    `<part>/<class>/NNNN.jpg` suffix (the class-folder layout of the
    dataset); `<class>/NNNN.jpg` without a part is accepted when only one
    part has that name. The class comes from the one-hot label, and NNNN is
    the file's rank within its part and class in the dataset's example
    order, which holds for folders numbered from 0000 without gaps, such as
    the CIFAR-10 zip.
    """
    if list_dir is None or not os.path.isdir(list_dir):
        raise FileNotFoundError(
            "ga_lists needs list_dir, a folder with test.txt, train.txt and "
            f"database.txt; received list_dir={list_dir!r}"
        )
    if labels.ndim != 1:
        raise ValueError("ga_lists needs single-label class ids")
    # (part, class id, number) -> index; the dataset is in example order:
    # part, class, then ascending file number, i.e. rank within each group.
    keys = {}
    rank = {}
    for i, (p, c) in enumerate(zip(partition, labels)):
        r = rank.get((p, c), 0)
        rank[(p, c)] = r + 1
        keys[(str(p), int(c), r)] = i
    sets = []
    for fname in ("test.txt", "train.txt", "database.txt"):
        path = os.path.join(list_dir, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GA list file not found: {path}")
        indices = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                onehot = np.array(fields[1:], dtype=np.int64)
                if onehot.sum() != 1:
                    raise ValueError(
                        f"{path}:{lineno}: expected a one-hot label; "
                        f"received {' '.join(fields[1:])!r}"
                    )
                label = int(np.argmax(onehot))
                m = _GA_PATH.search(fields[0].replace("\\", "/"))
                if m is None and re.search(r"\d+_\d+\.\w+$", fields[0]):
                    raise ValueError(
                        f"{path}:{lineno}: {fields[0]!r} names an image by "
                        "CIFAR's binary batch order (<batch>_<index>.jpg), "
                        "which the class-folder dataset does not keep; "
                        "expected paths ending in <train|test>/<class>/NNNN.jpg"
                    )
                if m is None:
                    raise ValueError(
                        f"{path}:{lineno}: cannot map {fields[0]!r} to the "
                        "dataset; expected a path ending in "
                        "<train|test>/<class>/NNNN.jpg"
                    )
                part, _, number = m.groups()
                parts = [part] if part else ["train", "test"]
                hits = [
                    keys[(p, label, int(number))]
                    for p in parts
                    if (p, label, int(number)) in keys
                ]
                if len(hits) != 1:
                    raise ValueError(
                        f"{path}:{lineno}: {fields[0]!r} matches {len(hits)} "
                        "dataset images; expected exactly one"
                    )
                indices.append(hits[0])
        sets.append(np.asarray(indices, np.int64))
    query, train, database = sets
    return query, train, database


# ---------------------------------------------------------------- storage


def _split_dirname(dataset_name, protocol, seed, fingerprint=None):
    # The digest of labels and partition keys the folder by the data's
    # identity: two `folder` collections of one checkout get two splits.
    digest = "" if fingerprint is None else f"_{fingerprint[:12]}"
    return f"{dataset_name}_{protocol}_seed{seed}{digest}"


def _stored_target(split_dir, dataset_name, protocol, seed, fingerprint):
    """The split folder: keyed by content; an older unkeyed one of the same
    data is still read (written before issue 18)."""
    target = os.path.join(
        split_dir, _split_dirname(dataset_name, protocol, seed, fingerprint)
    )
    legacy = os.path.join(
        split_dir, _split_dirname(dataset_name, protocol, seed)
    )
    meta = os.path.join(legacy, "split.json")
    if not os.path.isdir(target) and os.path.isfile(meta):
        try:
            stored = config.read_json(meta).get("labels_fingerprint")
        except ValueError:
            stored = None
        if stored == fingerprint:
            return legacy
    return target


def _write_indices(path, indices):
    with open(path, "w") as f:
        f.write("\n".join(str(int(i)) for i in indices))
        if len(indices):
            f.write("\n")


def _read_indices(path):
    indices = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            for field in line.split():
                try:
                    indices.append(int(field))
                except ValueError as e:
                    raise ValueError(
                        f"corrupt split file ({path}, line {lineno}): "
                        f"{field[:40]!r} is not an index; expected one "
                        "integer per line (delete the folder to draw the "
                        "split again)"
                    ) from e
    return np.array(indices, dtype=np.int64)


def _list_fingerprint(list_dir):
    h = hashlib.sha256()
    for fname in ("test.txt", "train.txt", "database.txt"):
        with open(os.path.join(list_dir, fname), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def load_or_create_split(
    split_dir, dataset_name, protocol, labels, partition, seed, **kw
) -> Split:
    """Read the stored split, or draw it with `make_split` and store it.

    Files live in `split_dir/<dataset>_<protocol>_seed<seed>_<digest>/`
    (digest: the first 12 hex digits of `labels_fingerprint`): one index
    per line in `query.txt`, `train.txt`, `database.txt`, `validation.txt`,
    and `split.json` with protocol, seed, options, sizes, the number of
    examples and a fingerprint of labels and partition. The folder is
    written to a temporary folder and renamed into place, so readers see
    it whole or not at all. A stored split whose fingerprint, options or
    sizes do not match is refused with a `ValueError`.
    """
    labels = np.asarray(labels)
    partition = np.asarray(partition)
    _warn_if_one_class(labels, dataset_name)
    fingerprint = labels_fingerprint(labels, partition)
    target = _stored_target(
        split_dir, dataset_name, protocol, seed, fingerprint
    )
    options = {
        "query_pool": kw.get("query_pool", "test"),
        "per_class": kw.get("per_class"),
    }
    if (
        protocol == "ga_lists"
        and kw.get("list_dir")
        and os.path.isdir(kw["list_dir"])
    ):
        options["list_fingerprint"] = _list_fingerprint(kw["list_dir"])
    if os.path.isdir(target):
        return _read_split(
            target, protocol, seed, options, fingerprint, len(labels)
        )

    split = make_split(protocol, labels, partition, seed, **kw)
    meta = {
        "format_version": _FORMAT_VERSION,
        "dataset": dataset_name,
        "protocol": protocol,
        "seed": int(seed),
        "options": options,
        "num_examples": len(labels),
        "labels_fingerprint": fingerprint,
        "sizes": split.sizes(),
        "order": "ascending dataset index",
    }
    try:
        with io_utils.atomic_directory(target, prefix=".tmp-split-") as tmp:
            for name in SPLIT_SETS:
                _write_indices(
                    os.path.join(tmp, f"{name}.txt"), getattr(split, name)
                )
            with open(os.path.join(tmp, "split.json"), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
    except OSError:
        if not os.path.isdir(target):
            raise
        # Another process stored it first: use theirs.
        logging.info("Split %s appeared concurrently; reading it.", target)
        return _read_split(
            target, protocol, seed, options, fingerprint, len(labels)
        )
    logging.info("Wrote split %s: %s", target, split.sizes())
    return split


def _warn_if_one_class(labels, dataset_name):
    """Every item relevant to every query makes MAP 1.0 for any codes."""
    if is_unlabelled(labels):
        return  # no MAP is computed at all
    if labels.ndim == 1:
        one = len(np.unique(labels)) < 2
    else:
        one = bool(labels.size) and bool(np.all(labels, axis=0).any())
    if one:
        logging.warning(
            "Dataset %s has a single class (every item is relevant to every "
            "query): MAP and precision will be 1.0 whatever the codes; "
            "expected at least two classes for a meaningful evaluation",
            dataset_name,
        )


def _check_disjoint(target, arrays):
    """No index twice in a set, and no query among the training images."""
    for name, values in arrays.items():
        unique, counts = np.unique(values, return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"stored split {target}: {name}.txt repeats index "
                f"{int(unique[counts > 1][0])}; expected each index once "
                "(delete the folder to draw the split again)"
            )
    overlap = np.intersect1d(arrays["query"], arrays["train"])
    if len(overlap):
        raise ValueError(
            f"stored split {target}: {len(overlap)} indices (first "
            f"{int(overlap[0])}) are in both query.txt and train.txt; "
            "expected disjoint sets (delete the folder to draw the split "
            "again)"
        )


def _read_split(target, protocol, seed, options, fingerprint, n):
    meta_path = os.path.join(target, "split.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"split metadata not found: {meta_path}")
    meta = config.read_json(meta_path)
    expected = {
        "protocol": protocol,
        "seed": int(seed),
        "options": json.loads(json.dumps(options)),
        "num_examples": int(n),
        "labels_fingerprint": fingerprint,
    }
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ValueError(
                f"stored split {target} does not match the dataset: {key} is "
                f"{meta.get(key)!r}, expected {value!r}; delete the folder to "
                "draw a new split"
            )
    arrays = {
        name: _read_indices(os.path.join(target, f"{name}.txt"))
        for name in SPLIT_SETS
    }
    sizes = meta.get("sizes")
    if not isinstance(sizes, dict) or set(sizes) < set(SPLIT_SETS):
        raise ValueError(
            f"corrupt split metadata ({meta_path}): no 'sizes' of "
            f"{list(SPLIT_SETS)}; delete the folder to draw a new split"
        )
    for name, values in arrays.items():
        if len(values) != meta["sizes"][name]:
            raise ValueError(
                f"stored split {target}: {name}.txt holds {len(values)} "
                f"indices, expected {meta['sizes'][name]} (split.json)"
            )
        if len(values) and (values.min() < 0 or values.max() >= n):
            raise ValueError(
                f"stored split {target}: {name}.txt indices must lie in "
                f"[0, {n}); received [{values.min()}, {values.max()}]"
            )
    _check_disjoint(target, arrays)
    logging.info("Read split %s: %s", target, meta["sizes"])
    return Split(protocol=protocol, seed=int(seed), **arrays)
