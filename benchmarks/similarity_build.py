"""Time and peak memory of building each structured similarity matrix.

    python benchmarks/similarity_build.py --data_dir=../shared/data

Builds `knn`, `cluster`, `manifold` (C = 10), `manifold_auto` (no class
count, the count read from the kNN graph, runs over [C, 1.5 C]),
`multiscale` S (the ladder 2 ... 1024 clusters that N = 50,000 and
`similarity_cluster_size` = 40 give, 3 runs each) and `coassociation` (the
product recipe's S with its values from `config.PRODUCT_RECIPE`) on the
features of CIFAR-10's whole train part (50,000 images, the cached
EfficientNet-Lite0 features at 160 px), each in a fresh subprocess so its
peak resident memory is its own. Target (issue 10): <= 5 minutes and <= 2 GB
each. Writes benchmarks/results/similarity_build.json.
"""

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_env  # noqa: E402

from uhga_tf import config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("knn", "cluster", "manifold", "manifold_auto", "multiscale",
         "coassociation")
PARAMS = dict(similarity_knn=20, similarity_clusters=10, similarity_runs=10,
              similarity_dissimilar_quantile=0.3)
# The product recipe's manifold S: the count read from the kNN graph
# (modularity over 2 ... 64 candidate counts), runs spread over [C, 1.5 C].
MODE_PARAMS_AUTO = dict(similarity_clusters=0, similarity_cluster_span=1.5)


def _product_similarity(code_length=64):
    """The product recipe's S values, as an experiment at `code_length` (the
    64 bits of configs/cifar.flags) resolves them: `auto` becomes a number."""
    experiment = config.experiment_from_flat(
        {**config.PRODUCT_RECIPE, "code_length": code_length})
    return {key: getattr(experiment.similarity, key)
            for key in ("similarity_knn", "similarity_runs",
                        "similarity_cluster_size", "similarity_centring")}


# The multiscale ladders: no cluster count, 3 runs per scale
# (coassociation: the product recipe's values, read so they never go stale).
MODE_PARAMS = {"multiscale": dict(similarity_runs=3,
                                  similarity_cluster_size=40),
               "coassociation": _product_similarity(),
               "manifold_auto": MODE_PARAMS_AUTO}


def _train_part_features(data_dir):
    import numpy as np

    from uhga_tf.data import retrieval_sets

    experiment = config.experiment_from_flat(
        {"dataset": "cifar10", "split": "uhga", "image_size": 160,
         "data_dir": data_dir})
    sets = retrieval_sets.load_retrieval_sets(
        experiment.data, experiment.model, 0, progress=False)
    partition = np.asarray(sets.image_dataset.partition)
    rows, features = [], []
    for name in ("query", "database"):
        keep = partition[sets.indices[name]] == "train"
        rows.append(sets.indices[name][keep])
        features.append(sets.features[name][keep])
    order = np.argsort(np.concatenate(rows))
    return np.concatenate(features)[order]


def _child(mode, path):
    """Build one mode from the saved features; print JSON."""
    import numpy as np

    from uhga_tf.similarity import structured

    features = np.load(path)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    structure = structured.build_structured_similarity(
        features, similarity=mode.replace("_auto", ""), seed=0,
        **{**PARAMS, **MODE_PARAMS.get(mode, {})})
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "mode": mode, "n": len(features), "seconds": seconds,
        "peak_rss_mb": peak / 1024, "rss_before_build_mb": base_rss / 1024,
        "stored_mb": structure.nbytes / 1e6,
        "fractions": structure.fractions,
        "summary": structure.summary(),
        "commit": bench_env.git_sha(),
    }))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
        return
    data_dir = next(
        (a.split("=", 1)[1] for a in sys.argv[1:]
         if a.startswith("--data_dir=")),
        os.environ.get("UHGA_DATA_DIR", ""))
    import numpy as np

    from uhga_tf import io_utils

    features = _train_part_features(data_dir)
    path = "/tmp/uhga_similarity_build_features.npy"
    np.save(path, features)
    results = []
    modes = [a.split("=", 1)[1].split(",") for a in sys.argv[1:]
             if a.startswith("--modes=")]
    for mode in (modes[0] if modes else MODES):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, path],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        r = results[-1]
        print(f"{mode:>9}: N={r['n']} {r['seconds']:7.1f} s  peak RSS "
              f"{r['peak_rss_mb']:7.0f} MB (features loaded: "
              f"{r['rss_before_build_mb']:.0f} MB)  stored "
              f"{r['stored_mb']:.1f} MB")
    payload = {"results": results, "params": PARAMS,
               "mode_params": MODE_PARAMS,
               "command": "python benchmarks/similarity_build.py "
               + " ".join(sys.argv[1:]),
               "targets": {"seconds": 300, "peak_rss_mb": 2048},
               **bench_env.provenance()}
    out_path = os.path.join(HERE, "results", "similarity_build.json")
    if os.path.exists(out_path):
        # Modes not rerun (--modes=...) keep their stored rows.
        with open(out_path) as f:
            rerun = {r["mode"] for r in results}
            results[:0] = [r for r in json.load(f).get("results", [])
                           if r["mode"] not in rerun]
    io_utils.write_json_atomic(out_path, payload, indent=1)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
