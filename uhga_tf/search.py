r"""Print the nearest index images of query images and draw a result grid.

  python -m uhga_tf.search --index=index/ --model=models/uhga/1 \
      QUERY.jpg [QUERY2.jpg ...] --top_k=10 [--out=result.png]
  python -m uhga_tf.search --index=index/ --server=localhost:8500 QUERY.jpg

Prints, per query, a `query<TAB>PATH<TAB>CLASS` line and then one
`RANK<TAB>DISTANCE<TAB>SOURCE<TAB>CLASS` line per result (ties broken by
index order; CLASS is "-" when unknown). The search page is its own
command, `python -m uhga_tf.search_page`; `search serve` still runs it for
one release, after a deprecation notice.
"""

from absl import app
from absl import flags

from uhga_tf import cli_errors
from uhga_tf import flags_util
from uhga_tf import retrieval
from uhga_tf.data import image_header

FLAGS = flags.FLAGS
flags_util.define_query_flags()
flags.DEFINE_integer("top_k", 10, "Results per query.", lower_bound=1)
flags.DEFINE_string("out", None, "PNG result grid path (optional).")
flags.DEFINE_integer("tile_size", 128, "Grid tile size in pixels.",
                     lower_bound=16)
flags.DEFINE_string("query_label", None,
                    "Class of the queries (default: parent folder name).")
flags.DEFINE_integer("max_pixels", image_header.COLLECTION_MAX_IMAGE_PIXELS,
                     "Largest width * height a query may decode to (every "
                     "GIF frame counted).",
                     lower_bound=1)
# Accepted only for the deprecated `search serve`, which hands them as
# given to `uhga_tf.search_page` (that command checks them).
_PAGE_ONLY_FLAGS = ("host", "port", "max_upload_bytes", "index_poll_s")
for _name in _PAGE_ONLY_FLAGS:
    flags.DEFINE_string(_name, None, "Deprecated `search serve` only: see "
                        "python -m uhga_tf.search_page --help.")


def _forward_to_search_page():
    """The deprecated `search serve` spelling: run `uhga_tf.search_page`."""
    shared = ("index", "model", "server", "model_name", "top_k",
              "max_pixels")
    args = [f"--{name}={FLAGS[name].value}" for name in shared
            if FLAGS[name].present]
    args += [f"--{name}={FLAGS[name].value}" for name in _PAGE_ONLY_FLAGS
             if FLAGS[name].value is not None]
    cli_errors.forward_deprecated("python -m uhga_tf.search serve",
                                  "search_page", args)


def main(argv):
    if argv[1:2] == ["serve"]:
        if len(argv) > 2:
            raise app.UsageError(f"unexpected arguments: {argv[2:]}")
        _forward_to_search_page()
    results, index = retrieval.search_images(
        FLAGS.index,
        argv[1:],
        top_k=FLAGS.top_k,
        model_dir=FLAGS.model,
        server=FLAGS.server,
        model_name=FLAGS.model_name,
        query_label=FLAGS.query_label,
        max_image_pixels=FLAGS.max_pixels,
    )
    if FLAGS.out:
        retrieval.write_result_grid(results, index, FLAGS.out,
                                 tile_size=FLAGS.tile_size)
    lines = []
    for r in results:
        lines.append(f"query\t{r.query_path}\t{r.query_class or '-'}")
        for rank, (distance, source) in enumerate(
            zip(r.distances, r.sources), start=1
        ):
            name = r.class_names[rank - 1] if r.class_names else "-"
            lines.append(f"{rank}\t{int(distance)}\t{source}\t{name}")
    print("\n".join(lines))


if __name__ == "__main__":
    cli_errors.app_run("search", main, outputs=lambda: [FLAGS.out])
