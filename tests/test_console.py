"""The quiet console: which log lines and start-up lines it hides."""

import logging
import os
import subprocess
import sys

from uhga_tf import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "uhga_tf")


def _record(pathname, level, msg):
    return logging.LogRecord("absl", level, pathname, 1, msg, (), None)


def test_filter_keeps_the_console_lines_and_every_warning():
    keep = console.quiet_filter().filter
    saver = "/site-packages/tensorflow/python/checkpoint/functional_saver.py"
    assert not keep(_record(saver, logging.INFO,
                            "Sharding callback duration: %s"))  # fmt: skip
    assert keep(_record(saver, logging.WARNING, "slow checkpoint"))

    def ours(path, level, msg):
        return keep(_record(os.path.join(PACKAGE, *path.split("/")), level,
                            msg))

    shown = [
        ("data/retrieval_sets.py", "retrieval sets: %s; %s"),
        ("training/run.py", "similarity matrix (%s): %d items, fractions %s"),
        ("training/callbacks.py", "epoch %d: validation MAP %.4f"),
        ("training/run.py", "final MAP %.4f (tie-aware %.4f) after %d steps"),
    ]
    internal = [
        ("evaluation/metrics.py", "MAP@%d: %d of %d queries empty (%s)"),
        ("training/run.py", "config: %s"),
        ("training/run.py", "similarity matrix vs labels (diagnostics"),
        ("similarity/structured.py", "similarity matrix (%s): %.1f MB"),
        ("data/splits.py", "Split %s seed=%d: %s"),
        ("data/feature_cache.py", "Cached features %s %s to %s"),
        # Same message in another module: the path decides.
        ("evaluation/run.py", "final MAP %.4f"),
    ]
    assert all(ours(p, logging.INFO, m) for p, m in shown)
    assert not any(ours(p, logging.INFO, m) for p, m in internal)
    assert all(ours(p, logging.WARNING, m) for p, m in internal)


def test_startup_noise_pattern():
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called "
        "are written to STDERR\n",
        "I0000 00:00:1796070810.194559    7149 port.cc:153] oneDNN custom "
        "operations are on.\n",
        "I0000 00:00:1796070810.195124    7149 cudart_stub.cc:31] Could not "
        "find cuda drivers on your machine, GPU will not be used.\n",
        "E0000 00:00:1796070811.900931    7149 cuda_platform.cc:52] failed "
        "call to cuInit: INTERNAL: CUDA error\n",
    ]
    kept = [
        "E0000 00:00:1796070811.900931    7149 saver.cc:52] disk full\n",
        "W0000 00:00:1796070811.900931    7149 cpu_feature_guard.cc:1] AVX\n",
        "Traceback (most recent call last):\n",
        "I1130 20:42:55.495583 140068194786176 run.py:531] final MAP 0.4\n",
    ]
    assert all(console._STARTUP_NOISE.match(line) for line in noise)
    assert not any(console._STARTUP_NOISE.match(line) for line in kept)


def _stderr_of(env_extra):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **env_extra)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    code = (
        "from absl import flags; from uhga_tf import console; "
        "console.configure(console.verbose_requested(flags.FLAGS)); "
        "import tensorflow as tf; print(int(tf.constant(2) * 3))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "6\n"
    return result.stderr


def test_tensorflow_startup_is_quiet_unless_asked():
    quiet = _stderr_of({"UHGA_VERBOSE": "0"})
    assert not any(
        console._STARTUP_NOISE.match(line)
        for line in quiet.splitlines(keepends=True)
    ), quiet
    loud = _stderr_of({"UHGA_VERBOSE": "1"})
    # On this CPU-only machine TF announces itself at start-up; the quiet
    # run hid exactly those lines.
    noisy = [
        line
        for line in loud.splitlines(keepends=True)
        if console._STARTUP_NOISE.match(line)
    ]
    assert noisy, loud


def _train(tmp_path, workdir, env_extra):
    from train_fixtures import write_feature_file

    features = tmp_path / "features.npz"
    if not features.exists():
        write_feature_file(str(features))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **env_extra)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    args = [
        "--dataset=features", f"--data_dir={features}",
        f"--cache_dir={tmp_path / 'cache'}",
        f"--workdir={tmp_path / workdir}", "--code_length=16",
        "--global_batch_size=32", "--epochs=3", "--eval_every_epochs=1",
        "--checkpoint_every_steps=3", "--learning_rate=0.01",
        "--positive_weight=auto",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "uhga_tf.train", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_training_console_is_short_unless_verbose(tmp_path):
    quiet = _train(tmp_path, "quiet", {"UHGA_VERBOSE": "0"})
    # Keras' epoch lines are the progress bar; the rest is what we print.
    lines = [
        line
        for line in (quiet.stderr + quiet.stdout).splitlines()
        if line.strip()
        and not line.startswith("Epoch ")
        and " - loss" not in line
        and "/step - " not in line
    ]
    assert len(lines) <= 20, "\n".join(lines)
    assert "Sharding callback" not in quiet.stderr
    assert not any(console._STARTUP_NOISE.match(line) for line in lines)
    assert any("similarity" in line and "fractions" in line for line in lines)
    assert any("validation MAP" in line for line in lines)
    assert any("final MAP" in line for line in lines)
    # Internal lines go to the verbose log only (issue 20).
    for internal in ("queries empty", "empty queries", "Split ",
                     "(diagnostics only"):
        assert internal not in quiet.stderr, internal
    result_line = quiet.stdout.strip().splitlines()[-1]
    assert result_line.startswith("MAP@ALL") and "results.json" in result_line
    # The same run asked to be verbose shows the library chatter: the
    # filter, not a missing checkpoint, removed it above.
    loud = _train(tmp_path, "loud", {"UHGA_VERBOSE": "1"})
    assert "Sharding callback" in loud.stderr
    assert '"code_length": 16' in loud.stderr  # the config dump
    assert "empty queries" in loud.stderr
