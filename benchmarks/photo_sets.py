"""Photos made from CIFAR-10's test images, and an export's codes of them.

Shared by `orientation.py` and `large_photos.py`, which send such photos as
bytes to an exported model's `serving_default` signature.
"""

import io
import os
import zipfile

import numpy as np
from absl import flags


def define_flags(out):
    """The flags both photo benchmarks take (each adds its own), with
    `out` the JSON their results merge into."""
    flags.DEFINE_string("model", None, "An exported model version folder.")
    flags.DEFINE_string("data_dir", os.environ.get("UHGA_DATA_DIR", ""),
                        "Holds cifar10/cifar10-jpeg.zip.")
    flags.DEFINE_integer("images", 1000, "Test images drawn (seed 0).")
    flags.DEFINE_string("name", "exported", "Entry name in --out.")
    flags.DEFINE_string("out", out, "JSON to merge into.")
    flags.mark_flag_as_required("model")


def cifar10_zip(data_dir):
    return os.path.join(data_dir, "cifar10", "cifar10-jpeg.zip")


def test_images(zip_path, count):
    """(32 px RGB arrays, their class names) of `count` test images drawn
    with seed 0."""
    from PIL import Image

    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist()
                       if n.startswith("test/") and n.endswith(".jpg"))
        chosen = np.random.default_rng(0).choice(len(names), count,
                                                 replace=False)
        images = []
        for i in chosen:
            with Image.open(io.BytesIO(archive.read(names[i]))) as image:
                images.append(np.asarray(image.convert("RGB")))
    return images, np.array([names[i].split("/")[1] for i in chosen])


def jpeg(image, quality, exif=None):
    """JPEG bytes of a PIL image (with EXIF bytes when given)."""
    out = io.BytesIO()
    options = {"exif": exif} if exif is not None else {}
    image.save(out, "JPEG", quality=quality, **options)
    return out.getvalue()


def serving_codes(model_dir, blobs, batch=25):
    """int32 {-1, +1} codes of encoded images from `serving_default`."""
    import tensorflow as tf

    signature = tf.saved_model.load(model_dir).signatures["serving_default"]
    return np.concatenate([
        signature(image_bytes=tf.constant(blobs[i:i + batch]))["codes"]
        .numpy() for i in range(0, len(blobs), batch)]).astype(np.int32)


def model_entry(model_dir):
    """The model's path and the commit it was exported at (its decoding
    graph), for a result entry."""
    from uhga_tf.retrieval import pipeline

    return {"model": model_dir, "model_exported_at":
            pipeline.read_model_metadata(model_dir).get("git_sha")}
