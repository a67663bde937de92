r"""Build or update a persisted Hamming index.

  python -m uhga_tf.index build --model=models/uhga/1 \
      --images=DIR | --dataset=NAME [--data_dir=...] --out=index/ \
      [--kind=flat|ivf|auto --nlist=N --nprobe=M]
  python -m uhga_tf.index build --from_codes=codes/ --out=index/ [--kind=...]
  python -m uhga_tf.index add --out=index/ --from_codes=codes/
  python -m uhga_tf.index add --out=index/ --model=models/uhga/1 --images=DIR
  python -m uhga_tf.index remove --out=index/ --ids=3,17,42

`build` encodes every image with the SavedModel (raw bytes through
`serving_default` for files, `encode_images` for in-memory datasets), or
reads the shards of `uhga_tf.encode_collection`, and saves codes, ids,
sources and labels with `HammingIndex.save`. `add` appends items with ids
after the largest one; `remove` drops ids. Updates replace the index file
atomically: a crash leaves the previous index readable, and a running
search page picks up the new one. Prints the index path and size.
"""

from absl import app
from absl import flags

from uhga_tf import cli_errors
from uhga_tf import retrieval
from uhga_tf.data import image_header

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "SavedModel directory (models/uhga/1).")
flags.DEFINE_string(
    "images", None, "Image folder (jpg/jpeg/png/gif/bmp, read recursively; "
    "class = sub-folder name when class-per-folder)."
)
flags.DEFINE_string("dataset", None, "Dataset name for load_dataset.")
flags.DEFINE_string("data_dir", None, "Dataset root for --dataset.")
flags.DEFINE_string("from_codes", None,
                    "Codes directory written by uhga_tf.encode_collection.")
flags.DEFINE_string("out", None, "Index directory (built or updated).")
flags.DEFINE_list("ids", [], "remove: ids to remove.")
flags.DEFINE_enum("kind", "flat", ["flat", "ivf", "auto"],
                  "build: exact scan, inverted lists, or ivf for large sets.")
flags.DEFINE_integer("nlist", None,
                     "build: ivf lists (default ~sqrt(n) / 4).",
                     lower_bound=1)
flags.DEFINE_integer("nprobe", 16, "build: ivf lists scanned per query.",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Images per encode call.",
                     lower_bound=1)
flags.DEFINE_bool("progress", True, "Show a progress bar (--noprogress).")
flags.DEFINE_bool("skip_corrupt", False,
                  "Skip undecodable images instead of failing.")
flags.DEFINE_integer("max_image_pixels",
                     image_header.COLLECTION_MAX_IMAGE_PIXELS,
                     "Largest width * height an image may decode to (every "
                     "GIF frame counted); larger ones are refused.",
                     lower_bound=1)
flags.mark_flags_as_required(["out"])
COMMANDS = ("build", "add", "remove")


def _sources():
    given = [n for n in ("images", "dataset", "from_codes")
             if FLAGS[n].value is not None]
    if len(given) != 1:
        raise app.UsageError(
            "give exactly one of --images, --dataset and --from_codes; "
            f"received {given}"
        )
    if given[0] != "from_codes" and FLAGS.model is None:
        raise app.UsageError(f"--{given[0]} needs --model")
    return given[0]


def _encoded(source):
    """(packed_codes, metadata columns, class_names) of --images/--dataset."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        index = _build(source, tmp + "/index", retrieval.SearchKind())
    items = index.get_metadata(index.ids)
    metadata = {name: [item[name] for item in items]
                for name in index.metadata_columns}
    return index.packed_codes, metadata, index.info.get("class_names")


def _build(source, out, search):
    if source == "from_codes":
        return retrieval.build_index_from_codes(FLAGS.from_codes, out,
                                                search=search)
    return retrieval.build_index(
        FLAGS.model, out, images_dir=FLAGS.images, dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir, batch_size=FLAGS.batch_size,
        progress=FLAGS.progress, skip_corrupt=FLAGS.skip_corrupt,
        max_image_pixels=FLAGS.max_image_pixels, search=search,
    )


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(
            f"expected one command of {COMMANDS}; received {argv[1:]}"
        )
    command = argv[1]
    if command == "remove":
        if not FLAGS.ids:
            raise app.UsageError("remove needs --ids")
        n = retrieval.remove_items(FLAGS.out, [int(i) for i in FLAGS.ids])
        print(f"{FLAGS.out}\t{n} items\tremoved {len(FLAGS.ids)}")
        return
    source = _sources()
    if command == "add":
        if source == "from_codes":
            ids = retrieval.add_codes(FLAGS.out, FLAGS.from_codes)
        else:
            ids = retrieval.add_items(FLAGS.out, *_encoded(source))
        print(f"{FLAGS.out}\tadded {len(ids)}\tids {ids[0]}..{ids[-1]}")
        return
    search = retrieval.SearchKind(FLAGS.kind, FLAGS.nlist, FLAGS.nprobe)
    index = _build(source, FLAGS.out, search)
    print(f"{FLAGS.out}\t{len(index)} items\t{index.code_length} bits")


if __name__ == "__main__":
    # A failed build removes its new --out; add/remove never create it.
    cli_errors.app_run("index", main, outputs=lambda: [FLAGS.out])
