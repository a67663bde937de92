r"""Export a training workdir as a versioned SavedModel.

  python -m uhga_tf.export --checkpoint=workdirs/cifar_64 \
      --export_dir=models/uhga [--version=N] [--warmup_images=a.jpg,b.png]

Writes `<export_dir>/<version>/` (next integer when --version is omitted;
an existing version is never overwritten), verified by reloading, and prints
its path.
"""

from absl import app
from absl import flags

from uhga_tf import cli_errors
from uhga_tf import saved_model

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "checkpoint", None, "Training workdir with config.json and hasher.keras."
)
flags.DEFINE_string(
    "export_dir", None, "Base path; the model goes to <export_dir>/<version>."
)
flags.DEFINE_integer(
    "version", None, "Version number; default newest + 1.", lower_bound=1
)
flags.DEFINE_list(
    "warmup_images",
    [],
    "Encoded images for the warm-up records; default seeded synthetic ones.",
)
flags.DEFINE_string(
    "model_name",
    saved_model.DEFAULT_MODEL_NAME,
    "Model name written into the warm-up requests.",
)
flags.mark_flags_as_required(["checkpoint", "export_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    warmup_images = None
    if FLAGS.warmup_images:
        warmup_images = []
        for path in FLAGS.warmup_images:
            with open(path, "rb") as f:
                warmup_images.append(f.read())
    path = saved_model.export_from_checkpoint(
        FLAGS.checkpoint,
        FLAGS.export_dir,
        version=FLAGS.version,
        warmup_images=warmup_images,
        model_name=FLAGS.model_name,
    )
    print(path)


if __name__ == "__main__":
    cli_errors.app_run(
        "export", main, outputs=lambda: [FLAGS.export_dir]
    )
