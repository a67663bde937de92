"""Dataset sources (class folders, zips, idx files, NUS-WIDE, TFDS) -> tf.data.

Every loader returns an `ImageDataset`: labels, class names, the source's
official partition and either the decoded images (datasets whose images share
one size) or per-image paths that `ImageDataset.to_tf_dataset` decodes lazily.

Sources:

- `cifar10`: `<data_dir>/cifar10/cifar10-jpeg.zip` (or `data_dir` pointing at
  the zip itself, or a folder with `train/<class>/*.jpg` and
  `test/<class>/*.jpg`), decoded with `tf.io.decode_jpeg`, the same decoder
  the exported serving signature uses. `source="tfds"` reads TFDS instead.
- `fashion_mnist`: the four idx files of Debian's `dataset-fashion-mnist`
  (`/usr/share/datasets/fashion-mnist/`) or `<data_dir>/fashion_mnist/`.
- `folder`: a user's class-per-folder images, `<data_dir>/<class>/*`, or with
  `train/` and `test/` sub-folders, which then set `partition`.
- `nus_wide`: NUS-WIDE-21 (protocol.md §1.2) from the standard NUS-WIDE files.

Example order is the official train part, then the test part; inside a part,
classes in class order and files in natural name order ("img2" < "img10").

Folder rules (shared by the cifar10 zip/folder and `folder`):

- Files whose extension is in `IMAGE_EXTENSIONS` are images. Hidden entries
  (names starting with ".", `__MACOSX`) are ignored, and so are regular files
  directly in the root. Any other file inside a class folder (e.g. `notes.txt`)
  or a nested folder is a `ValueError` naming it: a stray file there usually
  means the wrong folder was given.
- An empty class folder is a `ValueError`.
- Lazily decoded datasets (`folder`, `nus_wide`) are checked at load time
  with PIL (`Image.verify()` plus a JPEG end-of-image marker check), so a
  corrupt file is reported by name before any tf.data pipeline runs. With
  `skip_corrupt=True` such files are dropped instead; their names are kept in
  `ImageDataset.skipped` and the count is logged.
"""

import dataclasses
import gzip
import io
import os
import re
import struct
import time
import zipfile

import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image, UnidentifiedImageError

