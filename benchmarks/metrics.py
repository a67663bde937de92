"""MAP@ALL speed: our batched metrics against a per-query sort reference.

    OPENBLAS_NUM_THREADS=1 python benchmarks/metrics.py [--flagfile=...]

(one BLAS thread keeps the reference's per-query matrix-vector products
from spinning idle threads on a loaded machine, which would flatter us).

Random codes (10,000 queries x 50,000 database items at 64 bits, 10 classes
by default). The reference is written the way common hashing toolkits do it
(DeepHash-pytorch `CalcTopMap`, HashNet/GA `mean_average_precision`), but
with the stable tie rule: per query `np.argsort(dist, kind="stable")`, then
cumulative precision over the relevant positions. Our exact MAP must equal it
bit for bit; the tie-aware MAP is reported next to it. Writes
benchmarks/results/metrics.json and prints a Markdown table. Never run under
pytest.
"""

import os
import platform
import sys
import time
import tracemalloc

import numpy as np
from absl import app
from absl import flags

from uhga_tf import io_utils
from uhga_tf.evaluation import metrics
from bench_env import git_sha

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_query", 10000, "Number of query codes.")
flags.DEFINE_integer("num_database", 50000, "Number of database codes.")
flags.DEFINE_integer("code_length", 64, "Bits per code.")
flags.DEFINE_integer("num_classes", 10, "Balanced random class labels.")
flags.DEFINE_integer("seed", 0, "Seed of the random codes and labels.")
flags.DEFINE_string(
    "out",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                 "metrics.json"),
    "Where to write the results JSON.",
)


def reference_map(query_codes, database_codes, query_labels,
                  database_labels):
    """Toolkit-style MAP@ALL: one stable argsort per query."""
    code_length = query_codes.shape[1]
    query_float = query_codes.astype(np.float32)
    database_float = database_codes.astype(np.float32)
    average_precisions = []
    for i in range(query_codes.shape[0]):
        relevant = (database_labels == query_labels[i]).astype(np.float32)
        hamming = 0.5 * (code_length - database_float @ query_float[i])
        order = np.argsort(hamming, kind="stable")
        relevant = relevant[order]
        total = int(relevant.sum())
        if total == 0:
            average_precisions.append(0.0)
            continue
        count = np.linspace(1, total, total)
        positions = np.flatnonzero(relevant == 1) + 1.0
        average_precisions.append(np.sum(count / positions) / total)
    return float(np.mean(np.asarray(average_precisions)))


def _timed(fn, *args, **kwargs):
    """(value, wall seconds, CPU seconds of this process)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return (value, time.perf_counter() - start,
            time.process_time() - cpu_start)


def _peak_mb(fn, *args, **kwargs):
    tracemalloc.start()
    fn(*args, **kwargs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def random_data():
    """Seeded random +-1 codes and balanced shuffled labels."""
    rng = np.random.default_rng(FLAGS.seed)
    shape_q = (FLAGS.num_query, FLAGS.code_length)
    shape_d = (FLAGS.num_database, FLAGS.code_length)
    query_codes = np.where(rng.random(shape_q) < 0.5, -1, 1).astype(np.int8)
    database_codes = np.where(rng.random(shape_d) < 0.5, -1, 1).astype(
        np.int8)
    query_labels = np.arange(FLAGS.num_query) % FLAGS.num_classes
    database_labels = np.arange(FLAGS.num_database) % FLAGS.num_classes
    rng.shuffle(query_labels)
    rng.shuffle(database_labels)
    return query_codes, database_codes, query_labels, database_labels


def measure(data):
    """Time, CPU time and peak memory of the three MAP implementations."""
    wall_start = time.perf_counter()
    measured = {}
    for name, fn in (("exact", metrics.mean_average_precision),
                     ("tie_aware", metrics.tie_aware_map),
                     ("reference", reference_map)):
        measured[name] = _timed(fn, *data)
    measured["peak_exact"] = _peak_mb(metrics.mean_average_precision, *data)
    measured["peak_tie_aware"] = _peak_mb(metrics.tie_aware_map, *data)
    measured["wall_seconds"] = time.perf_counter() - wall_start
    return measured


def summarise(measured):
    """The result JSON: MAPs, times, speedups over the reference, memory."""
    map_exact, seconds_exact, cpu_exact = measured["exact"]
    map_tie_aware, seconds_tie_aware, cpu_tie_aware = measured["tie_aware"]
    map_reference, seconds_reference, cpu_reference = measured["reference"]
    return {
        "map": map_exact,
        "map_reference": map_reference,
        "map_equal": map_exact == map_reference,
        "map_abs_diff": abs(map_exact - map_reference),
        "map_tie_aware": map_tie_aware,
        "seconds_exact": seconds_exact,
        "seconds_tie_aware": seconds_tie_aware,
        "seconds_reference": seconds_reference,
        "speedup": seconds_reference / seconds_exact,
        "speedup_tie_aware": seconds_reference / seconds_tie_aware,
        "cpu_seconds_exact": cpu_exact,
        "cpu_seconds_tie_aware": cpu_tie_aware,
        "cpu_seconds_reference": cpu_reference,
        "cpu_speedup": cpu_reference / cpu_exact,
        "cpu_speedup_tie_aware": cpu_reference / cpu_tie_aware,
        "load_average": os.getloadavg(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "peak_memory_mb_exact": measured["peak_exact"],
        "peak_memory_mb_tie_aware": measured["peak_tie_aware"],
        "config": {
            "num_query": FLAGS.num_query,
            "num_database": FLAGS.num_database,
            "code_length": FLAGS.code_length,
            "num_classes": FLAGS.num_classes,
            "seed": FLAGS.seed,
        },
        "git_sha": git_sha(),
        "cpu_count": os.cpu_count(),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "device": platform.processor() or platform.machine(),
        "wall_seconds": measured["wall_seconds"],
        "note": "shared machine: other jobs ran concurrently on its cores",
    }


def print_table(result):
    print(f"MAP@ALL, {FLAGS.num_query} queries x {FLAGS.num_database} "
          f"database, {FLAGS.code_length} bits, {FLAGS.num_classes} classes\n")
    print("| method | MAP | wall s | speedup | CPU s | CPU speedup | "
          "peak MiB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| exact (stable counting sort) | {result['map']:.10f} | "
          f"{result['seconds_exact']:.2f} | {result['speedup']:.1f}x | "
          f"{result['cpu_seconds_exact']:.2f} | "
          f"{result['cpu_speedup']:.1f}x | "
          f"{result['peak_memory_mb_exact']:.0f} |")
    print(f"| tie-aware (histograms) | {result['map_tie_aware']:.10f} | "
          f"{result['seconds_tie_aware']:.2f} | "
          f"{result['speedup_tie_aware']:.1f}x | "
          f"{result['cpu_seconds_tie_aware']:.2f} | "
          f"{result['cpu_speedup_tie_aware']:.1f}x | "
          f"{result['peak_memory_mb_tie_aware']:.0f} |")
    print(f"| reference (per-query argsort) | "
          f"{result['map_reference']:.10f} | "
          f"{result['seconds_reference']:.2f} | 1.0x | "
          f"{result['cpu_seconds_reference']:.2f} | 1.0x | - |")
    print(f"\nexact == reference: {result['map_equal']}")


def main(argv):
    del argv
    result = summarise(measure(random_data()))
    io_utils.write_json_atomic(FLAGS.out, result, indent=1)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
