"""MultiWorkerMirroredStrategy: two local workers end with identical weights."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf

from train_fixtures import write_feature_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _variables(checkpoint_dir):
    reader = tf.train.load_checkpoint(checkpoint_dir)
    names = sorted(
        n for n in reader.get_variable_to_shape_map()
        if "hasher" in n or "attention" in n
    )
    return {n: reader.get_tensor(n) for n in names}


def test_two_workers_train_three_steps_identically(tmp_path):
    features = write_feature_file(str(tmp_path / "features.npz"))
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workdir = tmp_path / "run"
    # 120 train rows, 40 per branch per step -> 3 steps in one epoch.
    args = [
        sys.executable, "-m", "uhga_tf.train", "--dataset=features",
        f"--data_dir={features}", f"--cache_dir={tmp_path / 'cache'}",
        f"--workdir={workdir}", "--strategy=multi_worker",
        "--code_length=16", "--global_batch_size=80", "--epochs=1",
        "--learning_rate=0.01", "--positive_weight=auto", "--noprogress",
    ]
    procs = []
    try:
        for index in range(2):
            tf_config = {"cluster": cluster,
                         "task": {"type": "worker", "index": index}}
            procs.append(subprocess.Popen(
                args, cwd=REPO, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
                env={**os.environ, "TF_CONFIG": json.dumps(tf_config),
                     "CUDA_VISIBLE_DEVICES": ""},
            ))
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 3
    chief = _variables(str(workdir / "checkpoints"))
    other = _variables(str(workdir / ".worker-worker-1"))
    assert chief.keys() == other.keys() and len(chief) >= 2
    for name in chief:
        np.testing.assert_array_equal(chief[name], other[name], err_msg=name)
