"""Regenerate the paper's tables: `python -m uhga_tf.reproduce --table=3`.

Runs every cell of Table 1 (similarity_lambda sweep of Ours+GA), Table 2
(GA ablation) or Table 3 (comparison with the shallow baselines) on one set
of cached features and writes docs/results/<dataset>_table<N>.{md,json,png}.
Finished cells are stored and skipped on rerun. Other flags are the training
config's (e.g. `--flagfile=configs/cifar.flags --epochs=20`).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from uhga_tf import cli_errors  # noqa: E402
from uhga_tf import config  # noqa: E402
from uhga_tf import flags_util  # noqa: E402

flags_util.define_config_flags()
flags.DEFINE_integer("table", None, "1, 2 or 3.")
flags.DEFINE_list("code_lengths", ["16", "32", "64", "128"], "Code lengths.")
flags.DEFINE_integer("seeds", 1, "Seeds per cell (0 .. seeds-1).")
flags.DEFINE_list("methods", [], "Rows to run (default: the table's).")
flags.DEFINE_string("results_dir", "docs/results", "Output folder.")
flags.mark_flag_as_required("table")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    def run():
        from uhga_tf import tables

        if FLAGS.seeds < 1:
            raise ValueError(f"seeds must be >= 1; received {FLAGS.seeds}")
        code_lengths = []
        for text in FLAGS.code_lengths:
            try:
                code_lengths.append(int(text))
            except ValueError as e:
                raise ValueError(
                    f"code_lengths must be integers; received {text!r}"
                ) from e
        experiment = config.experiment_from_flat(
            {**flags_util.config_values(), "code_length": code_lengths[0]})
        return tables.reproduce_table(
            FLAGS.table, experiment, code_lengths, FLAGS.seeds,
            FLAGS.results_dir, methods=FLAGS.methods or None,
            command="python -m uhga_tf.reproduce " + " ".join(sys.argv[1:]),
            progress=experiment.progress,
        )

    markdown, _ = flags_util.exit_on_user_error("reproduce", run)
    print(markdown)


if __name__ == "__main__":
    cli_errors.app_run("reproduce", main)
