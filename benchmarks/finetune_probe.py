"""Probe: does fine-tuning the backbone on the product's S lift the codes?

    python benchmarks/finetune_probe_inputs.py --flagfile=configs/cifar.flags \
        --data_dir=../shared/data --out_dir=.probe      # here, TensorFlow
    KERAS_BACKEND=torch python benchmarks/finetune_probe.py \
        --inputs=.probe --out=finetune_probe.json --commit=<sha>  # GPU

Every frozen-feature figure in this project leaves the codes within 0.01 of
the closed-form k-means+LS start (docs/product_recipe.md §1k); the one lever
left is a better representation. Fine-tuning EfficientNet-Lite0 end to end
needs an accelerator, and the one lent to some sessions has PyTorch but no
TensorFlow. So this probe is written against Keras 3 alone (it runs on the
torch, jax or tensorflow backend) and reads what `finetune_probe_inputs.py`
computed with the product's code: S over the product's 20,000 train images
(co-association, chance-corrected), the hash layer's centring and its
k-means+LS start at 64 bits. It is not the product's `train_step` (no
gradient attention, no cross-branch pairing): it measures how far the codes
move when the backbone learns too.

Rows (validation queries against the database less them, and the query
set; a 30,000-image database, so the figures are not the 59,000-image
ones of quality.json, and only differences within this file compare):

* ``cosine (centred)``: float features less the train mean;
* ``k-means+LS``: the start's codes (no training);
* ``head only``: the product's head and loss, backbone frozen, Nesterov
  SGD at the product's rate for 8 epochs (the product's own recipe in this
  loop; its validation figure should sit near quality.json's);
* ``fine-tune <config>``: backbone and head trained together with Adam,
  batch norm statistics frozen, two augmented views (reflect-pad-4 crop,
  flip, brightness/contrast) of 128 train images per step, every pair of
  the 256 codes in the loss. The configuration to report is chosen on
  validation MAP@ALL.
"""

import io
import json
import os
import sys
import time
import zipfile
from concurrent import futures

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from uhga_tf.evaluation import cosine  # noqa: E402
from uhga_tf.evaluation import metrics  # noqa: E402
from uhga_tf.models import backbone as backbone_lib  # noqa: E402

flags.DEFINE_string("inputs", ".probe", "finetune_probe_inputs.py's folder.")
flags.DEFINE_string("out", "finetune_probe.json", "JSON written after each row.")
flags.DEFINE_string("commit", "unknown", "Code commit (no .git on the device).")
flags.DEFINE_list("configs", ["1e-4:3", "3e-5:3"],
                  "Fine-tuning runs as <Adam learning rate>:<epochs>.")
flags.DEFINE_integer("head_epochs", 8, "Epochs of the head-only control.")
flags.DEFINE_integer("batch_images", 128, "Train images per step (x2 views).")
flags.DEFINE_float("budget_s", 480.0, "Start no run after this many seconds.")
flags.DEFINE_integer("limit", 0, "Smoke test: keep this many rows per set.")
flags.DEFINE_integer("seed", 0, "Seed of batches, views and dropout.")
FLAGS = flags.FLAGS


def decode_images(path):
    """uint8 [n, H, W, 3] of ``<row>.jpg`` members, in row order."""
    from PIL import Image

    with zipfile.ZipFile(path) as archive:
        names = sorted(archive.namelist())
        blobs = [archive.read(name) for name in names]

    def decode(blob):
        return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))

    with futures.ThreadPoolExecutor(16) as pool:
        return np.stack(list(pool.map(decode, blobs)))


class CentredUnitRows(keras.layers.Layer):
    """(x / |x| - mean) / scale: the product's `FeatureCentring`."""

    def __init__(self, mean, scale, **kwargs):
        super().__init__(**kwargs)
        self.mean = keras.ops.convert_to_tensor(mean.astype(np.float32))
        self.scale = float(scale)

    def call(self, x):
        norms = keras.ops.norm(x, axis=-1, keepdims=True)
        return (x / keras.ops.maximum(norms, 1e-12) - self.mean) / self.scale


class Upsample(keras.layers.Layer):
    """Bilinear resize to the backbone's size, as the product's pipeline."""

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)

    def call(self, x):
        return keras.ops.image.resize(
            x, (self.size, self.size), interpolation="bilinear")


def hash_head(inputs, npz):
    """Centring, dropout, dense start at k-means+LS, tanh."""
    x = CentredUnitRows(npz["centring_mean"], npz["centring_scale"])(inputs)
    x = keras.layers.Dropout(float(npz["dropout_rate"]),
                             seed=FLAGS.seed)(x)
    kernel, bias = npz["kernel"], npz["bias"]
    dense = keras.layers.Dense(
        kernel.shape[1],
        kernel_initializer=keras.initializers.Constant(kernel),
        bias_initializer=keras.initializers.Constant(bias))
    return keras.layers.Activation("tanh")(dense(x))


