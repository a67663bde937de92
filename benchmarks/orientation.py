"""Does an exported model code a phone's portrait photo like the upright one?

    python -m uhga_tf.train --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --noattention --workdir=runs/cifar10_64
    python -m uhga_tf.export --checkpoint=runs/cifar10_64 \
        --export_dir=models/cifar10
    python benchmarks/orientation.py --model=models/cifar10/1 \
        --data_dir=../shared/data

A phone stores a portrait shot with its pixels a quarter turn
anticlockwise and EXIF orientation 6 ("turn clockwise to view"). For 1,000
seeded CIFAR-10 test images (bilinearly enlarged to 128 px, JPEG quality
95) this writes both files, the upright one and the phone's, sends both to
the model's `serving_default` signature and reports, over the 1,000 pairs:
the mean Hamming distance from the phone's file to its own upright file,
the share of pairs with identical codes, the share whose own upright file
is nearer than every other upright image (ties count for it), and the mean
distance to the other images for scale. The images are never written to
disk. `--name` names the JSON entry (e.g. a model exported before the
upright decoding, for comparison); results merge into
benchmarks/results/orientation.json with the commit, the model's path and
the flags.
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

photo_sets.define_flags("benchmarks/results/orientation.json")
FLAGS = flags.FLAGS
ORIENTATION_TAG = 0x0112
PHONE_PORTRAIT = 6
SIZE = 128


def photo_pairs(zip_path, count):
    """(upright JPEGs, the same photos as a phone stores them)."""
    from PIL import Image

    images, _ = photo_sets.test_images(zip_path, count)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = PHONE_PORTRAIT
    upright, phone = [], []
    for array in images:
        image = Image.fromarray(array).resize((SIZE, SIZE), Image.BILINEAR)
        upright.append(photo_sets.jpeg(image, 95))
        phone.append(photo_sets.jpeg(
            image.transpose(Image.Transpose.ROTATE_90), 95, exif.tobytes()))
    return upright, phone


def main(argv):
    del argv
    zip_path = photo_sets.cifar10_zip(FLAGS.data_dir)
    upright, phone = photo_pairs(zip_path, FLAGS.images)
    a = photo_sets.serving_codes(FLAGS.model, upright)
    b = photo_sets.serving_codes(FLAGS.model, phone)
    bits = a.shape[1]
    distance = (bits - b @ a.T) // 2  # phone file i -> upright file j
    own = np.diag(distance)
    others = distance[~np.eye(len(a), dtype=bool)]
    entry = {
        **photo_sets.model_entry(FLAGS.model),
        "code_length": int(bits),
        "pairs": len(a),
        "mean_hamming_to_own_upright": float(own.mean()),
        "share_identical_codes": float((own == 0).mean()),
        "share_own_upright_nearest": float(
            ((distance < own[:, None]).sum(1) == 0).mean()),
        "mean_hamming_to_other_images": float(others.mean()),
    }
    for key, value in entry.items():
        print(f"{key:>30}: {value}")
    bench_env.merge_entry(FLAGS.out, FLAGS.name, entry,
                          FLAGS.flag_values_dict())


if __name__ == "__main__":
    app.run(main)
