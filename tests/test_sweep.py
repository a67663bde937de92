"""benchmarks/sweep.py: every cell trains on the sets of its own config."""

import json
import os
import subprocess
import sys

from train_fixtures import write_feature_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_grid_over_train_size_loads_each_sizes_sets(tmp_path):
    data = write_feature_file(str(tmp_path / "features.npz"))
    done = subprocess.run(
        [sys.executable, "benchmarks/sweep.py", "--dataset=features",
         f"--data_dir={data}", f"--cache_dir={tmp_path / 'cache'}",
         f"--out_dir={tmp_path / 'out'}", "--code_length=8",
         "--global_batch_size=32", "--epochs=1", "--noattention",
         "--noprogress", "--grid=train_size=40,120", "--name=sizes"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "out" / "sweeps" / "sizes.json") as f:
        cells = json.load(f)["cells"]
    by_size = {c["overrides"]["train_size"]: c for c in cells}
    # S fractions count the train items' pairs: 40 and 120 items.
    fractions = [by_size[n]["similarity_fractions"] for n in (40, 120)]
    assert fractions[0] != fractions[1]
    assert by_size[40]["validation_map"] != by_size[120]["validation_map"]


def test_sets_identity_follows_the_features_not_the_head():
    from uhga_tf import config
    from uhga_tf.data import retrieval_sets

    data = config.DataConfig(dataset="fashion_mnist")
    model = config.ModelConfig()
    same = retrieval_sets.sets_identity(data, model)
    head_only = config.ModelConfig(code_length=16, dropout_rate=0.5)
    assert retrieval_sets.sets_identity(data, head_only) == same
    for field, value in (("image_size", 96), ("feature_runtime", "tflite"),
                         ("backbone_weights", "x.weights.h5")):
        other = config.ModelConfig(**{field: value})
        assert retrieval_sets.sets_identity(data, other) != same, field
    bigger = config.DataConfig(dataset="fashion_mnist", train_size=900)
    assert retrieval_sets.sets_identity(bigger, model) != same
