"""The build/query pipeline around `HammingIndex`.

`build_index` encodes an image folder or a dataset with an exported
SavedModel and saves a `HammingIndex`; `search_images` encodes query images
(SavedModel or a gRPC server) and ranks the index. Both are the library
behind `python -m uhga_tf.index` and `python -m uhga_tf.search`.
TensorFlow is imported lazily so `HammingIndex` stays light.
"""

import dataclasses
import io
import json
import os

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from uhga_tf import codes as codes_lib
from uhga_tf import io_utils
from uhga_tf.data import image_header
from uhga_tf.retrieval import result_grid
from uhga_tf.retrieval.hamming_index import HammingIndex
from uhga_tf.saved_model import wire_names

METADATA_FILE = os.path.join(
    wire_names.ASSETS_EXTRA, wire_names.METADATA_FILENAME
)


def read_model_metadata(model_dir):
    """The export's `assets.extra/uhga_tf.json` (code_length, ...), or {}."""
    path = os.path.join(os.fspath(model_dir), METADATA_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


class SavedModelEncoder:
    """Encode images with an exported uhga_tf SavedModel.

    Uses the `serving_default` (encoded bytes) and `encode_images` (uint8
    [n, H, W, 3]) signatures; both return `codes` int8 [n, code_length] and
    `packed_codes` uint8 [n, code_length / 8], checked to agree bit for bit.
    """

    def __init__(self, model_dir):
        import tensorflow as tf

        self.model_dir = os.path.abspath(os.fspath(model_dir))
        if not os.path.isfile(os.path.join(self.model_dir, "saved_model.pb")):
            raise FileNotFoundError(f"no SavedModel at {self.model_dir}")
        loaded = tf.saved_model.load(self.model_dir)
        wanted = {
            wire_names.SIGNATURE_IMAGE_BYTES,
            wire_names.SIGNATURE_IMAGES,
        }
        missing = wanted - set(loaded.signatures)
        if missing:
            raise ValueError(
                f"SavedModel {self.model_dir} lacks signatures "
                f"{sorted(missing)}; has {sorted(loaded.signatures)}"
            )
        self._loaded = loaded  # keeps the signatures' variables alive
        self._serving_default = loaded.signatures[
            wire_names.SIGNATURE_IMAGE_BYTES
        ]
        self._encode_images = loaded.signatures[
            wire_names.SIGNATURE_IMAGES
        ]
        self.metadata = read_model_metadata(self.model_dir)
        self.code_length = self.metadata.get("code_length")

    def encode_image_bytes(self, image_bytes):
        """Encode a list of encoded JPEG/PNG byte strings.

        Raises:
            tf.errors.InvalidArgumentError: if any image cannot be decoded.
        """
        import tensorflow as tf

        batch = tf.constant(list(image_bytes), dtype=tf.string)
        outputs = self._serving_default(
            **{wire_names.INPUT_IMAGE_BYTES: batch}
        )
        return self._check(outputs)

    def encode_images(self, images):
        """Encode uint8 images [n, H, W, 3]."""
        import tensorflow as tf

        batch = tf.constant(np.asarray(images, dtype=np.uint8))
        outputs = self._encode_images(**{wire_names.INPUT_IMAGES: batch})
        return self._check(outputs)

    def _check(self, outputs):
        codes = outputs[wire_names.OUTPUT_CODES].numpy()
        packed_codes = outputs[wire_names.OUTPUT_PACKED_CODES].numpy()
        if self.code_length is None:
            self.code_length = codes.shape[1]
        if codes.shape[1] != self.code_length:
            raise ValueError(
                f"SavedModel emitted codes of length {codes.shape[1]}; its "
                f"metadata says code_length={self.code_length}"
            )
        if not np.array_equal(codes_lib.pack_codes(codes), packed_codes):
            raise ValueError(
                "SavedModel packed_codes disagree with np.packbits(codes > 0);"
                " the model does not follow the uhga_tf bit order"
            )
        return codes, packed_codes


def find_images(images_dir):
    """List image files under `images_dir` recursively, sorted.

    Returns:
        (paths, class_names, labels): absolute paths; when every image lies
        in a direct sub-folder (class-per-folder layout), the sorted folder
        names and the int label of each path, else (paths, None, None).
    """
    images_dir = os.path.abspath(os.fspath(images_dir))
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"no image directory {images_dir}")
    paths, unread = [], {}
    for root, dirs, files in os.walk(images_dir):
        dirs.sort()
        paths.extend(
            os.path.join(root, name)
            for name in sorted(files)
            if name.lower().endswith(image_header.EXTENSIONS)
        )
        for extension, n in image_header.unread_photos(files).items():
            unread[extension] = unread.get(extension, 0) + n
    if unread:
        logging.warning("%s: %s", images_dir,
                        image_header.unread_photos_note(unread))
    if not paths:
        raise ValueError(
            f"no {'/'.join(image_header.EXTENSIONS)} images under {images_dir}"
        )
    parents = [os.path.dirname(p) for p in paths]
    if all(os.path.dirname(p) == images_dir for p in parents):
        class_names = sorted({os.path.basename(p) for p in parents})
        lookup = {name: i for i, name in enumerate(class_names)}
        labels = [lookup[os.path.basename(p)] for p in parents]
        return paths, class_names, labels
    return paths, None, None


