"""Class-per-folder image trees (a folder or a zip of one): the `folder`
source, and the listing and image checks that cifar10 and nus_wide share.

The `folder` source also reads an unlabelled collection (a user's photos):
with `folder_labels="none"` every image under the root, at any depth, is
one item with no class (`UNLABELLED`), and other files are skipped and
counted; `"auto"` (the default) reads a root that holds images and no
sub-folders that way, and any other tree as class folders.

Folder rules (class folders):

- Files whose extension is in `FOLDER_EXTENSIONS` are images. Hidden entries
  (names starting with ".", `__MACOSX`) are ignored, and so are regular files
  directly in the root. Any other file inside a class folder (e.g. `notes.txt`)
  or a nested folder is a `ValueError` naming it: a stray file there usually
  means the wrong folder was given.
- An empty class folder is a `ValueError`.
- Lazily decoded datasets are checked at load time with PIL
  (`Image.verify()` plus a JPEG end-of-image marker check), so a corrupt
  file is reported by name before any tf.data pipeline runs. With
  `skip_corrupt=True` such files are dropped instead; their names are kept
  in `ImageDataset.skipped` and the count is logged.
"""

import io
import os
import re
import zipfile

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from uhga_tf import config
from uhga_tf.data import image_decode
from uhga_tf.data import image_header
from uhga_tf.data.image_dataset import PARTITIONS, UNLABELLED, ImageDataset

# The decoder's extensions less GIF: the folder loader verifies stills only
# (`_PIL_FORMATS`), so a .gif would be listed and then refused.
FOLDER_EXTENSIONS = tuple(e for e in image_header.EXTENSIONS if e != ".gif")

_PIL_FORMATS = ("JPEG", "PNG", "BMP", "MPO", "WEBP")


def natural_key(name):
    """Sort key of natural name order ("img2" < "img10")."""
    return [
        (0, int(tok), tok) if tok.isdigit() else (1, 0, tok)
        for tok in re.split(r"(\d+)", name)
        if tok
    ]


def _is_hidden(part):
    return part.startswith(".") or part == "__MACOSX"


class FileTree:
    """Relative file listing of a directory or zip (posix paths)."""

    def __init__(self, root, scan=True):
        self.root = root
        self.is_zip = os.path.isfile(root)
        self.files = []
        self.dirs = set()
        if not scan:
            return
        if self.is_zip:
            self._scan_zip()
        else:
            self._scan_folder()

    def _scan_zip(self):
        if not zipfile.is_zipfile(self.root):
            raise ValueError(
                f"expected a folder or a zip file; received {self.root!r}, "
                "which is neither"
            )
        with zipfile.ZipFile(self.root) as zf:
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

    def _scan_folder(self):
        for here, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
            rel = os.path.relpath(here, self.root).replace(os.sep, "/")
            prefix = "" if rel == "." else rel + "/"
            for d in dirnames:
                self.dirs.add(prefix + d)
            for f in filenames:
                if not _is_hidden(f):
                    self.files.append(prefix + f)

    @property
    def kind(self):
        """"zip" or "folder", as in `ImageDataset.source`."""
        return "zip" if self.is_zip else "folder"

    def location(self, rel):
        if self.is_zip:
            return f"{self.root}:{rel}"
        return os.path.join(self.root, *rel.split("/"))

    def read(self, rel, zf=None):
        if self.is_zip:
            return zf.read(rel)
        with open(self.location(rel), "rb") as f:
            return f.read()

    def open_archive(self):
        """The open zip for `read`, or None for a folder; close it after."""
        return zipfile.ZipFile(self.root) if self.is_zip else None


def list_class_tree(tree, expected_classes=None, require_split=False):
    """Return (class_names, entries) of a class-per-folder tree.

    entries: list of (partition, label, rel_path) in example order.
    """
    for f in tree.files:
        if "/" not in f:
            logging.warning("Ignoring file %s in the dataset root.", f)
    parts = _tree_parts(tree, require_split)
    files_by_class = _files_by_class(tree, parts)
    class_names = _class_names(tree, files_by_class, parts, expected_classes)
    entries = []
    for part in parts:
        prefix = "" if part is None else part + "/"
        for label, cls in enumerate(class_names):
            names = files_by_class[part][cls]
            if not names:
                raise ValueError(
                    f"empty class folder {tree.location(prefix + cls)}; "
                    "every class folder must hold at least one image"
                )
            for fname in sorted(names, key=natural_key):
                entries.append(
                    (part or "train", label, f"{prefix}{cls}/{fname}")
                )
    return class_names, entries


def _tree_parts(tree, require_split):
    """["train", "test"] / ["train"] for split trees, [None] for flat ones."""
    top_dirs = {d for d in tree.dirs if "/" not in d}
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
    return parts


def _files_by_class(tree, parts):
    """{part: {class folder: [image file names]}}; refuses stray files."""
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
                "expected <class>/ sub-folders holding images (images "
                "without classes: folder_labels=none)"
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
        if not rel.lower().endswith(FOLDER_EXTENSIONS):
            unread = image_header.unread_photos([rel])
            raise ValueError(
                f"non-image file {tree.location(rel)}: class folders may "
                f"only hold images with extensions {FOLDER_EXTENSIONS}"
                + (f"; TensorFlow cannot decode {next(iter(unread))} "
                   f"photos: {image_header.CONVERT_HINT}" if unread else ""))
        files_by_class[part][pieces[-2]].append(pieces[-1])
    return files_by_class