def image_model(npz, weights):
    """uint8-valued [b, 32, 32, 3] -> (features, relaxed codes)."""
    backbone = backbone_lib.build_backbone(
        "efficientnet_lite0", weights=weights,
        image_size=int(npz["image_size"]))
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    images = keras.Input((32, 32, 3))
    features = backbone(Upsample(int(npz["image_size"]))(images))
    return keras.Model(images, [features, hash_head(features, npz)])


class PairLoss(keras.losses.Loss):
    """Squared error of u_i.u_j / K against the co-association S.

    S = (1 - c)(2a - 1) + c (a - r_i - r_j + r) / (1 - r), a the share of
    clusterings joining the pair, r_i row i's mean share, r their mean, c
    the similarity centring: the product's `coassociation` entries.
    """

    def __init__(self, npz, **kwargs):
        super().__init__(**kwargs)
        self.ids = keras.ops.convert_to_tensor(
            npz["assignments"].astype(np.int32))
        rows = npz["row_agreement"].astype(np.float32)
        self.rows = keras.ops.convert_to_tensor(rows)
        self.chance = float(rows.mean())
        self.centring = float(npz["similarity_centring"])

    def call(self, y_true, y_pred):
        index = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        ids = keras.ops.take(self.ids, index, axis=0)
        agree = keras.ops.mean(keras.ops.cast(
            keras.ops.equal(ids[:, None, :], ids[None, :, :]), "float32"),
            axis=-1)
        r = keras.ops.take(self.rows, index, axis=0)
        centred = (agree - r[:, None] - r[None, :] + self.chance) / (
            1.0 - self.chance)
        target = ((1.0 - self.centring) * (2.0 * agree - 1.0)
                  + self.centring * centred)
        codes = keras.ops.cast(y_pred, "float32")
        inner = keras.ops.matmul(codes, keras.ops.transpose(codes))
        residual = inner / float(codes.shape[-1]) - target
        return keras.ops.mean(keras.ops.square(residual), axis=-1)


