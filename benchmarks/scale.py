r"""Scale: Beam encoding, sublinear search, in-place updates, a live page.

  python benchmarks/scale.py [--parts=beam,sublinear,update,live]
      [--n_images=12000] [--n_codes=10000000]

Expected wall time ~10 to 15 min on 2 cores (beam 1.5 min on an AVX-512
Xeon, about 7 on an AMD EPYC; sublinear ~5, update and live ~1). Beam
worker start-up costs seconds, so a small --n_images measures start-up
more than throughput (README, "More images than one machine"). Writes
benchmarks/results/scale.json (parts run are updated, the others kept).
Nothing is downloaded; images are written to a temporary folder from
/usr/share/datasets/fashion-mnist and deleted afterwards.

- beam: an EfficientNet-Lite0 (96 px) + seeded Dense(64) SavedModel;
  n_images Fashion-MNIST PNGs plus one bad file per 100 (three kinds).
  In-process `build_index(skip_corrupt=True)` against the DirectRunner with
  1 and 2 worker processes, wall time end to end (start-up included).
- sublinear: n_codes 64-bit codes = signs of a random projection of
  clustered Gaussian features (1,000 clusters), queries fresh from the same
  distribution; flat (exact) against ivf over nprobe, recall@100 against
  exact, also on the first 1M and 3M codes (the auto threshold).
- update: `add_items` of 10,000 codes to a saved 1M index with sources.
- live: the search page over that index while three updates land.
"""

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

from bench_env import provenance
from uhga_tf import io_utils
from uhga_tf import retrieval
from uhga_tf.retrieval import code_shards
from uhga_tf.retrieval.hamming_index import HammingIndex

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "scale.json")
FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
TOP_K = 100
CODE_LENGTH = 64


def export_model(root):
    import keras

    from uhga_tf import saved_model
    from uhga_tf.models import backbone

    keras.utils.set_random_seed(0)
    features = backbone.build_backbone("efficientnet_lite0", image_size=96)
    hasher = keras.Sequential([keras.Input((1280,)),
                               keras.layers.Dense(CODE_LENGTH)])
    return saved_model.export_saved_model(
        features, hasher, os.path.join(root, "models"), image_size=96)


