r"""Serve the search page over an index until SIGTERM or Ctrl-C.

  python -m uhga_tf.search_page --index=index/ --model=models/uhga/1 \
      [--host=127.0.0.1 --port=8080 --top_k=10]
  python -m uhga_tf.search_page --index=index/ --server=localhost:8500

Prints `search page on http://HOST:PORT/` once it listens (`--port=0`
picks a free port). The page is `uhga_tf.retrieval.web`; an index rebuilt
or updated by `uhga_tf.index` is picked up within `--index_poll_s`.
"""

import dataclasses
import signal
import threading

from absl import app
from absl import flags

from uhga_tf import cli_errors
from uhga_tf import flags_util
from uhga_tf.retrieval import web

FLAGS = flags.FLAGS
flags_util.define_query_flags()
flags.DEFINE_integer("top_k", 10, "Results per search.", lower_bound=1)
flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (loopback).")
flags.DEFINE_integer("port", 8080, "Port; 0 picks a free one.")
flags.DEFINE_integer("max_upload_bytes", 8 * 1024 * 1024,
                     "Largest accepted upload.", lower_bound=1)
flags.DEFINE_integer("max_pixels", 16_000_000,
                     "Largest width * height an upload may decode to (every "
                     "GIF frame counted); thumbnails of indexed files take "
                     "the limit of a user's own files (8192 x 8192).",
                     lower_bound=1)
flags.DEFINE_float("index_poll_s", 1.0,
                   "Seconds between checks for a changed index (index "
                   "build/add/remove); 0 never reloads.",
                   lower_bound=0.0)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Every WebConfig field is a flag of the same name.
    config = web.WebConfig(**{
        field.name: FLAGS[field.name].value
        for field in dataclasses.fields(web.WebConfig)
    })
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


if __name__ == "__main__":
    cli_errors.app_run("search_page", main)