def build_index(
    model_dir,
    out_dir,
    images_dir=None,
    dataset=None,
    data_dir=None,
    batch_size=64,
    progress=True,
    skip_corrupt=False,
    max_image_pixels=image_header.COLLECTION_MAX_IMAGE_PIXELS,
    search=None,
):
    """Encode an image folder or a dataset and save a `HammingIndex`.

    Exactly one of `images_dir` and `dataset` is given. Ids are positions
    in the sorted file list (folder) or dataset indices; metadata holds
    `source` (a path, or "dataset:NAME:INDEX" for in-memory images) and
    `label` (an int, or a list of class indices for multi-label data) when
    labels are known.

    Every file passes the decode guard (`image_header.check_decodable`
    with `max_image_pixels`) before the model decodes it.

    Raises:
        ValueError: on a corrupt image unless `skip_corrupt`, naming it.
    """
    if (images_dir is None) == (dataset is None):
        raise ValueError(
            "give exactly one of images_dir and dataset; received "
            f"images_dir={images_dir!r}, dataset={dataset!r}"
        )
    if batch_size <= 0:
        raise ValueError(
            f"batch_size must be > 0; received batch_size={batch_size}"
        )
    encoder = SavedModelEncoder(model_dir)
    info = {"model": encoder.model_dir, "class_names": None}
    if images_dir is not None:
        paths, class_names, labels = find_images(images_dir)
        info.update(source="images", images_dir=os.path.abspath(images_dir))
        sources = paths
        ids, packed_codes = _encode_files(
            encoder, paths, np.arange(len(paths)), batch_size, progress,
            (skip_corrupt, max_image_pixels))
    else:
        from uhga_tf.data import datasets

        data = datasets.load_dataset(dataset, data_dir)
        class_names = getattr(data, "class_names", None)
        labels = getattr(data, "labels", None)
        images = getattr(data, "images", None)
        info.update(source="dataset", dataset=dataset,
                    data_dir=None if data_dir is None
                    else os.path.abspath(data_dir))
        if images is not None:
            sources = [f"dataset:{dataset}:{i}" for i in range(len(images))]
            ids = np.arange(len(images))
            packed_codes = _encode_arrays(encoder, images, batch_size,
                                          progress)
        else:
            sources = [os.fspath(p) for p in data.paths]
            ids, packed_codes = _encode_files(
                encoder, sources, np.arange(len(sources)), batch_size,
                progress, (skip_corrupt, max_image_pixels))
        if labels is not None:
            labels = _label_list(np.asarray(labels))
    if class_names is not None:
        info["class_names"] = [str(name) for name in class_names]
    metadata = {"source": [sources[i] for i in ids]}
    if labels is not None:
        metadata["label"] = [labels[i] for i in ids]
    index = HammingIndex(encoder.code_length, info=info)
    index.add(packed_codes, ids, metadata=metadata)
    if search is not None:
        search.apply(index)
    index.save(out_dir)
    return index


def build_index_from_codes(codes_dir, out_dir, search=None):
    """Save a `HammingIndex` of the shards `encode_collection` wrote.

    Ids, sources and labels are kept; the index's info records the model
    and the codes directory. `search` (an `index_updates.SearchKind`) picks
    the search kind; default flat.
    """
    from uhga_tf.retrieval import code_shards

    packed, ids, metadata, manifest = code_shards.read_code_shards(codes_dir)
    info = {
        "model": manifest.get("model"),
        "class_names": manifest.get("class_names"),
        "source": "code_shards",
        "codes_dir": os.path.abspath(os.fspath(codes_dir)),
    }
    index = HammingIndex(manifest["code_length"], info=info)
    index.add(packed, ids, metadata=metadata)
    if search is not None:
        search.apply(index)
    index.save(out_dir)
    return index


