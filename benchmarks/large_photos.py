"""Does an exported model code a large, noisy photo like the small image?

    python -m uhga_tf.train --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --noattention --workdir=runs/cifar10_64
    python -m uhga_tf.export --checkpoint=runs/cifar10_64 \
        --export_dir=models/cifar10
    python benchmarks/large_photos.py --model=models/cifar10/1 \
        --data_dir=../shared/data

A camera's photo holds thousands of pixels a side, with sensor noise and
fine texture; the backbone reads 160. For 1,000 seeded CIFAR-10 test
images this makes such photos: each image enlarged (bicubic) to
--sizes pixels a side, Gaussian noise of standard deviation --noise added
(sensor noise, in 0..255 units), saved as JPEG (quality 92) and sent as
bytes to the model's `serving_default` signature. The 32 px originals go
through the same signature for reference. Over the 1,000 it reports P@10
(the share of each photo's 10 nearest photos, by Hamming distance with
ties in a seeded random order, that hold the same CIFAR-10 class: labels
are read only here, to score) and the mean Hamming distance from each
photo's code to its 32 px original's. Results merge into
benchmarks/results/large_photos.json under --name with the commit the
model was exported at, the flags and this script's commit.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_env  # noqa: E402
import photo_sets  # noqa: E402

photo_sets.define_flags("benchmarks/results/large_photos.json")
flags.DEFINE_list("sizes", ["1024", "2048"], "Photo sides in pixels.")
flags.DEFINE_float("noise", 8.0, "Sensor noise std, 0..255 units.")
FLAGS = flags.FLAGS
QUALITY = 92


def photos(images, side, noise, seed):
    """JPEG bytes of each image enlarged to `side` with sensor noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for image in images:
        big = np.asarray(Image.fromarray(image).resize(
            (side, side), Image.BICUBIC), np.float32)
        big = big + rng.normal(0.0, noise, big.shape)
        blobs.append(photo_sets.jpeg(Image.fromarray(
            np.clip(np.round(big), 0, 255).astype(np.uint8)), QUALITY))
    return blobs


def precision_at_10(codes, labels):
    bits = codes.shape[1]
    distance = (bits - codes @ codes.T) / 2.0
    np.fill_diagonal(distance, np.inf)
    ties = np.random.default_rng(1).random(distance.shape) * 0.5
    nearest = np.argsort(distance + ties, axis=1)[:, :10]
    return float((labels[nearest] == labels[:, None]).mean())


def main(argv):
    del argv
    from PIL import Image

    zip_path = photo_sets.cifar10_zip(FLAGS.data_dir)
    images, labels = photo_sets.test_images(zip_path, FLAGS.images)
    native = photo_sets.serving_codes(FLAGS.model, [
        photo_sets.jpeg(Image.fromarray(image), QUALITY) for image in images])
    bits = native.shape[1]
    entry = {
        **photo_sets.model_entry(FLAGS.model),
        "code_length": int(bits),
        "images": len(images),
        "native_32px_p_at_10": precision_at_10(native, labels),
        "photos": {},
    }
    print(f"native 32 px: P@10 {entry['native_32px_p_at_10']:.3f}")
    for side in map(int, FLAGS.sizes):
        codes = photo_sets.serving_codes(
            FLAGS.model, photos(images, side, FLAGS.noise, seed=side))
        row = {
            "p_at_10": precision_at_10(codes, labels),
            "mean_hamming_to_native": float(
                ((bits - (codes * native).sum(1)) / 2).mean()),
        }
        entry["photos"][str(side)] = row
        print(f"{side} px, noise {FLAGS.noise:g}: P@10 {row['p_at_10']:.3f}, "
              f"mean Hamming to the 32 px code "
              f"{row['mean_hamming_to_native']:.1f}")
    bench_env.merge_entry(FLAGS.out, FLAGS.name, entry,
                          FLAGS.flag_values_dict())


if __name__ == "__main__":
    app.run(main)