DATASETS = ("cifar10", "fashion_mnist", "folder", "nus_wide")
SOURCES = ("auto", "files", "tfds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
PARTITIONS = ("train", "test")

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_ZIP = "cifar10-jpeg.zip"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
NUS_WIDE_NUM_CONCEPTS = 21

_PIL_FORMATS = ("JPEG", "PNG", "BMP", "MPO")
_DECODE_BATCH = 2048


@dataclasses.dataclass
class ImageDataset:
    """Images with labels and the source's official train/test partition.

    Attributes:
        name: one of `DATASETS`.
        labels: int64 [N] class ids (single-label) or uint8 [N, C] multi-hot.
        class_names: C names; label `i` is `class_names[i]`.
        partition: object [N] of "train" / "test", the source's official
            split ("train" everywhere for sources without one).
        images: uint8 [N, H, W, 3] RGB when all images share one size, or
            None for lazily decoded datasets.
        paths: N file paths (or zip members of `archive`) for lazily decoded
            datasets, else None.
        source: human-readable origin, e.g. "zip:/data/cifar10-jpeg.zip".
        skipped: files dropped at load time by `skip_corrupt=True`.
        archive: the zip that holds `paths`, or None when they are files.
        image_sizes: int64 [N, 2] (height, width) of lazily decoded images,
            read from their headers at load time, or None.
    """

    name: str
    labels: np.ndarray
    class_names: list
    partition: np.ndarray
    images: np.ndarray | None = None
    paths: list | None = None
    source: str = ""
    skipped: list = dataclasses.field(default_factory=list)
    archive: str | None = None
    image_sizes: np.ndarray | None = None

    def __post_init__(self):
        if (self.images is None) == (self.paths is None):
            raise ValueError(
                "ImageDataset needs exactly one of images or paths; received "
                f"images={'set' if self.images is not None else None}, "
                f"paths={'set' if self.paths is not None else None}"
            )
        n = len(self.labels)
        sizes = {
            "labels": n,
            "partition": len(self.partition),
            "images" if self.images is not None else "paths": len(
                self.images if self.images is not None else self.paths
            ),
        }
        if self.image_sizes is not None:
            sizes["image_sizes"] = len(self.image_sizes)
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"ImageDataset fields must have one length; received {sizes}"
            )
        if self.images is not None and (
            self.images.dtype != np.uint8
            or self.images.ndim != 4
            or self.images.shape[-1] != 3
        ):
            raise ValueError(
                "images must be uint8 [N, H, W, 3]; received "
                f"dtype={self.images.dtype}, shape={self.images.shape}"
            )

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def is_multi_label(self) -> bool:
        return self.labels.ndim == 2

    def to_tf_dataset(self, indices, image_size, batch_size):
        """Return batches of float32 [b, s, s, 3] RGB images in [0, 255].

        Images come in `indices` order, unshuffled; the last batch may be
        partial. With an int `image_size` every image is bilinearly resized
        (no antialiasing, no rounding) to image_size x image_size; with
        `image_size=None` the native size is kept, which requires all
        selected images to share one size. Grayscale becomes 3 channels.
        `paths` datasets are read and decoded lazily, in parallel.
        """
        indices = _check_indices(indices, self.num_examples)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(
                f"batch_size must be a positive int; received "
                f"batch_size={batch_size!r}"
            )
        if image_size is not None and (
            not isinstance(image_size, (int, np.integer)) or image_size < 1
        ):
            raise ValueError(
                "image_size must be a positive int or None; received "
                f"image_size={image_size!r}"
            )
        native = self._native_size(indices) if image_size is None else None
        autotune = tf.data.AUTOTUNE
        if self.images is not None:
            images = tf.constant(self.images)
            target = None
            if image_size is not None and tuple(self.images.shape[1:3]) != (
                image_size,
                image_size,
            ):
                target = (int(image_size), int(image_size))

            def gather(batch_indices):
                batch = tf.cast(tf.gather(images, batch_indices), tf.float32)
                if target is not None:
                    batch = tf.image.resize(batch, target, method="bilinear")
                return batch

            ds = tf.data.Dataset.from_tensor_slices(indices)
            ds = ds.batch(int(batch_size)).map(
                gather, num_parallel_calls=autotune
            )
            return ds.prefetch(autotune)

        selected = [self.paths[i] for i in indices]
        if self.archive is None:
            ds = tf.data.Dataset.from_tensor_slices(
                tf.constant(selected, dtype=tf.string)
            ).map(tf.io.read_file, num_parallel_calls=autotune)
        else:
            archive = self.archive

            def read_members():
                with zipfile.ZipFile(archive) as zf:
                    for member in selected:
                        yield zf.read(member)

            ds = tf.data.Dataset.from_generator(
                read_members,
                output_signature=tf.TensorSpec([], tf.string),
            )

        def decode(data):
            image = tf.io.decode_image(
                data, channels=3, dtype=tf.uint8, expand_animations=False
            )
            image = tf.cast(image, tf.float32)
            if image_size is None:
                return tf.ensure_shape(image, (native[0], native[1], 3))
            shape = tf.shape(image)[:2]
            size = tf.constant([image_size, image_size])
            return tf.cond(
                tf.reduce_all(tf.equal(shape, size)),
                lambda: tf.ensure_shape(image, (None, None, 3)),
                lambda: tf.image.resize(image, size, method="bilinear"),
            )

        ds = ds.map(decode, num_parallel_calls=autotune, deterministic=True)
        if image_size is not None:
            ds = ds.map(
                lambda x: tf.ensure_shape(x, (image_size, image_size, 3))
            )
        return ds.batch(int(batch_size)).prefetch(autotune)

    def _native_size(self, indices):
        if self.images is not None:
            return tuple(self.images.shape[1:3])
        if self.image_sizes is None:
            raise ValueError(
                f"image_size=None needs known image sizes; dataset "
                f"{self.name!r} has none, pass an int image_size"
            )
        sizes = np.unique(self.image_sizes[indices], axis=0)
        if len(sizes) > 1:
            raise ValueError(
                "image_size=None keeps the native size, which requires equal "
                f"sizes; received {len(sizes)} sizes (height, width) such as "
                f"{[tuple(int(v) for v in s) for s in sizes[:3]]}: pass an "
                "int image_size"
            )
        if len(sizes) == 0:
            return (None, None)
        return tuple(int(v) for v in sizes[0])