def write_images(folder, n):
    """n Fashion-MNIST PNGs in 10 class folders + one bad file per 100."""
    from PIL import Image

    with gzip.open(FASHION) as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16)
    pixels = pixels.reshape(-1, 28, 28)[:n]
    bad = {}
    for i, image in enumerate(pixels):
        path = os.path.join(folder, f"c{i % 10}", f"{i:06d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(path)
        if i % 100 == 99:  # a bad file next to every 99 good ones
            kind = ("text", "cut", "bomb")[(i // 100) % 3]
            bad_path = path.replace(".png", f"_bad_{kind}.png")
            with open(path, "rb") as f:
                data = f.read()
            if kind == "text":
                data = b"this is not an image"
            elif kind == "cut":
                data = data[:60]
            else:  # a header claiming 100k x 100k pixels
                data = data[:16] + (100_000).to_bytes(4, "big") * 2 + data[24:]
            with open(bad_path, "wb") as f:
                f.write(data)
            bad[bad_path] = kind
    return bad


def bench_beam(n_images):
    from uhga_tf import encode_collection
    from uhga_tf.retrieval import beam_encode

    root = tempfile.mkdtemp(prefix="uhga_scale_")
    try:
        model_dir = export_model(root)
        images = os.path.join(root, "images")
        bad = write_images(images, n_images)
        start = time.perf_counter()
        index = retrieval.build_index(
            model_dir, os.path.join(root, "index"), images_dir=images,
            batch_size=64, progress=False, skip_corrupt=True)
        inprocess_s = time.perf_counter() - start
        runs = {}
        for workers in (1, 2):
            out = os.path.join(root, f"codes{workers}")
            config = beam_encode.CollectionConfig(
                model_dir, images, out, batch_size=64,
                beam_args=encode_collection.beam_args(
                    "DirectRunner", workers, ""),
                threads_per_worker=encode_collection.threads_per_worker(
                    "DirectRunner", workers, None))
            start = time.perf_counter()
            manifest = beam_encode.encode_collection(config)
            runs[workers] = (time.perf_counter() - start, out, manifest)
        return beam_report(index, inprocess_s, runs, bad, n_images)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def beam_report(index, inprocess_s, runs, bad, n_images):
    good = n_images
    result = {"n_images": good, "n_bad": len(bad),
              "inprocess_images_per_s": round(good / inprocess_s, 1)}
    agree, dead_exact = [], []
    for workers, (wall_s, out, manifest) in runs.items():
        packed, ids, _, _ = code_shards.read_code_shards(out)
        agree.append(np.array_equal(ids, index.ids)
                      and np.array_equal(packed, index.packed_codes))
        dead = code_shards.read_lines(code_shards.shard_paths(
            out, code_shards.DEAD_LETTER_PREFIX))
        reasons = {d["source"]: d["reason"] for d in dead}
        dead_exact.append(set(reasons) == set(bad) and all(reasons.values())
                          and manifest["count"] == good)
        result[f"beam_{workers}_workers_images_per_s"] = round(
            good / wall_s, 1)
        result[f"beam_{workers}_workers_wall_s"] = round(wall_s, 1)
        result[f"dead_letter_reasons_{workers}_workers"] = sorted({
            f"{bad[s]}: {r.replace(s, 'FILE')[:90]}"
            for s, r in reasons.items() if s in bad})
    result["beam_vs_inprocess_bit_agreement"] = float(np.mean(agree))
    result["dead_letter_exact"] = all(dead_exact)
    result["beam_over_inprocess_images_per_s"] = round(
        result["beam_2_workers_images_per_s"]
        / result["inprocess_images_per_s"], 3)
    return result


def clustered_codes(n, seed=0, chunk=1_000_000):
    """Signs of a fixed projection of 1,000 Gaussian clusters in 128-d."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, 128)).astype(np.float32)
    projection = rng.normal(size=(128, CODE_LENGTH)).astype(np.float32)
    out = np.empty((n, CODE_LENGTH // 8), np.uint8)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        features = centres[rng.integers(0, 1000, m)]
        features += rng.normal(scale=0.7, size=(m, 128)).astype(np.float32)
        out[start:start + m] = np.packbits(features @ projection >= 0, axis=1)
    return out


def timed_search(index, queries):
    start = time.perf_counter()
    ids, _ = index.search(queries, TOP_K)
    return ids, len(queries) / (time.perf_counter() - start)


def recall(exact, approx):
    return float(np.mean([len(np.intersect1d(a, b)) / TOP_K
                          for a, b in zip(exact, approx)]))


def sweep(packed, queries, nlist):
    """Flat against ivf at each nprobe on `packed`; one dict of figures."""
    n = len(packed)
    flat = HammingIndex(CODE_LENGTH)
    flat.add(packed, np.arange(n))
    exact, flat_qps = timed_search(flat, queries)
    flat._faiss_index = None  # free the flat copy before the lists
    start = time.perf_counter()
    flat.use_inverted_lists(nlist=nlist, nprobe=1)
    build_s = time.perf_counter() - start
    rows = []
    for nprobe in (1, 2, 4, 8, 16, 32):
        flat.nprobe = nprobe
        ids, qps = timed_search(flat, queries)
        rows.append({"nprobe": nprobe, "qps": round(qps, 1),
                     "recall_at_100": round(recall(exact, ids), 4),
                     "speedup": round(qps / flat_qps, 2)})
    ok = [r for r in rows if r["recall_at_100"] >= 0.95]
    return {
        "n_codes": n, "nlist": nlist, "flat_qps": round(flat_qps, 1),
        "ivf_build_s": round(build_s, 1), "sweep": rows,
        "speedup_at_recall95": max((r["speedup"] for r in ok), default=0),
        # The ivf index keeps no other copy of the codes.
        "ivf_bytes_over_code_bytes": round(
            flat._lists.nbytes / packed.nbytes, 3),
        "flat_bytes_over_code_bytes": 2.0,  # numpy codes + faiss copy
    }


def bench_sublinear(n_codes, n_queries=500):
    from uhga_tf.retrieval import inverted_lists

    start = time.perf_counter()
    packed = clustered_codes(n_codes + n_queries)
    queries, packed = packed[:n_queries], packed[n_queries:]
    gen_s = time.perf_counter() - start
    result = {"generate_s": round(gen_s, 1), "n_queries": n_queries}
    for n in (1_000_000, 3_000_000):  # where auto switches to ivf
        result[f"at_{n // 1_000_000}M"] = sweep(
            packed[:n], queries, inverted_lists.default_nlist(n))
    large = sweep(packed, queries, inverted_lists.default_nlist(n_codes))
    return {**result, "at_full": large,
            "sublinear_speedup_at_recall95": large["speedup_at_recall95"],
            "memory_over_code_bytes": large["ivf_bytes_over_code_bytes"]}


def saved_million(root, kind):
    packed = clustered_codes(1_010_000, seed=1)
    index = HammingIndex(CODE_LENGTH, info={"class_names": None})
    index.add(packed[:1_000_000], np.arange(1_000_000), metadata={
        "source": [f"photos/{i:07d}.jpg" for i in range(1_000_000)]})
    if kind == "ivf":
        index.use_inverted_lists()
    path = os.path.join(root, f"index_{kind}")
    index.save(path)
    return path, packed[1_000_000:]


def bench_update():
    root = tempfile.mkdtemp(prefix="uhga_scale_")
    try:
        result = {}
        for kind in ("flat", "ivf"):
            path, new = saved_million(root, kind)
            metadata = [{"source": f"new/{i}.jpg"} for i in range(len(new))]
            start = time.perf_counter()
            retrieval.add_items(path, new, metadata)
            result[f"add_10k_to_1M_{kind}_s"] = round(
                time.perf_counter() - start, 3)
            start = time.perf_counter()
            retrieval.remove_items(path, np.arange(1_000_000, 1_010_000))
            result[f"remove_10k_from_1M_{kind}_s"] = round(
                time.perf_counter() - start, 3)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def tiny_model(root):
    """A two-layer SavedModel: the live part only queries by id."""
    import keras

    from uhga_tf import saved_model

    keras.utils.set_random_seed(0)
    features = keras.Sequential([
        keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3),
        keras.layers.GlobalAveragePooling2D()])
    hasher = keras.Sequential([keras.Input((8,)),
                               keras.layers.Dense(CODE_LENGTH)])
    return saved_model.export_saved_model(
        features, hasher, os.path.join(root, "models"), image_size=32)


def query_loop(port, stop, latencies, failures, seed):
    import http.client

    rng = np.random.default_rng(seed)
    while not stop.is_set():
        item = int(rng.integers(0, 1_000_000))
        start = time.perf_counter()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port,
                                                    timeout=30)
            connection.request("GET", f"/api/search?id={item}&top_k=10")
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status != 200:
                failures.append(response.status)
        except OSError as e:
            failures.append(repr(e))
        latencies.append(time.perf_counter() - start)


def bench_live():
    from uhga_tf.retrieval import web

    root = tempfile.mkdtemp(prefix="uhga_scale_")
    try:
        path, new = saved_million(root, "flat")
        service = web.SearchService(
            path, model_dir=tiny_model(root),
            config=web.WebConfig(port=0, index_poll_s=0.2))
        server = web.SearchWebServer(service)
        port = server.start()
        stop, latencies, failures = threading.Event(), [], []
        threads = [threading.Thread(target=query_loop,
                                    args=(port, stop, latencies, failures, s))
                   for s in (0, 1)]
        for thread in threads:
            thread.start()
        sizes = []
        for update in ("add", "remove", "add"):
            time.sleep(3)
            if update == "add":
                retrieval.add_items(path, new, None)
            else:
                retrieval.remove_items(path, service.index.ids[-len(new):])
            deadline = time.monotonic() + 60
            target = HammingIndex.load(path).ids.size
            while len(service.index) != target and time.monotonic() < deadline:
                time.sleep(0.05)
            sizes.append(len(service.index))
        time.sleep(3)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        server.stop()
        latencies = np.asarray(latencies) * 1000
        return {"updates": 3, "sizes_seen": sizes,
                "reloads": service._live.reloads, "queries": len(latencies),
                "live_update_failed_queries": len(failures),
                "p50_ms": round(float(np.percentile(latencies, 50)), 1),
                "p99_ms": round(float(np.percentile(latencies, 99)), 1),
                "max_ms": round(float(latencies.max()), 1)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="beam,sublinear,update,live")
    parser.add_argument("--n_images", type=int, default=12000)
    parser.add_argument("--n_codes", type=int, default=10_000_000)
    args = parser.parse_args()
    results = {}
    if os.path.exists(OUT):
        with open(OUT) as f:
            results = json.load(f)
    for part in args.parts.split(","):
        start = time.perf_counter()
        if part == "beam":
            figures = bench_beam(args.n_images)
        elif part == "sublinear":
            figures = bench_sublinear(args.n_codes)
        elif part == "update":
            figures = bench_update()
        elif part == "live":
            figures = bench_live()
        else:
            sys.exit(f"unknown part {part!r}")
        figures["wall_s"] = round(time.perf_counter() - start, 1)
        figures.update(provenance())
        results[part] = figures
        print(f"| {part} | {json.dumps(figures)} |", flush=True)
        io_utils.write_json_atomic(OUT, results)


if __name__ == "__main__":
    main()