@dataclasses.dataclass
class QueryResult:
    """The ranking of one query image.

    Attributes:
        query_path: the query file.
        query_class: class name of the query, or None when unknown.
        ids: int64 [k] result ids, best first (ties by insertion order).
        distances: int32 [k] Hamming distances.
        sources: k image sources (path or "dataset:NAME:INDEX").
        class_names: k result class names (", "-joined if multi-label), or
            None when the index has no labels.
        relevant: k bools (shares the query's class), or None.
    """

    query_path: str
    query_class: str | None
    ids: np.ndarray
    distances: np.ndarray
    sources: list
    class_names: list | None
    relevant: list | None


def search_images(
    index_dir,
    query_paths,
    top_k=10,
    model_dir=None,
    server=None,
    model_name=wire_names.DEFAULT_MODEL_NAME,
    query_label=None,
    max_image_pixels=image_header.COLLECTION_MAX_IMAGE_PIXELS,
):
    """Encode query images and return one `QueryResult` per query.

    Queries pass the decode guard, then go through the SavedModel at
    `model_dir` or the gRPC server at `server` ("HOST:PORT").
    """
    if (model_dir is None) == (server is None):
        raise ValueError(
            "give exactly one of model_dir and server; received "
            f"model_dir={model_dir!r}, server={server!r}"
        )
    if not query_paths:
        raise ValueError("give at least one query image")
    index = HammingIndex.load(index_dir)
    class_names = index.info.get("class_names")
    if query_label is not None and (
        not class_names or query_label not in class_names
    ):
        raise ValueError(
            f"query_label must be one of the index classes {class_names}; "
            f"received query_label={query_label!r}"
        )
    image_bytes = [_read_query(p, max_image_pixels) for p in query_paths]
    if server is not None:
        try:
            from uhga_tf.serving import grpc_client
        except ImportError as e:
            raise ValueError(
                f"--server needs uhga_tf.serving.grpc_client: {e}"
            ) from e
        _, packed_codes = grpc_client.encode_images(
            server,
            image_bytes,
            model_name=model_name,
            signature_name=wire_names.SIGNATURE_IMAGE_BYTES,
            timeout=10.0,
        )
        packed_codes = np.asarray(packed_codes, dtype=np.uint8)
    else:
        _, packed_codes = SavedModelEncoder(model_dir).encode_image_bytes(
            image_bytes
        )
    ids, distances = index.search(packed_codes, top_k)
    results = []
    for path, row_ids, row_distances in zip(query_paths, ids, distances):
        metadata = index.get_metadata(row_ids)
        query_class = query_label
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        if query_class is None and class_names and parent in class_names:
            query_class = parent
        names = relevant = None
        if class_names and all("label" in m for m in metadata):
            label_sets = [_as_set(m["label"]) for m in metadata]
            names = [
                ", ".join(class_names[i] for i in sorted(s))
                for s in label_sets
            ]
            if query_class is not None:
                target = class_names.index(query_class)
                relevant = [target in s for s in label_sets]
        results.append(QueryResult(
            query_path=os.fspath(path),
            query_class=query_class,
            ids=row_ids,
            distances=row_distances,
            sources=[m.get("source") for m in metadata],
            class_names=names,
            relevant=relevant,
        ))
    return results, index


def write_result_grid(results, index, out_path, tile_size=128):
    """Render `results` of `search_images` to a PNG at `out_path`."""
    loader = _TileLoader(index.info)
    rows = []
    for result in results:
        caption = "query" + (
            f"\n{result.query_class}" if result.query_class else ""
        )
        row = [result_grid.Tile(Image.open(result.query_path), caption)]
        for i, (source, distance) in enumerate(
            zip(result.sources, result.distances)
        ):
            caption = f"d={int(distance)}"
            if result.class_names is not None:
                caption += f"\n{result.class_names[i]}"
            row.append(result_grid.Tile(
                loader(source),
                caption,
                None if result.relevant is None else result.relevant[i],
            ))
        rows.append(row)
    image = result_grid.render_result_grid(rows, tile_size=tile_size)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    image.save(out_path, format="PNG")
    logging.info("Wrote result grid %s (%dx%d)", out_path, *image.size)
    return image.size


def _encode_files(encoder, paths, ids, batch_size, progress, checks):
    """Encode image files by raw bytes; return (kept ids, packed_codes).

    `checks` is (skip_corrupt, max_image_pixels).
    """
    from tqdm import tqdm

    skip_corrupt, max_pixels = checks
    kept, chunks = [], []
    with tqdm(total=len(paths), disable=not progress, unit="img",
              desc="encode") as bar:
        for start in range(0, len(paths), batch_size):
            batch_ids = ids[start:start + batch_size]
            batch = [_read_file(paths[i]) for i in batch_ids]
            # The message below names the path; the reason says "the file".
            packed, reasons = encode_blobs(
                encoder, batch, ["the file"] * len(batch), max_pixels)
            for i, row, reason in zip(batch_ids, packed, reasons):
                if reason is None:
                    chunks.append(row[None])
                    kept.append(i)
                elif not skip_corrupt:
                    raise ValueError(
                        f"cannot decode image {paths[i]}: {reason} "
                        "(pass --skip_corrupt to skip it)"
                    )
                else:
                    logging.warning("Skipping image %s: %s", paths[i], reason)
            bar.update(len(batch))
    if not kept:
        raise ValueError("no image could be decoded")
    return np.asarray(kept, np.int64), np.concatenate(chunks)


