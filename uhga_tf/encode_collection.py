r"""Encode a whole image collection into code shards with Apache Beam.

  python -m uhga_tf.encode_collection --model=models/uhga/1 \
      --images=DIR_OR_GLOB --out=codes/ [--num_workers=2]
  python -m uhga_tf.encode_collection --model=... --images=... --out=... \
      --runner=FlinkRunner \
      --beam_options="--flink_master=HOST:8081 --environment_type=LOOPBACK"

The default runner is Beam's DirectRunner with --num_workers local
processes; any other runner takes its options from --beam_options. Writes
`codes-*.jsonl` and `dead_letter-*.jsonl` shards and `manifest.json` (see
`uhga_tf.retrieval.code_shards`), then prints the counts. Build an index
from them with `python -m uhga_tf.index build --from_codes=codes/`.
Needs the `beam` extra: pip install -e ".[beam]".
"""

import os
import shlex

from absl import app
from absl import flags

from uhga_tf import cli_errors
from uhga_tf.data import image_header

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "SavedModel directory (models/uhga/1).")
flags.DEFINE_string("images", None, "Image folder or glob.")
flags.DEFINE_string("out", None, "Output codes directory.")
flags.DEFINE_integer("batch_size", 64, "Images per encode call.",
                     lower_bound=1)
flags.DEFINE_string("runner", "DirectRunner", "Beam runner.")
flags.DEFINE_integer("num_workers", 2,
                     "DirectRunner: local worker processes.", lower_bound=1)
flags.DEFINE_integer("threads_per_worker", None,
                     "TensorFlow threads per worker; default: the cores split "
                     "among --num_workers (DirectRunner), else TF's own.",
                     lower_bound=1)
flags.DEFINE_integer("max_image_pixels",
                     image_header.COLLECTION_MAX_IMAGE_PIXELS,
                     "Largest width * height an image may decode to (every "
                     "GIF frame counted); larger ones become dead letters.",
                     lower_bound=1)
flags.DEFINE_string("beam_options", "",
                    "Further Beam pipeline options, one shell-quoted string.")
flags.mark_flags_as_required(["model", "images", "out"])


def beam_args(runner, num_workers, beam_options):
    """The pipeline options list for `CollectionConfig.beam_args`."""
    args = [f"--runner={runner}"]
    if runner == "DirectRunner":
        args += [
            f"--direct_num_workers={num_workers}",
            # Processes, not threads: TF and image decoding hold the GIL
            # in places, and each process loads its own model.
            "--direct_running_mode="
            + ("multi_processing" if num_workers > 1 else "in_memory"),
        ]
    return tuple(args + shlex.split(beam_options))


def threads_per_worker(runner, num_workers, threads):
    """TF threads per worker: split this machine's cores among local
    DirectRunner processes, which would otherwise each take all of them."""
    if threads is not None:
        return threads
    if runner == "DirectRunner" and num_workers > 1:
        return max(1, (os.cpu_count() or 1) // num_workers)
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
        from uhga_tf.retrieval import beam_encode
    except ImportError as e:
        raise ValueError(
            f"encode_collection needs Apache Beam ({e}); install the beam "
            'extra: pip install -e ".[beam]"'
        ) from e
    config = beam_encode.CollectionConfig(
        model_dir=FLAGS.model,
        images=FLAGS.images,
        out_dir=FLAGS.out,
        batch_size=FLAGS.batch_size,
        beam_args=beam_args(FLAGS.runner, FLAGS.num_workers,
                            FLAGS.beam_options),
        threads_per_worker=threads_per_worker(
            FLAGS.runner, FLAGS.num_workers, FLAGS.threads_per_worker),
        max_image_pixels=FLAGS.max_image_pixels,
    )
    manifest = beam_encode.encode_collection(config)
    print(f"{FLAGS.out}\t{manifest['count']} codes\t"
          f"{manifest['dead_letter_count']} dead letters\t"
          f"{manifest['code_length']} bits")


if __name__ == "__main__":
    cli_errors.app_run("encode_collection", main)
