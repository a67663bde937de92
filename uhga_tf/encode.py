r"""Encode images with a running model server (embedded or TF-Serving).

  python -m uhga_tf.encode --server=localhost:8500 a.jpg b.png \
      [--model_name=uhga] [--signature_name=serving_default] [--timeout=10] \
      [--out=codes.npy]

Prints one line per image, `<path> <packed code as hex>`, or with --out
writes the int8 codes [n, code_length] to a .npy file.
"""

import errno
import os
import sys

from absl import app
from absl import flags
import grpc
import numpy as np

from uhga_tf import cli_errors
from uhga_tf import saved_model
from uhga_tf.serving import grpc_client

FLAGS = flags.FLAGS
flags.DEFINE_string("server", "localhost:8500", "gRPC address host:port.")
flags.DEFINE_string(
    "model_name", saved_model.DEFAULT_MODEL_NAME, "Model name on the server."
)
flags.DEFINE_string(
    "signature_name",
    saved_model.SIGNATURE_IMAGE_BYTES,
    "Signature taking image_bytes.",
)
flags.DEFINE_float("timeout", 10.0, "Deadline per call in seconds.")
flags.DEFINE_string("out", None, "Write the int8 codes to this .npy file.")
flags.register_validator(
    "timeout", lambda t: t > 0, message="--timeout must be > 0"
)


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give at least one IMAGE path")
    if FLAGS.out:
        folder = os.path.dirname(os.path.abspath(FLAGS.out))
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                errno.ENOENT, "no such folder for --out", folder
            )
    image_bytes_list = []
    for path in paths:
        with open(path, "rb") as f:
            image_bytes_list.append(f.read())
    try:
        codes, packed_codes = grpc_client.encode_images(
            FLAGS.server,
            image_bytes_list,
            model_name=FLAGS.model_name,
            signature_name=FLAGS.signature_name,
            timeout=FLAGS.timeout,
        )
    except grpc.RpcError as e:
        sys.exit(f"uhga_tf.encode: {e.code().name}: {e.details()}")
    if FLAGS.out:
        np.save(FLAGS.out, codes)
        print(f"wrote {codes.shape[0]} codes to {FLAGS.out}")
        return
    for path, packed in zip(paths, packed_codes):
        print(f"{path} {packed.tobytes().hex()}")


if __name__ == "__main__":
    cli_errors.app_run("encode", main, outputs=lambda: [FLAGS.out])