def resolve_data_dir(data_dir) -> str:
    """Return `data_dir`, else $UHGA_DATA_DIR; raise if neither is set."""
    path = data_dir or os.environ.get("UHGA_DATA_DIR")
    if not path:
        raise ValueError(
            "no data directory: pass data_dir or set the UHGA_DATA_DIR "
            "environment variable; received data_dir=None and "
            "UHGA_DATA_DIR unset"
        )
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"data directory not found: {path}")
    return path


def load_dataset(
    name,
    data_dir=None,
    source="auto",
    skip_corrupt=False,
    *,
    num_concepts=None,
) -> ImageDataset:
    """Load dataset `name` (one of `DATASETS`).

    Args:
        name: "cifar10", "fashion_mnist", "folder" or "nus_wide".
        data_dir: data root (default $UHGA_DATA_DIR); for "folder" the class
            folder root itself (or a zip of it). Optional for fashion_mnist,
            whose Debian system files are used when found.
        source: "files" (zip/folder/idx files), "tfds" (tfds.load, may
            download) or "auto" (files if found, else an already prepared
            TFDS copy; never downloads). Only cifar10 and fashion_mnist
            have a TFDS source.
        skip_corrupt: drop undecodable images (logged, listed in
            `skipped`) instead of raising.
        num_concepts: nus_wide only: concepts kept (default 21).
    """
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset; received name={name!r}, expected one of "
            f"{DATASETS}"
        )
    if source not in SOURCES:
        raise ValueError(
            f"unknown source; received source={source!r}, expected one of "
            f"{SOURCES}"
        )
    if num_concepts is not None and name != "nus_wide":
        raise ValueError(
            "num_concepts applies to nus_wide only; received "
            f"num_concepts={num_concepts} with name={name!r}"
        )
    if name == "cifar10":
        return _load_cifar10(data_dir, source, skip_corrupt)
    if name == "fashion_mnist":
        return _load_fashion_mnist(data_dir, source)
    if source == "tfds":
        raise ValueError(
            f"dataset {name!r} has no TFDS source; received source='tfds', "
            "expected 'auto' or 'files'"
        )
    if name == "folder":
        return load_folder(resolve_data_dir(data_dir), skip_corrupt)
    return load_nus_wide(
        resolve_data_dir(data_dir),
        num_concepts=(
            NUS_WIDE_NUM_CONCEPTS if num_concepts is None else num_concepts
        ),
        skip_corrupt=skip_corrupt,
    )


# ---------------------------------------------------------------- listing


def _natural_key(name):
    return [
        (0, int(tok), tok) if tok.isdigit() else (1, 0, tok)
        for tok in re.split(r"(\d+)", name)
        if tok
    ]


def _is_hidden(part):
    return part.startswith(".") or part == "__MACOSX"


class _Tree:
    """Relative file listing of a directory or zip (posix paths)."""

    def __init__(self, root, scan=True):
        self.root = root
        self.is_zip = os.path.isfile(root)
        self.files = []
        self.dirs = set()
        if not scan:
            return
        if self.is_zip:
            if not zipfile.is_zipfile(root):
                raise ValueError(
                    f"expected a folder or a zip file; received {root!r}, "
                    "which is neither"
                )
            with zipfile.ZipFile(root) as zf:
                for member in zf.namelist():
                    parts = [p for p in member.split("/") if p]
                    if not parts or any(_is_hidden(p) for p in parts):
                        continue
                    for depth in range(1, len(parts)):
                        self.dirs.add("/".join(parts[:depth]))
                    if member.endswith("/"):
                        self.dirs.add("/".join(parts))
                    else:
                        self.files.append("/".join(parts))
        else:
            for here, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
                rel = os.path.relpath(here, root).replace(os.sep, "/")
                prefix = "" if rel == "." else rel + "/"
                for d in dirnames:
                    self.dirs.add(prefix + d)
                for f in filenames:
                    if not _is_hidden(f):
                        self.files.append(prefix + f)

    def location(self, rel):
        if self.is_zip:
            return f"{self.root}:{rel}"
        return os.path.join(self.root, *rel.split("/"))

    def read(self, rel, zf=None):
        if self.is_zip:
            return zf.read(rel)
        with open(self.location(rel), "rb") as f:
            return f.read()


