"""MAP vs step and vs wall time for Ours and Ours+GA (same seed, same features).

    python benchmarks/convergence.py --flagfile=configs/paper/cifar.flags \
        --data_dir=../shared/data --epochs=30
    python benchmarks/convergence.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --seeds=3 --name=convergence_product

Trains both rows of method.md §14 with validation MAP every epoch (validation
queries from database minus train, never the reported query set), then
reports the step and the training time at which Ours+GA first reaches Ours'
final validation MAP: the paper's claim is that gradient attention learns
faster. With --seeds, every seed trains both rows; per seed it also reports
the step and training time at which each row first comes within TOLERANCE
of its own final validation MAP. Writes benchmarks/results/<name>.json and
<name>.png (curves of seed 0).
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from uhga_tf import config  # noqa: E402
from uhga_tf import flags_util  # noqa: E402
from uhga_tf import io_utils  # noqa: E402

flags_util.define_config_flags()
flags.DEFINE_string("out_dir", "benchmarks/results", "Where to write results.")
flags.DEFINE_integer("seeds", 1, "Training seeds (0 .. seeds-1).")
flags.DEFINE_string("name", "convergence", "Output name (.json, .png).")
# A method "reaches its final MAP" at the first evaluation within this much
# of the validation MAP it ends with.
TOLERANCE = 0.005
FLAGS = flags.FLAGS


def _curve(workdir):
    steps, seconds, maps = [], [], []
    elapsed = 0.0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            elapsed += record["epoch_time_s"]
            if "validation_map" in record:
                steps.append(record["step"])
                seconds.append(elapsed)
                maps.append(record["validation_map"])
    return {"step": steps, "train_seconds": seconds, "validation_map": maps}


def _seed_summary(seed_curves):
    """Final validation MAP, and step/seconds to reach it, per method."""
    out = {}
    for method, curve in seed_curves.items():
        maps = curve["validation_map"]
        final = maps[-1]
        i = next(j for j, m in enumerate(maps) if m >= final - TOLERANCE)
        key = "ga" if method.endswith("GA") else "ours"
        out[f"{key}_final_validation_map"] = final
        out[f"{key}_query_map"] = curve["query_map"]
        out[f"{key}_steps_to_final"] = curve["step"][i]
        out[f"{key}_seconds_to_final"] = curve["train_seconds"][i]
        out[f"{key}_train_seconds"] = curve["train_seconds"][-1]
    out["ga_minus_ours_validation"] = (
        out["ga_final_validation_map"] - out["ours_final_validation_map"])
    return out


def _train_both(base, sets, tag, seed):
    """Train Ours and Ours+GA with one seed; return {method: curve}."""
    from uhga_tf.training import run as run_lib

    seed_curves = {}
    for method, attention in (("Ours", False), ("Ours+GA", True)):
        workdir = os.path.join("runs", f"convergence_{tag}_{method}_s{seed}")
        if os.path.exists(workdir):
            shutil.rmtree(workdir)
        cfg = config.experiment_from_flat(
            {**base, "attention": attention, "workdir": workdir,
             "seed": seed})
        start = time.time()
        result = run_lib.run_experiment(cfg, sets=sets)
        curve = _curve(workdir)
        curve["wall_time_s"] = time.time() - start
        curve["query_map"] = result["map"]
        seed_curves[method] = curve
    return seed_curves


def _summary(curves, per_seed):
    """Seed means and when seed 0's Ours+GA reaches Ours' final MAP."""
    first = curves["s0"]
    target = first["Ours"]["validation_map"][-1]
    finals = {m: first[m]["query_map"] for m in first}
    ga = first["Ours+GA"]
    reached = next(
        (i for i, m in enumerate(ga["validation_map"]) if m >= target), None)
    return {
        "seeds": FLAGS.seeds,
        "tolerance": TOLERANCE,
        "per_seed": per_seed,
        "mean": {
            key: float(np.mean([s[key] for s in per_seed]))
            for key in per_seed[0]
            if all(s[key] is not None for s in per_seed)
        },
        "ours_final_validation_map": target,
        "ga_final_validation_map": ga["validation_map"][-1],
        "ours_final_query_map": finals["Ours"],
        "ga_final_query_map": finals["Ours+GA"],
        "ga_reaches_ours_final_at_step": (
            None if reached is None else ga["step"][reached]),
        "ga_reaches_ours_final_at_train_seconds": (
            None if reached is None else ga["train_seconds"][reached]),
        "ours_total_steps": first["Ours"]["step"][-1],
        "ours_train_seconds": first["Ours"]["train_seconds"][-1],
    }


def _plot(first, target, tag, path):
    """Validation MAP vs step and vs training time of seed 0, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, curve in first.items():
        axes[0].plot(curve["step"], curve["validation_map"], label=method)
        axes[1].plot(curve["train_seconds"], curve["validation_map"],
                     label=method)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel("validation MAP@ALL")
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{tag} bits: Ours vs Ours+GA")
    fig.tight_layout()
    with io_utils.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    import tensorflow as tf

    from uhga_tf.data import retrieval_sets

    base = flags_util.config_values()
    base.update(eval_every_epochs=1, progress=False)
    experiment = config.experiment_from_flat(base)
    sets = retrieval_sets.load_retrieval_sets(
        experiment.data, experiment.model, experiment.train.seed)
    tag = f"{experiment.data.dataset}_{experiment.model.code_length}"
    curves, per_seed = {}, []
    for seed in range(FLAGS.seeds):
        seed_curves = _train_both(base, sets, tag, seed)
        per_seed.append(_seed_summary(seed_curves))
        curves[f"s{seed}"] = seed_curves
    summary = _summary(curves, per_seed)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    payload = {
        "summary": summary, "curves": curves,
        "config": experiment.to_dict(), "data": sets.description,
        "git_sha": sha, "tensorflow": tf.__version__,
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "load_average_at_end": os.getloadavg(),
        "command": "python benchmarks/convergence.py " + " ".join(
            sys.argv[1:]),
    }
    out = os.path.join(FLAGS.out_dir, FLAGS.name)
    io_utils.write_json_atomic(out + ".json", payload, indent=1)
    _plot(curves["s0"], summary["ours_final_validation_map"], tag,
          out + ".png")

    print("| quantity | value |\n|---|---|")
    for key, value in summary.items():
        if key not in ("per_seed",):
            print(f"| {key} | {value} |")


if __name__ == "__main__":
    app.run(main)
