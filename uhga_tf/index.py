r"""Build a Hamming index of an image folder or a dataset.

  python -m uhga_tf.index build --model=models/uhga/1 \
      --images=DIR | --dataset=NAME [--data_dir=...] --out=index/

Encodes every image with the SavedModel (raw bytes through
`serving_default` for files, `encode_images` for in-memory datasets), saves
codes, ids, sources and labels with `HammingIndex.save`, and prints the
index path and size.
"""

from absl import app
from absl import flags

from uhga_tf import cli_errors
from uhga_tf import retrieval

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "SavedModel directory (models/uhga/1).")
flags.DEFINE_string(
    "images", None, "Image folder (jpg/jpeg/png/gif/bmp, read recursively; "
    "class = sub-folder name when class-per-folder)."
)
flags.DEFINE_string("dataset", None, "Dataset name for load_dataset.")
flags.DEFINE_string("data_dir", None, "Dataset root for --dataset.")
flags.DEFINE_string("out", None, "Output index directory.")
flags.DEFINE_integer("batch_size", 64, "Images per encode call.",
                     lower_bound=1)
flags.DEFINE_bool("progress", True, "Show a progress bar (--noprogress).")
flags.DEFINE_bool("skip_corrupt", False,
                  "Skip undecodable images instead of failing.")
flags.DEFINE_integer("max_image_pixels", 4096 * 4096,
                     "Largest width * height an image may decode to (every "
                     "GIF frame counted); larger ones are refused.",
                     lower_bound=1)
flags.mark_flags_as_required(["model", "out"])
flags.register_multi_flags_validator(
    ["images", "dataset"],
    lambda f: (f["images"] is None) != (f["dataset"] is None),
    message="give exactly one of --images and --dataset",
)


def main(argv):
    if argv[1:] != ["build"]:
        raise app.UsageError(
            f"expected the command 'build'; received {argv[1:]}"
        )
    index = retrieval.build_index(
        FLAGS.model,
        FLAGS.out,
        images_dir=FLAGS.images,
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        batch_size=FLAGS.batch_size,
        progress=FLAGS.progress,
        skip_corrupt=FLAGS.skip_corrupt,
        max_image_pixels=FLAGS.max_image_pixels,
    )
    print(f"{FLAGS.out}\t{len(index)} items\t{index.code_length} bits")


if __name__ == "__main__":
    cli_errors.app_run("index", main, outputs=lambda: [FLAGS.out])