def _list_class_tree(tree, expected_classes=None, require_split=False):
    """Return (class_names, entries) of a class-per-folder tree.

    entries: list of (partition, label, rel_path) in example order.
    """
    top_dirs = {d for d in tree.dirs if "/" not in d}
    for f in tree.files:
        if "/" not in f:
            logging.warning("Ignoring file %s in the dataset root.", f)
    split_names = top_dirs & set(PARTITIONS)
    if split_names:
        if top_dirs - set(PARTITIONS):
            raise ValueError(
                f"{tree.root}: mixes train/test folders with class folders "
                f"{sorted(top_dirs - set(PARTITIONS))}; expected either "
                "<class>/ folders or train/<class>/ and test/<class>/"
            )
        if "train" not in split_names:
            raise ValueError(
                f"{tree.root}: has test/ but no train/ folder; expected "
                "train/<class>/ (and optionally test/<class>/)"
            )
        parts = [p for p in PARTITIONS if p in split_names]
    else:
        parts = [None]
    if require_split and parts != list(PARTITIONS):
        raise ValueError(
            f"{tree.root}: expected train/<class>/ and test/<class>/ "
            f"folders; found top-level folders {sorted(top_dirs)}"
        )

    depth = 2 if parts == [None] else 3
    files_by_class = {}
    for part in parts:
        prefix = "" if part is None else part + "/"
        class_dirs = sorted(
            d[len(prefix) :]
            for d in tree.dirs
            if d.startswith(prefix) and d.count("/") == depth - 2
        )
        if not class_dirs:
            raise ValueError(
                f"no class folders in {tree.location(prefix or '.')}; "
                "expected <class>/ sub-folders holding images"
            )
        files_by_class[part] = {c: [] for c in class_dirs}
    for rel in tree.files:
        pieces = rel.split("/")
        if len(pieces) == 1:
            continue
        part = pieces[0] if parts != [None] else None
        if len(pieces) != depth:
            raise ValueError(
                f"unexpected nested path {tree.location(rel)}; expected "
                + (
                    "<class>/<image>"
                    if depth == 2
                    else "<part>/<class>/<image>"
                )
            )
        if not rel.lower().endswith(IMAGE_EXTENSIONS):
            raise ValueError(
                f"non-image file {tree.location(rel)}: class folders may "
                f"only hold images with extensions {IMAGE_EXTENSIONS}"
            )
        files_by_class[part][pieces[-2]].append(pieces[-1])

    class_sets = {p: set(c) for p, c in files_by_class.items()}
    if len({frozenset(s) for s in class_sets.values()}) > 1:
        raise ValueError(
            f"{tree.root}: train/ and test/ must hold the same class folders; "
            f"received train={sorted(class_sets['train'])}, "
            f"test={sorted(class_sets['test'])}"
        )
    found = class_sets[parts[0]]
    if expected_classes is not None:
        if found != set(expected_classes):
            raise ValueError(
                f"{tree.root}: class folders {sorted(found)} do not match "
                f"the expected classes {sorted(expected_classes)}"
            )
        class_names = list(expected_classes)
    else:
        class_names = sorted(found, key=_natural_key)

    entries = []
    for part in parts:
        for label, cls in enumerate(class_names):
            names = files_by_class[part][cls]
            prefix = "" if part is None else part + "/"
            if not names:
                raise ValueError(
                    f"empty class folder {tree.location(prefix + cls)}; "
                    "every class folder must hold at least one image"
                )
            for fname in sorted(names, key=_natural_key):
                entries.append(
                    (part or "train", label, f"{prefix}{cls}/{fname}")
                )
    return class_names, entries


