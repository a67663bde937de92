r"""Print the nearest index images of query images and draw a result grid.

  python -m uhga_tf.search --index=index/ --model=models/uhga/1 \
      QUERY.jpg [QUERY2.jpg ...] --top_k=10 [--out=result.png]
  python -m uhga_tf.search --index=index/ --server=localhost:8500 QUERY.jpg
  python -m uhga_tf.search serve --index=index/ --model=models/uhga/1 \
      [--host=127.0.0.1 --port=8080]

Prints, per query, a `query<TAB>PATH<TAB>CLASS` line and then one
`RANK<TAB>DISTANCE<TAB>SOURCE<TAB>CLASS` line per result (ties broken by
index order; CLASS is "-" when unknown). `serve` serves the search page
(`uhga_tf.retrieval.web`) until SIGTERM or Ctrl-C.
"""

import signal
import threading

from absl import app
from absl import flags

from uhga_tf import cli_errors
from uhga_tf import retrieval
from uhga_tf.saved_model import wire_names

FLAGS = flags.FLAGS
flags.DEFINE_string("index", None, "Index directory from uhga_tf.index.")
flags.DEFINE_string("model", None, "SavedModel directory for the queries.")
flags.DEFINE_string("server", None,
                    "HOST:PORT of a gRPC server encoding the queries.")
flags.DEFINE_string(
    "model_name", wire_names.DEFAULT_MODEL_NAME, "Model name on --server."
)
flags.DEFINE_integer("top_k", 10, "Results per query.", lower_bound=1)
flags.DEFINE_string("out", None, "PNG result grid path (optional).")
flags.DEFINE_integer("tile_size", 128, "Grid tile size in pixels.",
                     lower_bound=16)
flags.DEFINE_string("query_label", None,
                    "Class of the queries (default: parent folder name).")
flags.DEFINE_string("host", "127.0.0.1",
                    "serve: interface to bind (loopback).")
flags.DEFINE_integer("port", 8080, "serve: port; 0 picks a free one.")
flags.DEFINE_integer("max_upload_bytes", 8 * 1024 * 1024,
                     "serve: largest accepted upload.", lower_bound=1)
flags.DEFINE_integer("max_pixels", 16_000_000,
                     "Largest width * height a query, upload or thumbnail "
                     "may decode to (every GIF frame counted).",
                     lower_bound=1)
flags.DEFINE_float("index_poll_s", 1.0,
                   "serve: seconds between checks for a changed index "
                   "(index build/add/remove); 0 never reloads.",
                   lower_bound=0.0)
flags.mark_flags_as_required(["index"])
flags.register_multi_flags_validator(
    ["model", "server"],
    lambda f: (f["model"] is None) != (f["server"] is None),
    message="give exactly one of --model and --server",
)


def serve():
    """Serve the search page until SIGTERM or Ctrl-C."""
    from uhga_tf.retrieval import web

    config = web.WebConfig(
        host=FLAGS.host,
        port=FLAGS.port,
        top_k=FLAGS.top_k,
        max_upload_bytes=FLAGS.max_upload_bytes,
        max_pixels=FLAGS.max_pixels,
        index_poll_s=FLAGS.index_poll_s,
    )
    service = web.SearchService(
        FLAGS.index,
        model_dir=FLAGS.model,
        server=FLAGS.server,
        model_name=FLAGS.model_name,
        config=config,
    )
    server = web.SearchWebServer(service)
    port = server.start()
    stop = threading.Event()

    def on_signal(signum, frame):
        del frame
        signal.signal(signum, signal.SIG_DFL)  # a second signal kills
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"search page on http://{config.host}:{port}/", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()


def main(argv):
    if argv[1:2] == ["serve"]:
        if len(argv) > 2:
            raise app.UsageError(f"unexpected arguments: {argv[2:]}")
        serve()
        return
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
