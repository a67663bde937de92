r"""EfficientNet-Lite0 feature extraction speed and feature-cache reload time.

  python benchmarks/features.py [--num_images=256] [--batch_size=64]
      [--runtimes=tensorflow,tflite]

Expected wall time ~2-4 min on 2 cores (~8 min at --num_images=1024).
Images: the first `num_images` of the CIFAR-10 test set read from
/work/shared/data/cifar10/cifar10-jpeg.zip (zipfile + PIL; resized in the
graph to each input size), or random uint8 images when the zip is absent
(the JSON says which). Throughput is `extract_features`, the cache's
extraction, once per runtime (`tensorflow`: a tf.function; `tflite`: the
backbone converted to TFLite, XNNPACK kernels) after one warm-up batch,
which for `tflite` includes the conversion and is timed as `warmup_s`.
The cache row writes a 60,000 x 1280 float32 array with
`load_or_compute` and times the reload (digest check included). Prints a
Markdown table and writes benchmarks/results/features.json. On a shared
machine read `images/CPU-s` (images per CPU-second this process received)
beside images/s; the 1-minute load average before each row is recorded.
"""

import argparse
import io
import itertools
import os
import platform
import sys
import tempfile
import time
import zipfile

import numpy as np
import tensorflow as tf
from PIL import Image

from uhga_tf import io_utils
from uhga_tf.data import feature_cache
from uhga_tf.models import backbone as backbone_lib
from bench_env import cpu_model, git_sha

HERE = os.path.dirname(os.path.abspath(__file__))
CIFAR_ZIP = os.path.join(
    HERE, "..", "..", "shared", "data", "cifar10", "cifar10-jpeg.zip"
)
IMAGE_SIZES = (96, 128, 160, 192, 224)


def load_images(num_images):
    """uint8 [n, 32, 32, 3] CIFAR-10 test images, and a note on the source."""
    path = os.path.abspath(CIFAR_ZIP)
    if not os.path.isfile(path):
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (num_images, 32, 32, 3), np.uint8)
        return images, "random uint8 32x32 (CIFAR-10 zip not found)"
    with zipfile.ZipFile(path) as archive:
        names = sorted(
            n for n in archive.namelist()
            if n.startswith("test/") and n.endswith(".jpg")
        )
        # Interleave classes so every class is represented.
        by_class = {}
        for name in names:
            by_class.setdefault(name.split("/")[1], []).append(name)
        per_class = -(-num_images // len(by_class))  # ceil
        picked = [
            files[i] for i in range(per_class)
            for files in by_class.values()
        ][:num_images]
        images = np.stack([
            np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB"))
            for n in picked
        ])
    return images, f"{len(images)} CIFAR-10 test JPEGs from {path}"


def throughput(images, image_size, batch_size, runtime):
    backbone = backbone_lib.build_backbone(
        "efficientnet_lite0", image_size=image_size
    )

    def dataset():
        return (
            tf.data.Dataset.from_tensor_slices(images)
            .batch(batch_size)
            .map(lambda x: tf.image.resize(
                tf.cast(x, tf.float32), (image_size, image_size)
            ))
            .prefetch(1)
        )

    warmup = dataset().take(1)
    start = time.perf_counter()
    feature_cache.extract_features(
        backbone, warmup, min(batch_size, len(images)), progress=False,
        runtime=runtime,
    )
    warmup_s = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    features = feature_cache.extract_features(
        backbone, dataset(), len(images), progress=False, runtime=runtime,
    )
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    assert features.shape == (len(images), 1280)
    return len(images) / seconds, seconds, cpu_seconds, warmup_s


def cache_reload(num_rows, feature_dim):
    array = np.random.default_rng(0).standard_normal(
        (num_rows, feature_dim), dtype=np.float32
    )
    key = {"benchmark": "features", "rows": num_rows, "dim": feature_dim}
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        feature_cache.load_or_compute(cache_dir, key, lambda: array)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        loaded = feature_cache.load_or_compute(
            cache_dir, key, lambda: sys.exit("cache miss on reload")
        )
        load_s = time.perf_counter() - start
        size = os.path.getsize(feature_cache.cache_paths(cache_dir, key)[0])
    assert np.array_equal(loaded, array)
    return write_s, load_s, size


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--cache_rows", type=int, default=60_000)
    parser.add_argument(
        "--runtimes", default="tensorflow,tflite",
        help="comma-separated extract_features runtimes to time",
    )
    parser.add_argument(
        "--note", default="2 CPU cores shared with other engineers' jobs",
        help="conditions of the run, stored in the JSON",
    )
    parser.add_argument(
        "--output", default=os.path.join(HERE, "results", "features.json")
    )
    return parser.parse_args()


def measure_throughput(images, batch_size, runtimes):
    """One row per runtime and IMAGE_SIZES entry: images/s and CPU use."""
    rows = []
    for runtime, image_size in itertools.product(runtimes, IMAGE_SIZES):
        load_before = os.getloadavg()[0]
        images_per_s, seconds, cpu_seconds, warmup_s = throughput(
            images, image_size, batch_size, runtime
        )
        rows.append({
            "runtime": runtime,
            "image_size": image_size,
            "images_per_s": round(images_per_s, 1),
            "ms_per_image": round(1000.0 / images_per_s, 2),
            "seconds": round(seconds, 2),
            # CPU-seconds this process got: with other jobs on the machine,
            # images per CPU-second is the steadier number.
            "process_cpu_s": round(cpu_seconds, 2),
            "images_per_cpu_s": round(len(images) / cpu_seconds, 1),
            "load_average_1min_before": round(load_before, 2),
            "num_images": len(images),
            "batch_size": batch_size,
            "warmup_s": round(warmup_s, 2),
        })
    return rows


def measure_cache(cache_rows):
    """Write and reload time of a cache_rows x 1280 float32 feature cache."""
    write_s, load_s, size = cache_reload(cache_rows, 1280)
    return {
        "rows": cache_rows,
        "feature_dim": 1280,
        "dtype": "float32",
        "file_bytes": size,
        "write_s": round(write_s, 2),
        "load_s": round(load_s, 2),
    }


def print_tables(rows, cache):
    print(
        "| backbone | runtime | image_size | images/s | ms/image |"
        " images/CPU-s | load avg | warm-up s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| efficientnet_lite0 | {row['runtime']} | {row['image_size']} | "
            f"{row['images_per_s']:.1f} | {row['ms_per_image']:.2f} | "
            f"{row['images_per_cpu_s']:.1f} | "
            f"{row['load_average_1min_before']:.1f} | "
            f"{row['warmup_s']:.1f} |"
        )
    print()
    print("| feature cache | rows x dim | MB | write s | load s |")
    print("|---|---|---:|---:|---:|")
    print(
        f"| load_or_compute | {cache['rows']} x 1280 float32 | "
        f"{cache['file_bytes'] / 1e6:.0f} | {cache['write_s']:.2f} | "
        f"{cache['load_s']:.2f} |"
    )


def main():
    args = parse_args()
    wall_start = time.perf_counter()
    images, image_note = load_images(args.num_images)
    rows = measure_throughput(
        images, args.batch_size, args.runtimes.split(",")
    )
    cache = measure_cache(args.cache_rows)
    print_tables(rows, cache)
    result = {
        "benchmark": "features",
        "git_sha": git_sha(),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "device": "CPU",
        "note": args.note,
        "images": image_note,
        "throughput": rows,
        "cache": cache,
        "wall_time_s": round(time.perf_counter() - wall_start, 1),
    }
    io_utils.write_json_atomic(args.output, result, sort_keys=False)


if __name__ == "__main__":
    main()
