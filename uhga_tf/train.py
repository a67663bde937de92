"""Train UHGA: `python -m uhga_tf.train --flagfile=configs/cifar.flags`.

Every field of `uhga_tf.config` is a flag of the same name; a flag file sets
only what differs from the defaults. The resolved config is written to
`<workdir>/config.json`, and a rerun of the same command resumes from the
newest complete checkpoint. The console shows the progress bar, the INFO
lines that matter and warnings; `--verbosity=0` (or UHGA_VERBOSE=1) shows
TensorFlow's and the libraries' INFO lines too (`uhga_tf.console`).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from uhga_tf import cli_errors  # noqa: E402
from uhga_tf import config  # noqa: E402
from uhga_tf import console  # noqa: E402
from uhga_tf import flags_util  # noqa: E402

flags_util.define_config_flags()
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir = []

    def run():
        experiment = config.experiment_from_flat(flags_util.config_values())
        workdir.append(experiment.workdir)
        console.configure(verbose=console.verbose_requested(FLAGS))
        # Imported late so that flag errors never pay for TensorFlow.
        from uhga_tf.training import run as run_lib

        return run_lib.run_experiment(experiment)

    result = flags_util.exit_on_user_error("train", run)
    results_path = os.path.join(workdir[0], "results.json")
    if result.get("labelled") is False:
        from uhga_tf import codes

        print(
            f"unlabelled collection ({result['method']}, "
            f"{result['code_length']} bits): no MAP without labels; "
            f"{result['num_database']} database codes, "
            f"{codes.describe_code_statistics(result)}"
            f"   results: {results_path}"
        )
        return
    references = [
        f"{name} {result[key]:.4f}"
        for name, key in (("ITQ (unit rows, tie-aware)", "itq_map"),
                          ("cosine ranking (centred)", "cosine_map_centred"))
        if result.get(key) is not None
    ]
    headline = result.get("map_tie_aware")
    print(
        f"MAP@ALL query/database ({result['method']}, "
        f"{result['code_length']} bits): "
        + (f"{headline:.4f} tie-aware ({result['map']:.4f} with ties by "
           "database order)" if headline is not None
           else f"{result['map']:.4f}")
        + (f"   same split: {', '.join(references)}" if references else "")
        + f"   results: {results_path}"
    )


if __name__ == "__main__":
    cli_errors.app_run("train", main)