def _check_image_bytes(data):
    """Return (height, width) of an encoded image; raise ValueError if bad."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            width, height = im.size
            im.verify()
    except UnidentifiedImageError as e:
        raise ValueError("not a recognised image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"not a decodable image ({e})") from e
    if fmt not in _PIL_FORMATS:
        raise ValueError(f"unsupported image format {fmt}")
    if fmt in ("JPEG", "MPO") and b"\xff\xd9" not in data[-1024:]:
        raise ValueError("truncated JPEG (no end-of-image marker)")
    return height, width


def _verify_images(tree, rels, skip_corrupt):
    """Check each image; return (kept mask, sizes [n, 2], skipped names)."""
    keep = np.ones(len(rels), bool)
    sizes = np.zeros((len(rels), 2), np.int64)
    bad = []
    zf = zipfile.ZipFile(tree.root) if tree.is_zip else None
    try:
        for i, rel in enumerate(rels):
            try:
                data = tree.read(rel, zf)
            except FileNotFoundError as e:
                if not skip_corrupt:
                    raise FileNotFoundError(
                        f"image file not found: {tree.location(rel)}"
                    ) from e
                bad.append((i, "missing"))
                continue
            try:
                sizes[i] = _check_image_bytes(data)
            except ValueError as e:
                if not skip_corrupt:
                    raise ValueError(
                        f"corrupt image {tree.location(rel)}: {e}; pass "
                        "skip_corrupt=True to skip such files"
                    ) from e
                bad.append((i, str(e)))
    finally:
        if zf is not None:
            zf.close()
    skipped = []
    for i, why in bad:
        keep[i] = False
        skipped.append(tree.location(rels[i]))
        logging.warning("Skipping %s: %s", tree.location(rels[i]), why)
    if bad:
        logging.warning(
            "Skipped %d of %d images under %s.", len(bad), len(rels), tree.root
        )
    return keep, sizes, skipped


def _check_indices(indices, n):
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (
        indices.size == 0 or np.issubdtype(indices.dtype, np.integer)
    ):
        raise ValueError(
            "indices must be a 1-D integer array; received "
            f"dtype={indices.dtype}, shape={indices.shape}"
        )
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(
            f"indices must lie in [0, {n}); received min={indices.min()}, "
            f"max={indices.max()}"
        )
    return indices


# ---------------------------------------------------------------- folder


def load_folder(root, skip_corrupt=False, name="folder") -> ImageDataset:
    """Load a class-per-folder directory (or zip of one), decoded lazily."""
    if not os.path.exists(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    tree = _Tree(root)
    class_names, entries = _list_class_tree(tree)
    rels = [rel for _, _, rel in entries]
    keep, sizes, skipped = _verify_images(tree, rels, skip_corrupt)
    entries = [e for e, k in zip(entries, keep) if k]
    if not entries:
        raise ValueError(f"no decodable images under {root}")
    labels = np.array([label for _, label, _ in entries], np.int64)
    paths = [
        rel if tree.is_zip else tree.location(rel) for _, _, rel in entries
    ]
    logging.info(
        "Loaded %d images in %d classes from %s.",
        len(entries),
        len(class_names),
        root,
    )
    return ImageDataset(
        name=name,
        labels=labels,
        class_names=class_names,
        partition=np.array([p for p, _, _ in entries], dtype=object),
        paths=paths,
        source=("zip:" if tree.is_zip else "folder:") + root,
        skipped=skipped,
        archive=root if tree.is_zip else None,
        image_sizes=sizes[keep],
    )


# ---------------------------------------------------------------- cifar10


def _find_cifar10_files(root):
    """Return the cifar10 zip or folder under `root`, and the paths tried."""
    candidates = [
        root,
        os.path.join(root, "cifar10", CIFAR10_ZIP),
        os.path.join(root, CIFAR10_ZIP),
        os.path.join(root, "cifar10"),
    ]
    for path in candidates:
        if os.path.isfile(path):
            return path, candidates
        if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(
            os.path.join(path, "test")
        ):
            return path, candidates
    return None, candidates


def _decode_equal_size(tree, rels, skip_corrupt):
    """Decode images of one size with tf.io.decode_jpeg; uint8 [n, H, W, 3]."""
    zf = zipfile.ZipFile(tree.root) if tree.is_zip else None
    try:
        blobs = [tree.read(rel, zf) for rel in rels]
    finally:
        if zf is not None:
            zf.close()
    first = tf.io.decode_jpeg(blobs[0], channels=3).shape
    shape = (int(first[0]), int(first[1]), 3)

    def decode(data):
        return tf.ensure_shape(tf.io.decode_jpeg(data, channels=3), shape)

    ds = (
        tf.data.Dataset.from_tensor_slices(tf.constant(blobs, tf.string))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(_DECODE_BATCH)
    )
    images = np.empty((len(blobs),) + shape, np.uint8)
    try:
        start = 0
        for batch in ds:
            images[start : start + len(batch)] = batch.numpy()
            start += len(batch)
        return images, np.ones(len(blobs), bool), []
    except tf.errors.InvalidArgumentError:
        pass
    # Slow path, only after a failure: find the offending files by name.
    keep = np.ones(len(blobs), bool)
    skipped = []
    for i, data in enumerate(blobs):
        try:
            image = tf.io.decode_jpeg(data, channels=3).numpy()
        except tf.errors.InvalidArgumentError as e:
            if not skip_corrupt:
                raise ValueError(
                    f"corrupt image {tree.location(rels[i])}: {e.message}; "
                    "pass skip_corrupt=True to skip such files"
                ) from e
            keep[i] = False
            skipped.append(tree.location(rels[i]))
            logging.warning("Skipping corrupt image %s.", skipped[-1])
            continue
        if image.shape != shape:
            raise ValueError(
                f"image {tree.location(rels[i])} has shape {image.shape}; "
                f"expected every image to have shape {shape}"
            )
        images[i] = image
    logging.warning("Skipped %d corrupt images.", len(skipped))
    return images[keep], keep, skipped


def _load_cifar10(data_dir, source, skip_corrupt):
    root = data_dir or os.environ.get("UHGA_DATA_DIR")
    if root:
        root = os.path.abspath(os.path.expanduser(str(root)))
    if source != "tfds":
        found, tried = _find_cifar10_files(root) if root else (None, [])
        if found is not None:
            return _load_cifar10_files(found, skip_corrupt)
        if source == "files":
            raise FileNotFoundError(
                "CIFAR-10 files not found; looked for a zip or a folder with "
                f"train/ and test/ at {tried or 'data_dir=None'} (set "
                "data_dir or UHGA_DATA_DIR)"
            )
    return _load_tfds(
        "cifar10",
        CIFAR10_CLASSES,
        root,
        download=(source == "tfds"),
        tried=None if source == "tfds" else (tried or ["data_dir=None"]),
    )


def _load_cifar10_files(path, skip_corrupt):
    start = time.perf_counter()
    tree = _Tree(path)
    class_names, entries = _list_class_tree(
        tree, expected_classes=CIFAR10_CLASSES, require_split=True
    )
    rels = [rel for _, _, rel in entries]
    images, keep, skipped = _decode_equal_size(tree, rels, skip_corrupt)
    entries = [e for e, k in zip(entries, keep) if k]
    logging.info(
        "Loaded %d CIFAR-10 images from %s in %.1f s.",
        len(entries),
        path,
        time.perf_counter() - start,
    )
    return ImageDataset(
        name="cifar10",
        labels=np.array([label for _, label, _ in entries], np.int64),
        class_names=class_names,
        partition=np.array([p for p, _, _ in entries], dtype=object),
        images=images,
        source=("zip:" if tree.is_zip else "folder:") + path,
        skipped=skipped,
    )


# ---------------------------------------------------------------- TFDS


def _load_tfds(name, class_names, root, download, tried=None):
    """Load train then test of TFDS `name` as uint8 RGB arrays."""
    import tensorflow_datasets as tfds

    tfds_dir = os.path.join(root, "tfds") if root else None
    builder = tfds.builder(name, data_dir=tfds_dir)
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"{name} not found: no files at {tried} and no prepared TFDS "
                f"copy in {tfds_dir or '~/tensorflow_datasets'}; provide the "
                "files or pass source='tfds' to download it with TFDS"
            )
        builder.download_and_prepare()
    images, labels, partition = [], [], []
    for part in PARTITIONS:
        x, y = tfds.as_numpy(
            builder.as_dataset(split=part, batch_size=-1, as_supervised=True)
        )
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        images.append(x.astype(np.uint8))
        labels.append(y.astype(np.int64))
        partition.append(np.full(len(y), part, dtype=object))
    return ImageDataset(
        name=name,
        labels=np.concatenate(labels),
        class_names=list(class_names),
        partition=np.concatenate(partition),
        images=np.concatenate(images),
        source=f"tfds:{tfds_dir or '~/tensorflow_datasets'}/{name}",
    )


# ---------------------------------------------------------------- idx


def _open_maybe_gz(path):
    for candidate in (path + ".gz", path):
        if os.path.isfile(candidate):
            if candidate.endswith(".gz"):
                with gzip.open(candidate, "rb") as f:
                    return f.read(), candidate
            with open(candidate, "rb") as f:
                return f.read(), candidate
    return None, path


def read_idx(data, ndim, where=""):
    """Parse an idx (ubyte) array: magic 0x0800 | ndim, then big-endian dims."""
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{where}: too short for an idx header")
    magic = struct.unpack(">I", data[:4])[0]
    expected = 0x0800 | ndim
    if magic != expected:
        raise ValueError(
            f"{where}: idx magic number {magic:#010x}; expected "
            f"{expected:#010x} (unsigned byte, {ndim} dims)"
        )
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(
            f"{where}: idx body holds {body.size} bytes; expected "
            f"{int(np.prod(dims))} for dims {dims}"
        )
    return body.reshape(dims)


def _load_fashion_mnist(data_dir, source):
    root = data_dir or os.environ.get("UHGA_DATA_DIR")
    dirs = []
    if root:
        root = os.path.abspath(os.path.expanduser(str(root)))
        dirs += [os.path.join(root, "fashion_mnist"), root]
    dirs.append(FASHION_MNIST_SYSTEM_DIR)
    if source != "tfds":
        for d in dirs:
            if _open_maybe_gz(os.path.join(d, "train-images-idx3-ubyte"))[0]:
                return _load_fashion_mnist_idx(d)
        if source == "files":
            raise FileNotFoundError(
                "Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...) "
                f"not found in {dirs}"
            )
    return _load_tfds(
        "fashion_mnist",
        FASHION_MNIST_CLASSES,
        root,
        download=(source == "tfds"),
        tried=None if source == "tfds" else dirs,
    )


def _load_fashion_mnist_idx(directory):
    images, labels, partition = [], [], []
    for part, prefix, count in (
        ("train", "train", 60000),
        ("test", "t10k", 10000),
    ):
        arrays = []
        for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
            data, path = _open_maybe_gz(
                os.path.join(directory, f"{prefix}-{kind}-ubyte")
            )
            if data is None:
                raise FileNotFoundError(f"Fashion-MNIST file not found: {path}")
            arrays.append(read_idx(data, ndim, path))
        x, y = arrays
        if x.shape != (count, 28, 28) or y.shape != (count,):
            raise ValueError(
                f"Fashion-MNIST {part} in {directory}: images {x.shape} and "
                f"labels {y.shape}; expected ({count}, 28, 28) and ({count},)"
            )
        if y.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(
                f"Fashion-MNIST {part} labels must lie in [0, 10); received "
                f"max={y.max()}"
            )
        images.append(np.repeat(x[..., None], 3, axis=-1))
        labels.append(y.astype(np.int64))
        partition.append(np.full(count, part, dtype=object))
    logging.info("Loaded Fashion-MNIST idx files from %s.", directory)
    return ImageDataset(
        name="fashion_mnist",
        labels=np.concatenate(labels),
        class_names=list(FASHION_MNIST_CLASSES),
        partition=np.concatenate(partition),
        images=np.concatenate(images),
        source=f"idx:{directory}",
    )


# ---------------------------------------------------------------- NUS-WIDE


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
    tree = _Tree(images_dir, scan=False)
    rels = [_nus_relative_path(entries[i]) for i in kept]
    keep, sizes, skipped = _verify_images(tree, rels, skip_corrupt)
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
