r"""Serve exported uhga_tf SavedModels over TF-Serving's gRPC and REST APIs.

  python -m uhga_tf.serve --model_base_path=models/uhga --model_name=uhga \
      --port=8500 [--rest_api_port=8501] \
      [--enable_batching --max_batch_size=32]

Serves the newest version under --model_base_path and loads newer ones as
they appear. SIGTERM or Ctrl-C stops it gracefully. --rest_api_port adds
TF-Serving's REST API and Prometheus metrics at
/monitoring/prometheus/metrics (same --host). With
--print_tf_serving_command it prints the equivalent tensorflow_model_server
command line (the production path, see serving/) and exits.
"""

import dataclasses
import os
import signal

from absl import app
from absl import flags

from uhga_tf import cli_errors
from uhga_tf import saved_model
from uhga_tf.serving import rest as rest_lib
from uhga_tf.serving import server as server_lib

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model_base_path", None, "Directory of integer version subdirectories."
)
flags.DEFINE_string(
    "model_name", saved_model.DEFAULT_MODEL_NAME, "Model name clients must use."
)
flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (loopback).")
flags.DEFINE_integer("port", 8500, "gRPC port; 0 picks a free one.")
flags.DEFINE_integer(
    "rest_api_port",
    None,
    "REST API + Prometheus metrics port (TF-Serving uses 8501); unset: no "
    "REST; 0 picks a free one.",
)
flags.DEFINE_float(
    "poll_interval_s", 2.0, "Seconds between scans for new versions."
)
flags.DEFINE_integer(
    "num_versions", 1, "How many of the newest versions stay loaded."
)
flags.DEFINE_list(
    "version_labels", [], "label=version pairs, e.g. stable=3,canary=4."
)
flags.DEFINE_bool(
    "enable_batching", False, "Merge concurrent requests into one run."
)
flags.DEFINE_integer(
    "max_batch_size", 64, "Largest batch per request and per merged run."
)
flags.DEFINE_float(
    "batch_timeout_ms", 2.0, "Longest wait for requests to merge."
)
flags.DEFINE_integer("num_threads", 16, "gRPC worker threads.")
flags.DEFINE_integer(
    "max_image_pixels",
    server_lib.request_checks.DEFAULT_MAX_IMAGE_PIXELS,
    "Largest width x height of one image, read from its header before "
    "decoding (larger ones are INVALID_ARGUMENT).",
)
flags.DEFINE_integer(
    "max_request_pixels",
    server_lib.request_checks.DEFAULT_MAX_REQUEST_PIXELS,
    "Largest total of pixels of the images in one request.",
)
flags.DEFINE_float("grace_s", 5.0, "Seconds running requests get on stop.")
flags.DEFINE_bool(
    "print_tf_serving_command",
    False,
    "Print the tensorflow_model_server command for this base path and exit.",
)
flags.mark_flag_as_required("model_base_path")


def parse_version_labels(pairs):
    """Turn ["stable=3", ...] into {"stable": 3} (ValueError on bad pairs)."""
    labels = {}
    for pair in pairs:
        label, sep, version = pair.partition("=")
        if not sep or not version.isdigit():
            raise ValueError(
                f"version_labels entries must be label=version; received "
                f"{pair!r}"
            )
        labels[label] = int(version)
    return labels


def config_from_flags():
    """Turn the flags into a ServerConfig (ValueError on bad values).

    Every ServerConfig field has a flag of the same name; only
    version_labels needs parsing.
    """
    values = {
        field.name: FLAGS[field.name].value
        for field in dataclasses.fields(server_lib.ServerConfig)
    }
    values["version_labels"] = parse_version_labels(FLAGS.version_labels)
    return server_lib.ServerConfig(**values)


def tf_serving_command(config):
    """Return the tensorflow_model_server command serving the same path."""
    return (
        "tensorflow_model_server --port=8500 --rest_api_port=8501 "
        f"--model_name={config.model_name} "
        f"--model_base_path={os.path.abspath(config.model_base_path)} "
        "--file_system_poll_wait_seconds="
        f"{max(1, round(config.poll_interval_s))}"
        + (" --enable_batching=true" if config.enable_batching else "")
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    if FLAGS.print_tf_serving_command:
        print(tf_serving_command(config))
        return
    server = server_lib.ModelServer(config)
    rest = None
    if FLAGS.rest_api_port is not None:
        rest = rest_lib.RestServer(server, config.host, FLAGS.rest_api_port)
    port = server.start()
    rest_port = rest.start() if rest is not None else None

    def on_signal(signum, frame):
        del frame
        signal.signal(signum, signal.SIG_DFL)  # a second signal kills
        if rest is not None:
            rest.stop()
        server.stop(FLAGS.grace_s)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"serving {config.model_name} on {config.host}:{port}", flush=True)
    if rest_port is not None:
        print(f"rest on {config.host}:{rest_port}", flush=True)
    server.wait()


if __name__ == "__main__":
    cli_errors.app_run("serve", main)
