r"""Fit a closed-form reference and write it as a workdir to export and serve.

  python -m uhga_tf.fit_reference --flagfile=configs/cifar.flags \
      --data_dir=../shared/data --workdir=runs/kmeans_ls_64 \
      [--reference="k-means+LS (k=10)"]
  python -m uhga_tf.export --checkpoint=runs/kmeans_ls_64 \
      --export_dir=models/kmeans_ls

The same flags as `uhga_tf.train` choose the data, backbone, image size,
code length and seed (training flags are ignored). The workdir gets
config.json, hasher.keras (the reference's linear map as a Keras hasher) and
reference.json (its settings and validation metrics). k-means+LS (k=10) is
what the product's hash layer starts from, and in the README's tables it
beats the learned codes at 16 bits.
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
flags.DEFINE_string(
    "reference", "k-means+LS (k=10)",
    "A reference of the README's tables with a linear map (ITQ variants, "
    "Spectral+ITQ, k-means+LS).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    def run():
        experiment = config.experiment_from_flat(flags_util.config_values())
        console.configure(verbose=console.verbose_requested(FLAGS))
        from uhga_tf.baselines import reference_workdir

        return experiment.workdir, reference_workdir.fit_reference_workdir(
            experiment, FLAGS.reference)

    workdir, result = flags_util.exit_on_user_error("fit_reference", run)
    metrics = ", ".join(
        f"{label} {result[key]:.4f}"
        for label, key in (("MAP@ALL (tie-aware)", "validation_map"),
                           ("MAP@1000", "validation_map_1000"),
                           ("P@100", "validation_p_100"))
        if result.get(key) is not None
    )
    if result.get("labelled") is False:
        from uhga_tf import codes

        metrics = ("no MAP without labels; database codes: "
                   + codes.describe_code_statistics(result))
    else:
        metrics = "validation: " + metrics
    print(
        f"{result['method']}, {result['code_length']} bits, "
        f"{metrics}; database bits equal to the reference's float64 codes: "
        f"{result['bit_agreement_with_reference']:.6f}   workdir: {workdir} "
        f"(export: python -m uhga_tf.export --checkpoint={workdir} "
        "--export_dir=...)"
    )


if __name__ == "__main__":
    cli_errors.app_run("fit_reference", main)
