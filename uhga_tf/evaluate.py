"""Evaluate codes: `python -m uhga_tf.evaluate --checkpoint=WORKDIR`.

Codes come from a training workdir (`--checkpoint`), an exported SavedModel
(`--saved_model`, its `encode_features` signature) or a shallow baseline
(`--baseline=itq` fitted on the train split). Writes metrics.json, pr.png and
precision_at_n.png to `--out` and prints a one-line summary.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from uhga_tf import cli_errors  # noqa: E402
from uhga_tf import config  # noqa: E402
from uhga_tf import flags_util  # noqa: E402

flags_util.define_config_flags()
flags.DEFINE_string("checkpoint", "", "Training workdir to evaluate.")
flags.DEFINE_string("saved_model", "", "SavedModel version directory.")
flags.DEFINE_string("baseline", "", "Shallow baseline: lsh, sh, sph, itq, "
                    "dsh or pcah.")
flags.DEFINE_string("out", "eval", "Output folder.")
FLAGS = flags.FLAGS


def _evaluate():
    from uhga_tf import tables
    from uhga_tf.data import retrieval_sets
    from uhga_tf.evaluation import plots

    chosen = [n for n in ("checkpoint", "saved_model", "baseline")
              if FLAGS[n].value]
    if len(chosen) != 1:
        raise ValueError(
            "give exactly one of --checkpoint, --saved_model, --baseline; "
            f"received {chosen or 'none'}"
        )
    if FLAGS.checkpoint:
        experiment = config.load_experiment(FLAGS.checkpoint)
        name = f"UHGA ({FLAGS.checkpoint})"
    else:
        experiment = config.experiment_from_flat(flags_util.config_values())
        name = FLAGS.baseline.upper() or f"SavedModel ({FLAGS.saved_model})"
    sets = retrieval_sets.load_retrieval_sets(
        experiment.data, experiment.model, experiment.train.seed,
        progress=experiment.progress,
    )
    if FLAGS.checkpoint:
        query, database = tables.workdir_codes(FLAGS.checkpoint, sets)
    elif FLAGS.saved_model:
        query, database = tables.saved_model_codes(FLAGS.saved_model, sets)
    else:
        method = {v: k for k, v in tables.SHALLOW_METHODS.items()}.get(
            FLAGS.baseline.lower())
        if method is None:
            choices = sorted(tables.SHALLOW_METHODS.values())
            raise ValueError(
                f"baseline must be one of {choices}; received "
                f"baseline={FLAGS.baseline!r}"
            )
        query, database = tables.shallow_codes(
            method, experiment.model.code_length, sets,
            experiment.train.seed)
    result = tables.evaluate_method(query, database, sets, experiment.eval)
    result["method"] = name
    result["data"] = sets.description
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True, default=float)
    plots.plot_pr_curves({name: result["pr_curve"]},
                         os.path.join(FLAGS.out, "pr.png"))
    plots.plot_precision_at_n({name: result["precision_at_n"]},
                              os.path.join(FLAGS.out, "precision_at_n.png"))
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = _evaluate()
    print(
        f"{result['method']}: MAP {result['map']:.4f}, tie-aware MAP "
        f"{result['map_tie_aware']:.4f}, P@H<=2 "
        f"{result['precision_radius']:.4f}, {result['code_length']} bits, "
        f"{result['num_query']} queries x {result['num_database']} database"
    )


if __name__ == "__main__":
    cli_errors.app_run("evaluate", main, outputs=lambda: [FLAGS.out])
