"""Old command spellings keep working for one release, with a notice.

`python -m uhga_tf.client` is `uhga_tf.encode`; `python -m uhga_tf.search
serve` is `uhga_tf.search_page`. Each prints one deprecation line on stderr
and then behaves exactly as the new command, error lines included.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True,
        text=True, timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
             "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    notices = [x for x in lines if "is deprecated" in x]
    return result.returncode, notices, lines[-1] if lines else ""


def _notice(old, new):
    return (f"uhga_tf: `python -m uhga_tf.{old}` is deprecated and goes in "
            f"the next release; use `python -m uhga_tf.{new}` (same flags)")


def test_client_is_encode_after_one_notice(tmp_path):
    missing = tmp_path / "none.png"
    code, notices, last = _run("uhga_tf.client", "--server=127.0.0.1:1",
                               str(missing))
    assert notices == [_notice("client", "encode")]
    # encode's own error: it reads the images before it dials the server.
    assert code == 1
    assert last.startswith("uhga_tf.encode: ") and str(missing) in last


def test_encode_has_no_notice(tmp_path):
    code, notices, last = _run("uhga_tf.encode", "--server=127.0.0.1:1",
                               str(tmp_path / "none.png"))
    assert (code, notices) == (1, [])
    assert last.startswith("uhga_tf.encode: ")


def test_search_serve_is_search_page_with_its_flags(tmp_path):
    # --port reaches search_page's own check, so the flags are handed on.
    code, notices, last = _run(
        "uhga_tf.search", "serve", f"--index={tmp_path}",
        f"--model={tmp_path}", "--port=70000",
    )
    assert notices == [_notice("search serve", "search_page")]
    assert code == 1
    assert last == ("uhga_tf.search_page: port must be in [0, 65535]; "
                    "received port=70000")