def encode_blobs(encoder, blobs, names=None,
                 max_pixels=image_header.COLLECTION_MAX_IMAGE_PIXELS,
                 max_call_pixels=image_header.DEFAULT_MAX_REQUEST_PIXELS):
    """Encode encoded images in as few calls as fit, isolating bad ones.

    `names` (e.g. paths) name the images in the reasons.

    Returns:
        (packed_codes uint8 [n, code_length / 8], reasons): reasons[i] is
        None for an encoded image, else why image i was refused; its row
        of packed_codes is then zeros. Images the decode guard
        (`image_header.check_decodable` with `max_pixels`) refuses never
        reach the model; the others go in calls of at most
        `max_call_pixels` decoded pixels (the server's request budget, so
        a batch of camera photos decodes in bounded memory), or one by one
        when the decoder refuses one of them.
    """
    import tensorflow as tf

    names = names or [f"image {i}" for i in range(len(blobs))]
    reasons, calls = [], [[]]
    budget = 0
    for i, (blob, name) in enumerate(zip(blobs, names)):
        try:
            pixels = image_header.check_decodable(blob, max_pixels, name)
            reasons.append(None)
        except image_header.ImageRefused as e:
            reasons.append(str(e))
            continue
        if calls[-1] and budget + pixels > max_call_pixels:
            calls.append([])
            budget = 0
        calls[-1].append(i)
        budget += pixels
    rows = {}
    for good in filter(None, calls):
        try:
            packed = encoder.encode_image_bytes([blobs[i] for i in good])[1]
            rows.update(zip(good, packed))
        except tf.errors.InvalidArgumentError:
            # A header that passed the guard but pixels that do not
            # decode: find the offending image(s) one by one.
            for i in good:
                try:
                    rows[i] = encoder.encode_image_bytes([blobs[i]])[1][0]
                except tf.errors.InvalidArgumentError as e:
                    reasons[i] = io_utils.tf_error_line(e)
    packed = np.zeros((len(blobs), (encoder.code_length or 0) // 8),
                      np.uint8)
    for i, row in rows.items():
        packed[i] = row
    return packed, reasons


def _encode_arrays(encoder, images, batch_size, progress):
    from tqdm import tqdm

    chunks = []
    for start in tqdm(range(0, len(images), batch_size), disable=not progress,
                      unit="batch", desc="encode"):
        chunks.append(
            encoder.encode_images(images[start:start + batch_size])[1]
        )
    return np.concatenate(chunks)


def _label_list(labels):
    """int [N] -> list of ints; multi-hot [N, C] -> list of index lists."""
    if labels.ndim == 1:
        return labels.astype(np.int64).tolist()
    return [np.flatnonzero(row).tolist() for row in labels]


def _as_set(label):
    if label is None:
        return set()
    return set(label) if isinstance(label, list) else {label}


def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


def _read_query(path, max_pixels=image_header.COLLECTION_MAX_IMAGE_PIXELS):
    """Read a query file and check that it decodes as an image."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no query image {path}")
    data = _read_file(path)
    try:
        image_header.check_decodable(data, max_pixels, "the file",
                                     "max_pixels")
    except image_header.ImageRefused as e:
        raise ValueError(f"cannot decode query image {path}: {e}") from e
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError,
            Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode query image {path}: {e}") from e
    return data


class _TileLoader:
    """Open a result source: a file path or "dataset:NAME:INDEX"."""

    def __init__(self, info,
                 max_pixels=image_header.COLLECTION_MAX_IMAGE_PIXELS):
        self._info = info
        self._images = None
        self._max_pixels = max_pixels

    def __call__(self, source):
        if source and source.startswith("dataset:"):
            name, i = source.split(":", 1)[1].rsplit(":", 1)
            if self._images is None:
                from uhga_tf.data import datasets

                self._images = datasets.load_dataset(
                    name, self._info.get("data_dir")
                ).images
            return Image.fromarray(np.asarray(self._images[int(i)]))
        data = _read_file(source)
        image_header.check_decodable(
            data, self._max_pixels, source, "max_pixels"
        )
        return Image.open(io.BytesIO(data))
