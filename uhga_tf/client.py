"""Deprecated spelling of `python -m uhga_tf.encode` (goes next release).

  python -m uhga_tf.client ARGS  ==  python -m uhga_tf.encode ARGS

after a one-line notice on stderr.
"""

import sys

from uhga_tf import cli_errors

if __name__ == "__main__":
    cli_errors.forward_deprecated("python -m uhga_tf.client", "encode",
                                  sys.argv[1:])