def augment(images, rng):
    """Reflect-pad-4 random crop, horizontal flip, brightness/contrast."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    dy = rng.integers(0, 9, n)
    dx = rng.integers(0, 9, n)
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    out = padded[np.arange(n)[:, None, None], rows[:, :, None],
                 cols[:, None, :]].astype(np.float32)
    flip = rng.random(n) < 0.5
    out[flip] = out[flip][:, :, ::-1]
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    contrast = rng.uniform(0.8, 1.2, (n, 1, 1, 1))
    brightness = rng.uniform(-20.0, 20.0, (n, 1, 1, 1))
    return np.clip((out - mean) * contrast + mean + brightness, 0.0, 255.0)


class TrainBatches(keras.utils.PyDataset):
    """(inputs, train rows as float) per step; ``views`` > 1 stacks that
    many augmented views of the same images."""

    def __init__(self, inputs, batch, views, seed):
        super().__init__()
        self.inputs, self.batch, self.views = inputs, batch, views
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(inputs))

    def __len__(self):
        return len(self.inputs) // self.batch

    def __getitem__(self, step):
        rows = self.order[step * self.batch:(step + 1) * self.batch]
        if self.views == 1:
            return self.inputs[rows].astype(np.float32), rows.astype(
                np.float32)
        x = np.concatenate([augment(self.inputs[rows], self.rng)
                            for _ in range(self.views)])
        return x, np.tile(rows, self.views).astype(np.float32)

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.inputs))


def signs(values):
    return np.where(np.asarray(values) >= 0, 1, -1).astype(np.int8)


def evaluate(codes, sets, labels, float_mean=None):
    """{validation, query}: tie-aware MAP@ALL, MAP@1000, P@100."""
    out = {}
    for name, (queries, database) in sets.items():
        if float_mean is not None:
            got = cosine.cosine_metrics(
                codes[queries], codes[database], labels[queries],
                labels[database], mean=float_mean)
            out[name] = {k: float(got[k])
                         for k in ("map_all", "map_1000", "p_100")}
            continue
        got = metrics.evaluate_codes(
            codes[queries], codes[database], labels[queries],
            labels[database], precision_at=(100,), map_at=(1000,))
        map_at = {int(k): v for k, v in got["map_at"].items()}
        precision = {int(k): v for k, v in got["precision_at_n"].items()}
        out[name] = {"map_all": float(got["map_tie_aware"]),
                     "map_all_deterministic": float(got["map"]),
                     "map_1000": float(map_at[1000]),
                     "p_100": float(precision[100])}
    return out


def main(argv):
    del argv
    start = time.perf_counter()
    if keras.backend.backend() == "torch":
        import torch
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    keras.utils.set_random_seed(FLAGS.seed)
    npz = dict(np.load(os.path.join(FLAGS.inputs, "probe.npz")))
    images = decode_images(os.path.join(FLAGS.inputs, "images.zip"))
    labels = npz["labels"]
    validation = npz["validation_rows"]
    database = npz["database_rows"]
    train = npz["train_rows"]
    query = npz["query_rows"]
    if FLAGS.limit:
        keep = np.concatenate([train[:FLAGS.limit], validation[:50]])
        database = np.union1d(keep, database[:5 * FLAGS.limit])
        validation, query = validation[:50], query[:50]
        train = train[:FLAGS.limit]
        npz["assignments"] = npz["assignments"][:FLAGS.limit]
        npz["row_agreement"] = npz["row_agreement"][:FLAGS.limit]
        used = np.union1d(np.union1d(database, query), train)
        images, labels = images[used], labels[used]
        database, validation, query, train = (
            np.searchsorted(used, rows)
            for rows in (database, validation, query, train))
    sets = {
        "validation": (validation, np.setdiff1d(database, validation)),
        "query": (query, database),
    }
    weights = os.path.join(FLAGS.inputs, "efficientnet-lite0.pth")
    report = {"commit": FLAGS.commit, "backend": keras.backend.backend(),
              "argv": sys.argv, "data": str(npz["description"]),
              "database_size": int(len(database)), "rows": {}}
    report["device"] = _device_name()

    def save(name, row):
        report["rows"][name] = row
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        with open(FLAGS.out + ".tmp", "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        os.replace(FLAGS.out + ".tmp", FLAGS.out)
        print(name, json.dumps(row), flush=True)

    model = image_model(npz, weights)
    features, init_codes = model.predict(images.astype(np.float32),
                                         batch_size=500, verbose=0)
    report["port_check"] = port_check(model, npz, features[query])
    print("port check", report["port_check"], flush=True)
    if report["port_check"]["min_cosine"] < 0.9999:
        # Still comparable within this file (every row reads this port),
        # but not with the product's figures.
        print("WARNING: the port differs from the product's backbone",
              flush=True)
    save("cosine (centred)", evaluate(features, sets, labels,
                                      float_mean=features[train].mean(0)))
    save("k-means+LS (start)", evaluate(signs(init_codes), sets, labels))
    save("head only", head_only(npz, features, train, sets, labels))
    for config in FLAGS.configs:
        if time.perf_counter() - start > FLAGS.budget_s:
            print("budget spent; skipping", config, flush=True)
            continue
        rate, epochs = config.split(":")
        save(f"fine-tune lr={rate} epochs={epochs}", fine_tune(
            npz, weights, images, train, sets, labels, float(rate),
            int(epochs)))
    chosen = max((name for name in report["rows"]
                  if name.startswith("fine-tune")),
                 key=lambda name: report["rows"][name]["validation"][
                     "map_all"], default=None)
    report["chosen_on_validation"] = chosen
    save("_done", {"seconds": round(time.perf_counter() - start, 1)})


def port_check(model, npz, query_features):
    """Features of TensorFlow-decoded query images against the product's
    cached ones (the port), and of the Pillow-decoded ones (the decoder)."""
    check = npz["check_features"]
    ported, _ = model.predict(npz["check_images"].astype(np.float32),
                              verbose=0)

    def cosines(features):
        reference = check[:len(features)]
        return np.sum(features * reference, 1) / (
            np.linalg.norm(features, axis=1)
            * np.linalg.norm(reference, axis=1))

    decoded = cosines(query_features[:len(check)])
    return {"rows": len(check), "min_cosine": float(cosines(ported).min()),
            "pillow_decode_min_cosine": float(decoded.min()),
            "pillow_decode_mean_cosine": float(decoded.mean())}


def head_only(npz, features, train, sets, labels):
    began = time.perf_counter()
    inputs = keras.Input((features.shape[1],))
    head = keras.Model(inputs, hash_head(inputs, npz))
    head.compile(optimizer=keras.optimizers.SGD(
        float(npz["learning_rate"]), momentum=0.9, nesterov=True),
        loss=PairLoss(npz))
    head.fit(TrainBatches(features[train], 2 * FLAGS.batch_images, 1,
                          FLAGS.seed), epochs=FLAGS.head_epochs, verbose=2)
    codes = head.predict(features, batch_size=2000, verbose=0)
    return {**evaluate(signs(codes), sets, labels),
            "seconds": round(time.perf_counter() - began, 1)}


def fine_tune(npz, weights, images, train, sets, labels, rate, epochs):
    began = time.perf_counter()
    keras.utils.set_random_seed(FLAGS.seed)
    model = image_model(npz, weights)
    trainer = keras.Model(model.inputs, model.outputs[1])
    trainer.compile(optimizer=keras.optimizers.Adam(rate),
                    loss=PairLoss(npz))
    history = trainer.fit(
        TrainBatches(images[train], FLAGS.batch_images, 2, FLAGS.seed),
        epochs=epochs, verbose=2)
    fitted = time.perf_counter() - began
    _, codes = model.predict(images.astype(np.float32), batch_size=500,
                             verbose=0)
    return {**evaluate(signs(codes), sets, labels),
            "loss": [float(v) for v in history.history["loss"]],
            "train_seconds": round(fitted, 1),
            "seconds": round(time.perf_counter() - began, 1)}


def _device_name():
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "cpu"


if __name__ == "__main__":
    app.run(main)
