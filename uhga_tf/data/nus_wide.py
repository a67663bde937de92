"""NUS-WIDE-21 (protocol.md §1.2) from the standard NUS-WIDE files.

`<data_dir>/nus_wide/` (or `data_dir` itself) holds
`ImageList/Imagelist.txt`, `Concepts81.txt`, `AllLabels81.txt` (or
`Groundtruth/AllLabels/Labels_<concept>.txt`) and the images under
`images/`, decoded lazily.
"""

import os
import re

import numpy as np
from absl import logging

from uhga_tf.data import image_folder
from uhga_tf.data.image_dataset import ImageDataset

NUS_WIDE_NUM_CONCEPTS = 21


def _read_lines(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def _nus_relative_path(entry):
    """Map an Imagelist.txt entry to a path relative to `images/`.

    Backslashes become "/", a drive letter is dropped, and everything up to
    a "Flickr" component (as in "C:\\ImageData\\Flickr\\actor\\0001_2.jpg")
    is removed.
    """
    parts = [p for p in entry.replace("\\", "/").split("/") if p]
    if parts and re.fullmatch(r"[A-Za-z]:", parts[0]):
        parts = parts[1:]
    if "Flickr" in parts:
        parts = parts[len(parts) - parts[::-1].index("Flickr") :]
    return "/".join(parts)


def _read_nus_labels(root, concepts, n):
    path = os.path.join(root, "AllLabels81.txt")
    if os.path.isfile(path):
        with open(path) as f:
            tokens = f.read().split()
        if len(tokens) != n * len(concepts):
            raise ValueError(
                f"{path} holds {len(tokens)} values; expected {n} rows x "
                f"{len(concepts)} concepts = {n * len(concepts)}"
            )
        labels = np.array(tokens, dtype=np.int64).reshape(n, len(concepts))
        where = path
    else:
        gt_dir = os.path.join(root, "Groundtruth", "AllLabels")
        if not os.path.isdir(gt_dir):
            raise FileNotFoundError(
                f"NUS-WIDE labels not found: expected {path} or "
                f"{gt_dir}/Labels_<concept>.txt"
            )
        columns = []
        for concept in concepts:
            p = os.path.join(gt_dir, f"Labels_{concept}.txt")
            if not os.path.isfile(p):
                raise FileNotFoundError(f"NUS-WIDE label file not found: {p}")
            with open(p) as f:
                col = np.array(f.read().split(), dtype=np.int64)
            if len(col) != n:
                raise ValueError(
                    f"{p} holds {len(col)} labels; expected {n} (one per "
                    "line of Imagelist.txt)"
                )
            columns.append(col)
        labels = np.stack(columns, axis=1)
        where = gt_dir
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{where}: labels must be 0 or 1")
    return labels.astype(np.uint8)


def load_nus_wide(
    data_dir, num_concepts=NUS_WIDE_NUM_CONCEPTS, skip_corrupt=False
) -> ImageDataset:
    """Build NUS-WIDE-`num_concepts` (protocol.md §1.2) from data_dir/nus_wide.

    Reads `ImageList/Imagelist.txt`, `Concepts81.txt` and `AllLabels81.txt`
    (or `Groundtruth/AllLabels/Labels_<concept>.txt`), keeps the
    `num_concepts` most frequent concepts over all listed images in
    descending frequency (ties: concept-file order), drops images carrying
    none of them, and decodes images under `images/` lazily. Listed images
    that are missing or corrupt raise, or with `skip_corrupt=True` are
    dropped and listed in `skipped`. NUS-WIDE-21 has no official partition
    here: `partition` is "train" everywhere.
    """
    root = os.path.join(data_dir, "nus_wide")
    if not os.path.isdir(root):
        root = data_dir
    list_path = os.path.join(root, "ImageList", "Imagelist.txt")
    concepts_path = os.path.join(root, "Concepts81.txt")
    for path in (list_path, concepts_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"NUS-WIDE file not found: {path}")
    entries = _read_lines(list_path)
    concepts = _read_lines(concepts_path)
    if not isinstance(num_concepts, (int, np.integer)) or not (
        1 <= num_concepts <= len(concepts)
    ):
        raise ValueError(
            f"num_concepts must be an int in [1, {len(concepts)}]; received "
            f"num_concepts={num_concepts!r}"
        )
    all_labels = _read_nus_labels(root, concepts, len(entries))
    counts = all_labels.sum(axis=0, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")[:num_concepts]
    labels = all_labels[:, order]
    has_any = labels.any(axis=1)
    logging.info(
        "NUS-WIDE: kept concepts %s; %d of %d listed images carry one.",
        [concepts[i] for i in order],
        int(has_any.sum()),
        len(entries),
    )
    kept = np.flatnonzero(has_any)
    images_dir = os.path.join(root, "images")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(
            f"NUS-WIDE image folder not found: {images_dir}"
        )
    tree = image_folder.FileTree(images_dir, scan=False)
    rels = [_nus_relative_path(entries[i]) for i in kept]
    keep, sizes, skipped = image_folder.verify_images(
        tree, rels, skip_corrupt
    )
    kept = kept[keep]
    logging.info("NUS-WIDE-%d: %d images kept.", num_concepts, len(kept))
    return ImageDataset(
        name="nus_wide",
        labels=labels[kept],
        class_names=[concepts[i] for i in order],
        partition=np.full(len(kept), "train", dtype=object),
        paths=[tree.location(r) for r, k in zip(rels, keep) if k],
        source=f"nus_wide:{root}",
        skipped=skipped,
        image_sizes=sizes[keep],
    )