def _class_names(tree, files_by_class, parts, expected_classes):
    """Class order: `expected_classes`, else natural order of the folders."""
    class_sets = {p: set(c) for p, c in files_by_class.items()}
    if len({frozenset(s) for s in class_sets.values()}) > 1:
        raise ValueError(
            f"{tree.root}: train/ and test/ must hold the same class folders; "
            f"received train={sorted(class_sets['train'])}, "
            f"test={sorted(class_sets['test'])}"
        )
    found = class_sets[parts[0]]
    if expected_classes is None:
        return sorted(found, key=natural_key)
    if found != set(expected_classes):
        raise ValueError(
            f"{tree.root}: class folders {sorted(found)} do not match "
            f"the expected classes {sorted(expected_classes)}"
        )
    return list(expected_classes)


def check_image_bytes(data,
                      max_pixels=image_header.COLLECTION_MAX_IMAGE_PIXELS):
    """Return (height, width) of an encoded image; raise ValueError if bad.

    The decode guard (`image_header.check_decodable`) runs first, so a
    decompression bomb is refused before PIL or TensorFlow decodes it.
    """
    try:
        image_header.check_decodable(data, max_pixels, "image")
    except image_header.ImageRefused as e:
        if image_header.image_format(data) is None:
            raise ValueError("not a recognised image format") from e
        raise
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            width, height = im.size
            if fmt in ("JPEG", "MPO") and im.getexif().get(
                    image_decode.ORIENTATION_TAG, 1) in (5, 6, 7, 8):
                # Decoded upright (`image_decode`), it is turned a quarter.
                width, height = height, width
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


def verify_images(tree, rels, skip_corrupt):
    """Check each image; return (kept mask, sizes [n, 2], skipped names)."""
    keep = np.ones(len(rels), bool)
    sizes = np.zeros((len(rels), 2), np.int64)
    bad = []
    zf = tree.open_archive()
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
                sizes[i] = check_image_bytes(data)
            except ValueError as e:
                if not skip_corrupt:
                    what = ("image too large" if isinstance(
                        e, image_header.ImageTooLarge) else "corrupt image")
                    raise ValueError(
                        f"{what} {tree.location(rel)}: {e}; pass "
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


def list_unlabelled_tree(tree):
    """Image files anywhere under the tree, in natural path order; other
    files are skipped (photo folders hold sidecars such as .xmp)."""
    images = [f for f in tree.files if f.lower().endswith(FOLDER_EXTENSIONS)]
    if len(images) < len(tree.files):
        logging.info("Skipping %d files under %s that are not images (%s).",
                     len(tree.files) - len(images), tree.root,
                     ", ".join(FOLDER_EXTENSIONS))
    unread = image_header.unread_photos(tree.files)
    if unread:
        # Photos, not sidecars: a library shot as HEIC would otherwise be
        # left out with nothing but an INFO line.
        logging.warning("%s: %s", tree.root,
                        image_header.unread_photos_note(unread))
    return sorted(images, key=natural_key)


def _is_unlabelled(tree, folder_labels):
    config.check_choice("folder_labels", folder_labels, config.FOLDER_LABELS)
    if folder_labels == "auto":
        return not tree.dirs and any(
            f.lower().endswith(FOLDER_EXTENSIONS) for f in tree.files)
    return folder_labels == "none"


def load_folder(root, skip_corrupt=False, name="folder",
                folder_labels="auto") -> ImageDataset:
    """Load a class-per-folder directory (or zip of one), or an unlabelled
    collection (`folder_labels`, module docstring), decoded lazily."""
    if not os.path.exists(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    tree = FileTree(root)
    if _is_unlabelled(tree, folder_labels):
        class_names = []
        entries = [("train", UNLABELLED, rel)
                   for rel in list_unlabelled_tree(tree)]
    else:
        class_names, entries = list_class_tree(tree)
    rels = [rel for _, _, rel in entries]
    keep, sizes, skipped = verify_images(tree, rels, skip_corrupt)
    entries = [e for e, k in zip(entries, keep) if k]
    if not entries:
        raise ValueError(f"no decodable images under {root}")
    labels = np.array([label for _, label, _ in entries], np.int64)
    paths = [
        rel if tree.is_zip else tree.location(rel) for _, _, rel in entries
    ]
    logging.info(
        "Loaded %d images %s from %s.",
        len(entries),
        f"in {len(class_names)} classes" if class_names else "(unlabelled)",
        root,
    )
    return ImageDataset(
        name=name,
        labels=labels,
        class_names=class_names,
        partition=np.array([p for p, _, _ in entries], dtype=object),
        paths=paths,
        source=f"{tree.kind}:{root}",
        skipped=skipped,
        archive=root if tree.is_zip else None,
        image_sizes=sizes[keep],
    )
