"""Inputs for `finetune_probe.py`: the product's S and start, on a subset.

    python benchmarks/finetune_probe_inputs.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --out_dir=.probe

The accelerator lent to some sessions has PyTorch but no TensorFlow, and
takes at most 64 MiB of files, so the probe cannot run the product's
`train.py` there. This script does everything that needs TensorFlow or the
whole data set here, with the product's own code and flags, and writes what
the probe reads:

* ``images.zip``: the JPEGs of the query set, the validation queries, the
  product's train set (20,000 images drawn from the database) and as many
  other database images, in the database's seed-shuffled order, as make
  ``--database_size`` (the whole database does not fit in 64 MiB);
* ``probe.npz``: rows of each set in that list, labels (evaluation only),
  the product's similarity structure over the train set (co-association
  cluster ids and row agreement), the hash layer's centring and its
  k-means+LS start at the flags' code length, and the first query images
  as TensorFlow decodes them with their cached features (the probe checks
  its port of the backbone against them; it decodes the JPEGs with Pillow,
  whose pixels differ from TensorFlow's by up to 5 levels);
* ``efficientnet-lite0.pth``: the backbone's ImageNet weights.
"""

import os
import sys
import types
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_env  # noqa: E402

from uhga_tf import config  # noqa: E402
from uhga_tf import flags_util  # noqa: E402

flags_util.define_config_flags()
flags.DEFINE_string("out_dir", ".probe", "Folder for the probe's inputs.")
flags.DEFINE_integer("database_size", 30000,
                     "Database rows kept (train and validation included).")
flags.DEFINE_integer("check_rows", 64,
                     "Query images whose cached features travel as a check.")
FLAGS = flags.FLAGS


def database_subset(sets, size):
    """Positions in the database: every train and validation row, then the
    others in the database's own (seed-shuffled) order up to ``size``."""
    database = sets.indices["database"]
    needed = set(sets.indices["train"].tolist()) | set(
        sets.indices["validation"].tolist())
    if size < len(needed):
        raise ValueError(f"database_size must be >= {len(needed)}")
    keep = np.array([i in needed for i in database.tolist()])
    others = np.flatnonzero(~keep)[:size - len(needed)]
    keep[others] = True
    return np.flatnonzero(keep)


def write_jpegs(dataset, images, path):
    """The source JPEGs of dataset rows ``images``, as ``<row>.jpg``.

    CIFAR-10 is decoded into an array at load time; its files are listed
    again (the loader's own listing, so row i is file i) to copy their
    bytes: re-encoding would change the pixels the probe sees.
    """
    from uhga_tf.data import cifar10
    from uhga_tf.data import image_folder

    tree = image_folder.FileTree(dataset.source.split(":", 1)[1])
    _, entries = image_folder.list_class_tree(
        tree, expected_classes=cifar10.CIFAR10_CLASSES, require_split=True)
    labels = np.array([label for _, label, _ in entries])
    if dataset.skipped or not np.array_equal(labels, dataset.labels):
        raise ValueError("the file listing does not match the dataset rows")
    source = tree.open_archive()
    try:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
            for row, index in enumerate(images):
                target.writestr(f"{row:06d}.jpg",
                                tree.read(entries[int(index)][2], source))
    finally:
        if source is not None:
            source.close()


def main(argv):
    del argv
    from uhga_tf import similarity as similarity_lib
    from uhga_tf.training import run as run_lib

    _, experiment, sets = bench_env.flag_experiment("finetune_probe_inputs")
    seed = experiment.train.seed
    dataset = sets.image_dataset
    positions = database_subset(sets, FLAGS.database_size)
    database = sets.indices["database"][positions]
    images = np.concatenate([sets.indices["query"], database])
    row_of = {int(index): row for row, index in enumerate(images)}

    structure = similarity_lib.build(
        experiment.similarity, sets.features["train"], seed)
    hasher = run_lib.build_hasher(experiment, types.SimpleNamespace(
        train_features=sets.features["train"], sets=sets))
    centring = hasher.get_layer("feature_centring")
    layer = hasher.get_layer("hash_layer")

    os.makedirs(FLAGS.out_dir, exist_ok=True)
    write_jpegs(dataset, images, os.path.join(FLAGS.out_dir, "images.zip"))
    np.savez_compressed(
        os.path.join(FLAGS.out_dir, "probe.npz"),
        labels=dataset.labels[images],
        query_rows=np.arange(len(sets.indices["query"])),
        database_rows=np.arange(len(sets.indices["query"]), len(images)),
        validation_rows=np.array(
            [row_of[int(i)] for i in sets.indices["validation"]]),
        train_rows=np.array([row_of[int(i)] for i in sets.indices["train"]]),
        assignments=structure.assignments,
        row_agreement=structure.row_agreement,
        similarity_centring=np.float32(structure.centring),
        centring_mean=np.asarray(centring.mean),
        centring_scale=np.asarray(centring.scale),
        kernel=np.asarray(layer.kernel),
        bias=np.asarray(layer.bias),
        dropout_rate=np.float32(experiment.model.dropout_rate),
        learning_rate=np.float32(config.learning_rate_for_code_length(
            experiment.model.code_length)),
        check_features=sets.features["query"][:FLAGS.check_rows],
        check_images=dataset.images[sets.indices["query"][:FLAGS.check_rows]],
        image_size=np.int32(experiment.model.image_size),
        description=np.array(sets.description),
    )
    from uhga_tf.models import backbone
    import shutil
    shutil.copyfile(backbone._resolve_weights_path(
        backbone._spec("efficientnet_lite0"), "default"),
        os.path.join(FLAGS.out_dir, "efficientnet-lite0.pth"))
    print(f"{len(images)} images, {len(sets.indices['train'])} train rows, "
          f"assignments {structure.assignments.shape}, wrote {FLAGS.out_dir}")


if __name__ == "__main__":
    app.run(main)
