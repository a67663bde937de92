"""MAP vs step and vs wall time for Ours and Ours+GA (same seed, same features).

    python benchmarks/convergence.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --epochs=30

Trains both rows of method.md §14 with validation MAP every epoch (validation
queries from database minus train, never the reported query set), then
reports the step and the training time at which Ours+GA first reaches Ours'
final validation MAP: the paper's claim is that gradient attention learns
faster. Writes benchmarks/results/convergence.json and convergence.png.
"""

import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from uhga_tf import config  # noqa: E402
from uhga_tf import flags_util  # noqa: E402

flags_util.define_config_flags()
flags.DEFINE_string("out_dir", "benchmarks/results", "Where to write results.")
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


def main(argv):
    del argv
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf

    from uhga_tf.data import retrieval_sets
    from uhga_tf.training import run as run_lib

    base = flags_util.config_values()
    base.update(eval_every_epochs=1, progress=False)
    experiment = config.experiment_from_flat(base)
    sets = retrieval_sets.load_retrieval_sets(
        experiment.data, experiment.model, experiment.train.seed)
    tag = f"{experiment.data.dataset}_{experiment.model.code_length}"
    curves, finals = {}, {}
    for method, attention in (("Ours", False), ("Ours+GA", True)):
        workdir = os.path.join("runs", f"convergence_{tag}_{method}")
        if os.path.exists(workdir):
            import shutil

            shutil.rmtree(workdir)
        cfg = config.experiment_from_flat(
            {**base, "attention": attention, "workdir": workdir})
        start = time.time()
        result = run_lib.run_experiment(cfg, sets=sets)
        curves[method] = _curve(workdir)
        curves[method]["wall_time_s"] = time.time() - start
        finals[method] = result["map"]

    target = curves["Ours"]["validation_map"][-1]
    ga = curves["Ours+GA"]
    reached = next(
        (i for i, m in enumerate(ga["validation_map"]) if m >= target), None)
    summary = {
        "ours_final_validation_map": target,
        "ga_final_validation_map": ga["validation_map"][-1],
        "ours_final_query_map": finals["Ours"],
        "ga_final_query_map": finals["Ours+GA"],
        "ga_reaches_ours_final_at_step": (
            None if reached is None else ga["step"][reached]),
        "ga_reaches_ours_final_at_train_seconds": (
            None if reached is None else ga["train_seconds"][reached]),
        "ours_total_steps": curves["Ours"]["step"][-1],
        "ours_train_seconds": curves["Ours"]["train_seconds"][-1],
    }
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
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(os.path.join(FLAGS.out_dir, "convergence.json"), "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, curve in curves.items():
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
    fig.savefig(os.path.join(FLAGS.out_dir, "convergence.png"), dpi=100)

    print("| quantity | value |\n|---|---|")
    for key, value in summary.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    app.run(main)
