"""End-to-end path (`trainable_backbone=true`) on a tiny in-memory image set.

The toy set has 4 classes of 24x24 images whose colour identifies the class;
`tiny_cnn` (two convs, a BatchNormalization, fixed-seed weights, 32 px
input) stands in for the real backbone, so one run of `run_experiment` takes
a few seconds on a CPU.
"""

import dataclasses
import json
import os
import shutil
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from uhga_tf import codes as codes_lib
from uhga_tf import config as config_lib
from uhga_tf import provenance
from uhga_tf.data import datasets
from uhga_tf.data import feature_cache
from uhga_tf.data import retrieval_sets
from uhga_tf.evaluation import metrics
from uhga_tf import saved_model
from uhga_tf.baselines import structural
from uhga_tf.models import backbone as backbone_lib
from uhga_tf.models import hash_layer
from uhga_tf.training import hash_optimizer
from uhga_tf.training import image_inputs
from uhga_tf.training import run
from uhga_tf.training import uhga_model

NUM_CLASSES, PER_CLASS, SIDE = 4, 48, 24
IMAGE_SIZE = backbone_lib.BACKBONES["tiny_cnn"].default_image_size  # 32
COLOURS = np.array(
    [[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 210, 40]], np.float64
)


def _toy_dataset(paths=False):
    """4 colour classes x 48 images, uint8 [192, 24, 24, 3] in memory.

    Each image's colour is 0.65 x its class colour + 0.35 x a random colour,
    plus pixel noise: the frozen tiny_cnn features rank well (cosine MAP
    0.96) without being trivially separable (16-bit codes of the untrained
    network: MAP 0.75; chance: about 0.25).
    """
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS).astype(np.int64)
    colours = 0.65 * COLOURS[labels] + 0.35 * rng.uniform(
        0, 255, size=(len(labels), 3)
    )
    texture = rng.normal(0.0, 30.0, size=(len(labels), SIDE, SIDE, 3))
    images = np.clip(colours[:, None, None, :] + texture, 0, 255)
    common = dict(
        name="toy",
        labels=labels,
        class_names=[f"class{c}" for c in range(NUM_CLASSES)],
        partition=np.array(["train"] * len(labels), dtype=object),
        source="memory",
    )
    if paths:
        return datasets.ImageDataset(
            paths=[f"/nonexistent/{i}.png" for i in range(len(labels))],
            **common,
        )
    return datasets.ImageDataset(images=images.astype(np.uint8), **common)


def _toy_sets(image_dataset, weights="default"):
    """Per class: 6 query, 24 train, 6 validation, 42 database rows;
    features of tiny_cnn with `weights`."""
    query, train, validation, database = [], [], [], []
    for c in range(NUM_CLASSES):
        rows = np.flatnonzero(image_dataset.labels == c)
        query.extend(rows[:6])
        database.extend(rows[6:])
        train.extend(rows[6:30])
        validation.extend(rows[30:36])
    indices = {
        "train": np.array(train), "query": np.array(query),
        "database": np.array(database), "validation": np.array(validation),
    }
    backbone = backbone_lib.build_backbone("tiny_cnn", weights=weights)
    everything = np.arange(image_dataset.num_examples)
    features = feature_cache.extract_features(
        backbone, image_dataset.to_tf_dataset(everything, IMAGE_SIZE, 64),
        len(everything), progress=False,
    )
    return retrieval_sets.RetrievalSets(
        features={n: features[i] for n, i in indices.items()},
        labels={n: image_dataset.labels[i] for n, i in indices.items()},
        indices=indices,
        feature_dim=features.shape[1],
        description="toy colours, tiny_cnn",
        image_dataset=image_dataset,
    )


def _experiment(workdir, **overrides):
    values = dict(
        dataset="cifar10",  # the sets are injected; only not "features"
        backbone="tiny_cnn",
        trainable_backbone=True,
        dropout_rate=0.25,
        code_length=16,
        global_batch_size=32,
        epochs=2,
        eval_every_epochs=1,
        checkpoint_every_steps=100,
        learning_rate=0.01,
        hash_lr_multiplier=10.0,
        positive_weight="auto",
        # The toy features are too clean for the SSDH thresholds (no pair
        # falls below m - lambda * sigma); cut at the within/across gap.
        similarity="threshold",
        similarity_threshold=0.08,
        dissimilarity_threshold=0.25,
        attention_hidden=16,
        workdir=str(workdir),
        progress=False,
    )
    values.update(overrides)
    return config_lib.experiment_from_flat(values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-epoch end-to-end run (12 steps); its sets, result and workdir."""
    workdir = tmp_path_factory.mktemp("e2e") / "run"
    sets = _toy_sets(_toy_dataset())
    result = run.run_experiment(_experiment(workdir), sets=sets)
    return sets, result, workdir


def _load_hasher(workdir):
    return keras.saving.load_model(str(workdir / "hasher.keras"))


def test_config_accepts_trainable_backbone_and_checks_dropout():
    model = config_lib.ModelConfig(trainable_backbone=True, dropout_rate=0.5)
    assert model.trainable_backbone and model.dropout_rate == 0.5
    with pytest.raises(ValueError, match="dropout_rate must be in"):
        config_lib.ModelConfig(dropout_rate=1.0)


def test_refuses_features_dataset_and_lazy_images(tmp_path):
    experiment = _experiment(tmp_path / "a", dataset="features",
                             data_dir=str(tmp_path / "f.npz"))
    with pytest.raises(ValueError, match="dataset='features'"):
        run.run_experiment(experiment)
    assert not (tmp_path / "a").exists()

    lazy = _toy_dataset(paths=True)
    sets = retrieval_sets.RetrievalSets(
        features={}, labels={}, indices={}, feature_dim=16,
        description="lazy", image_dataset=lazy,
    )
    with pytest.raises(ValueError, match="not supported yet"):
        image_inputs.image_dataset_of(sets)
    with pytest.raises(ValueError, match="without an image dataset"):
        image_inputs.image_dataset_of(
            retrieval_sets.RetrievalSets({}, {}, {}, 16, "features")
        )


def test_image_hasher_multipliers_and_frozen_batch_norm():
    keras.utils.set_random_seed(0)
    hasher = hash_layer.build_image_hasher(
        backbone_lib.build_backbone("tiny_cnn"), 16, dropout_rate=0.5
    )
    matrix = np.zeros((8, 8), np.int8)
    model = uhga_model.UHGAModel(
        hasher, matrix, config_lib.LossConfig(positive_weight=1.0),
        config_lib.AttentionConfig(attention=False),
    )
    optimizer = hash_optimizer.HashOptimizer(0.01, hash_lr_multiplier=10.0)
    model.compile(hash_optimizer=optimizer)
    by_path = {
        v.path: m for v, m in zip(hasher.trainable_variables,
                                  optimizer.lr_multipliers)
    }
    # The hash layer at 10x, the backbone convs at 1x, BN not trained.
    assert sorted(p for p, m in by_path.items() if m == 10.0) == [
        "hash_layer/bias", "hash_layer/kernel"
    ]
    assert sorted(p for p, m in by_path.items() if m == 1.0) == [
        "conv1/bias", "conv1/kernel", "conv2/bias", "conv2/kernel"
    ]
    backbone, head = hash_layer.split_image_hasher(hasher)
    assert backbone.name == "tiny_cnn" and head.name == "hash_head"


def _seed_states(hasher):
    states = {
        id(sg.state)
        for layer in hasher._flatten_layers()
        for sg in getattr(layer, "_seed_generators", [])
    }
    return [i for i, v in enumerate(hasher.non_trainable_variables)
            if id(v) in states]


def _mask_model(lookahead):
    """Image hasher with dropout 0.5 and GA; float64 for tight checks."""
    keras.config.set_floatx("float64")
    try:
        keras.utils.set_random_seed(3)
        hasher = hash_layer.build_image_hasher(
            backbone_lib.build_backbone("tiny_cnn"), 8, dropout_rate=0.5
        )
        rng = np.random.default_rng(1)
        matrix = rng.choice([-1, 0, 1], size=(16, 16)).astype(np.int8)
        model = uhga_model.UHGAModel(
            hasher, matrix, config_lib.LossConfig(positive_weight=3.0),
            config_lib.AttentionConfig(lookahead=lookahead,
                                       attention_hidden=8),
            attention_dtype="float64", seed=0,
        )
        model.compile(
            hash_optimizer=hash_optimizer.HashOptimizer(0.5),
            attention_optimizer=keras.optimizers.Adam(0.01, epsilon=1e-8),
        )
    finally:
        keras.config.set_floatx("float32")
    shape = (16, IMAGE_SIZE, IMAGE_SIZE, 3)
    images = tf.constant(
        np.random.default_rng(2).uniform(0, 255, shape), tf.float64
    )
    index = tf.range(16, dtype=tf.int32)
    data = ((images[:8], index[:8]), (images[8:], index[8:]))
    return model, data


def test_dropout_mask_is_shared_by_every_pass_of_a_step():
    """JVP (19') equals the literal second-order gradient only if the JVP
    pass at W sees the first pass's mask; the look-ahead loss equals a
    recomputation at W' with the pre-step seed state and differs with the
    advanced one; a per-pass mask (simulated) breaks the agreement."""
    model, data = _mask_model("jvp")
    hasher = model.hasher
    seeds = _seed_states(hasher)
    assert len(seeds) == 1  # the feature dropout (tiny_cnn has none)
    before = [tf.convert_to_tensor(v) for v in hasher.non_trainable_variables]

    out = model.compute_step(data)
    jvp = out["attention_grads"]
    model.lookahead = "second_order"
    second = model.compute_step(data)["attention_grads"]
    # The output bias of the attention MLP gets no gradient (budget
    # normalisation), as in tests/test_uhga_model.py.
    for a, b in zip(jvp[:3], second[:3]):
        assert np.abs(b.numpy()).max() > 1e-9
        # float32: faiss, imported by other tests, changes the thread count
        # and so the summation order; 1e-9 is still far below the values.
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6,
                                   atol=1e-9)

    # The look-ahead loss is that of W' under the pre-step mask.
    images = tf.concat([data[0][0], data[1][0]], axis=0)
    similarity_block = model.similarity_block(data[0][1], data[1][1])
    scale = model.current_scale(model.step + 1)

    def lookahead_loss(non_trainable):
        codes, _ = model._forward(out["new_values"], non_trainable, images,
                                  scale)
        return float(model.hashing_loss.value(codes, 8, similarity_block))

    assert lookahead_loss(before) == pytest.approx(
        float(out["lookahead_loss"]), rel=1e-12
    )
    advanced = out["new_non_trainable"]
    assert not np.array_equal(advanced[seeds[0]], before[seeds[0]])
    assert abs(lookahead_loss(advanced) - float(out["lookahead_loss"])) > 1e-6

    # Control: a fresh mask per pass makes JVP and second order disagree.
    original = model._forward
    calls = []

    def per_pass_mask(values, non_trainable, features, scale):
        calls.append(None)
        non_trainable = list(non_trainable)
        state = non_trainable[seeds[0]]
        non_trainable[seeds[0]] = state + tf.cast(len(calls), state.dtype)
        return original(values, non_trainable, features, scale)

    model._forward = per_pass_mask
    model.lookahead = "jvp"
    broken = model.compute_step(data)["attention_grads"]
    model.lookahead = "second_order"
    calls.clear()
    broken_second = model.compute_step(data)["attention_grads"]
    gap = max(
        float(np.abs(a.numpy() - b.numpy()).max())
        for a, b in zip(broken[:3], broken_second[:3])
    )
    assert gap > 1e-4, gap
    model._forward = original

    # One train step advances the seed state once (a new mask next step).
    model.lookahead = "jvp"
    model.train_step(data)
    after = hasher.non_trainable_variables[seeds[0]].numpy()
    np.testing.assert_array_equal(after, advanced[seeds[0]].numpy())


def test_structure_start_reaches_the_end_to_end_head():
    # hash_init=structure starts the fine-tuned head where the frozen path's
    # starts: at the k-means+LS map of the cached (pre-fine-tuning)
    # features, so the untrained image hasher gives its codes.
    sets = _toy_sets(_toy_dataset())
    experiment = _experiment(
        "unused", hash_init="structure", feature_centring=True,
        feature_unit_rows=True, similarity_knn=5, similarity_cluster_size=8,
    )
    hasher = run.build_hasher(experiment, types.SimpleNamespace(
        train_features=sets.features["train"], sets=sets))
    head = hasher.get_layer(hash_layer.HASH_HEAD_NAME)
    centred = np.asarray(
        head.get_layer("feature_centring")(sets.features["train"]))
    kernel, bias = structural.structure_hash_map(
        centred, 16, experiment.train.seed, knn=5, cluster_size=8)
    layer = head.get_layer("hash_layer")
    np.testing.assert_allclose(layer.kernel.numpy(), kernel, rtol=1e-6)
    np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-6)
    encoder = image_inputs.ImageEncoder(
        hasher, sets, sets.image_dataset, IMAGE_SIZE, batch_size=40)
    expected = codes_lib.binarize(centred @ kernel + bias)
    agree = np.mean(codes_lib.binarize(encoder("train")) == expected)
    assert agree > 0.999, agree


def test_end_to_end_run_fine_tunes_and_encodes_images(trained):
    sets, result, workdir = trained
    assert result["steps"] == 2 * (96 // 16)
    hasher = _load_hasher(workdir)
    backbone, head = hash_layer.split_image_hasher(hasher)
    fresh = backbone_lib.build_backbone("tiny_cnn")
    for name in ("conv1", "conv2"):
        change = np.abs(
            backbone.get_layer(name).kernel.numpy()
            - fresh.get_layer(name).kernel.numpy()
        ).max()
        assert change > 1e-4, (name, change)
    # BatchNormalization kept its (inference-mode) statistics and affine.
    for got, want in zip(backbone.get_layer("bn1").get_weights(),
                         fresh.get_layer("bn1").get_weights()):
        np.testing.assert_array_equal(got, want)
    # The reported MAP is that of codes from the images through the saved,
    # fine-tuned network (no-op or cached-feature encodings would differ).
    encoder = image_inputs.ImageEncoder(
        hasher, sets, sets.image_dataset, IMAGE_SIZE, batch_size=40
    )
    query = codes_lib.binarize(encoder("query"))
    database = codes_lib.binarize(encoder("database"))
    expected = metrics.mean_average_precision(
        query, database, sets.labels["query"], sets.labels["database"]
    )
    assert result["map"] == pytest.approx(expected, abs=1e-12)
    # Chance is about 0.25 for 4 balanced classes (this run: 0.73).
    assert result["map"] > 0.6, result["map"]
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["validation_map"] > 0.5 for r in records), records
    assert records[1]["pair_loss"] < records[0]["pair_loss"], records


def test_export_of_end_to_end_workdir_reproduces_codes(trained, tmp_path):
    sets, _, workdir = trained
    target = saved_model.export_from_checkpoint(
        str(workdir), str(tmp_path / "export")
    )
    hasher = _load_hasher(workdir)
    encoder = image_inputs.ImageEncoder(
        hasher, sets, sets.image_dataset, IMAGE_SIZE
    )
    relaxed = encoder("query")
    loaded = tf.saved_model.load(target)
    pixels = sets.image_dataset.images[sets.indices["query"]]
    got = loaded.signatures["encode_images"](images=tf.constant(pixels))
    firm = np.abs(relaxed) >= 1e-4
    np.testing.assert_array_equal(
        got["codes"].numpy()[firm], codes_lib.binarize(relaxed)[firm]
    )
    info = json.load(open(f"{target}/assets.extra/uhga_tf.json"))
    assert info["trainable_backbone"] is True
    assert info["image_size"] == IMAGE_SIZE


def test_resume_replays_the_uninterrupted_run(trained, tmp_path):
    """1 epoch, then a rerun to 2 epochs == the 2-epoch run, bit for bit
    (weights, momenta and the dropout seed state are checkpointed; the image
    branches replay `run.branch_indices`)."""
    sets, result, workdir = trained
    resumed = tmp_path / "resumed"
    run.run_experiment(_experiment(resumed, epochs=1), sets=sets)
    second = run.run_experiment(_experiment(resumed, epochs=2), sets=sets)
    assert second["steps"] == result["steps"]
    assert second["map"] == result["map"]
    for got, want in zip(_load_hasher(resumed).get_weights(),
                         _load_hasher(workdir).get_weights()):
        np.testing.assert_array_equal(got, want)


# --- Fine-tuning options (benchmarks/finetune_probe.py's recipe) -----------


def test_adam_step_is_keras_adam():
    # Three steps from the same start with the same gradients; no L2 (Keras
    # Adam's weight decay is decoupled, ours is coupled as in eq. (18)).
    start = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
    grads = [np.array([[0.1, -0.2], [0.3, 0.0]], np.float32) * (i + 1)
             for i in range(3)]
    ours = hash_optimizer.HashOptimizer(
        learning_rate=0.01, weight_decay=0.0, optimizer="adam",
        hash_lr_multiplier=1.0)
    variable = tf.Variable(start)
    ours.build([variable])
    assert len(ours.momenta) == 2
    reference = keras.optimizers.Adam(0.01, beta_1=0.9, beta_2=0.999,
                                      epsilon=1e-7)
    expected = keras.Variable(start)
    for grad in grads:
        ours.apply([tf.constant(grad)], [variable])
        reference.apply([tf.constant(grad)], [expected])
    np.testing.assert_allclose(variable.numpy(), expected.numpy(), rtol=1e-5)
    # The first step moves every weight by about lr against its gradient.
    first = hash_optimizer.HashOptimizer(
        learning_rate=0.01, weight_decay=0.0, optimizer="adam")
    one = tf.Variable(start)
    first.build([one])
    first.apply([tf.constant(grads[0])], [one])
    np.testing.assert_allclose(start - one.numpy(),
                               0.01 * np.sign(grads[0]), atol=1e-6)
    with pytest.raises(ValueError, match="look-ahead"):
        ours.gradient_tangents([variable], [tf.constant(grads[0])], 0.01)


def test_fine_tuning_options_are_checked():
    with pytest.raises(ValueError, match="attention=false"):
        _experiment("unused", optimizer="adam")
    with pytest.raises(ValueError, match="trainable_backbone=False"):
        _experiment("unused", trainable_backbone=False,
                    image_augmentation=True)
    with pytest.raises(ValueError, match="paired_views"):
        _experiment("unused", paired_views=True, pairing="within",
                    global_batch_size=33)
    with pytest.raises(ValueError, match="optimizer"):
        _experiment("unused", optimizer="rmsprop")
    # At their defaults the new fields leave a stored config's digest as is.
    digest = config_lib.digest_dict(_experiment("unused"))
    assert "optimizer" not in digest["train"]
    assert "image_augmentation" not in digest["model"]


def test_crop_flip_and_jitter():
    images = tf.constant(
        np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3))
    pads = (1, 1)
    # Offset (1, 1) into the 1-pixel padding is the image itself.
    same = image_inputs.crop_and_flip(
        images, pads, tf.constant([[1, 1], [1, 1]]), tf.constant([False] * 2))
    np.testing.assert_array_equal(same.numpy(), images.numpy())
    # Offset (0, 2): one reflected row on top, shifted one column left;
    # flipped: the columns reversed.
    moved = image_inputs.crop_and_flip(
        images, pads, tf.constant([[0, 2], [0, 2]]),
        tf.constant([False, True])).numpy()
    np.testing.assert_array_equal(moved[0, 0, :7], images.numpy()[0, 1, 1:])
    np.testing.assert_array_equal(moved[0, 1:, :7], images.numpy()[0, :7, 1:])
    np.testing.assert_array_equal(
        moved[1][:, ::-1][1:, :7], images.numpy()[1, :7, 1:])
    flat = tf.fill([1, 2, 2, 3], 100.0)
    out = image_inputs.jitter(flat, tf.constant([1.5]), tf.constant([10.0]))
    np.testing.assert_allclose(out.numpy(), 110.0)
    bright = image_inputs.jitter(tf.fill([1, 2, 2, 3], 250.0),
                                 tf.constant([1.0]), tf.constant([20.0]))
    np.testing.assert_allclose(bright.numpy(), 255.0)


def test_augmentation_follows_its_seed():
    images = tf.constant(_toy_dataset().images[:16], tf.float32)
    seed = tf.constant([0, 7], tf.int64)
    first = image_inputs.augment_images(images, seed).numpy()
    again = image_inputs.augment_images(images, seed).numpy()
    other = image_inputs.augment_images(
        images, tf.constant([0, 8], tf.int64)).numpy()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1.0
    assert first.min() >= 0.0 and first.max() <= 255.0
    assert np.abs(first - images.numpy()).mean() > 1.0


def test_paired_views_share_their_rows():
    experiment = _experiment("unused", paired_views=True)
    first, second = run._branch_rows(experiment, 96, 0, 12, replicas=1)
    np.testing.assert_array_equal(first, second)
    plain = run._branch_rows(_experiment("unused"), 96, 0, 12, replicas=1)
    assert not np.array_equal(*plain)


def test_paired_views_within_hold_each_row_twice_per_replica():
    experiment = _experiment("unused", paired_views=True, pairing="within")
    # 32 rows a step: 16 train rows, each twice, so 96 rows fill 6 steps.
    assert run.distinct_batch_size(experiment) == 16
    (rows,) = run._branch_rows(experiment, 96, 0, 6, replicas=2)
    assert rows.shape == (6, 32)
    halves = rows.reshape(6, 2, 2, 8)  # step, replica, view, row
    np.testing.assert_array_equal(halves[:, :, 0], halves[:, :, 1])
    # One epoch visits every train row once (per view).
    np.testing.assert_array_equal(
        np.sort(halves[:, :, 0].reshape(-1)), np.arange(96))


@pytest.mark.parametrize("pairing", ["cross", "within"])
def test_adam_augmented_paired_run_fine_tunes_and_resumes(tmp_path, pairing):
    """The probe's recipe in the product: Adam, augmented paired views, the
    k-means+LS start; it trains the backbone and a resumed run replays it
    bit for bit (Adam's moments and the views are reproduced)."""
    sets = _toy_sets(_toy_dataset())
    options = dict(
        pairing=pairing,
        optimizer="adam", learning_rate=1e-3, hash_lr_multiplier=1.0,
        weight_decay=0.0, attention=False, image_augmentation=True,
        paired_views=True, hash_init="structure", feature_centring=True,
        feature_unit_rows=True, similarity_knn=5, similarity_cluster_size=8,
    )
    whole = tmp_path / "whole"
    result = run.run_experiment(_experiment(whole, **options), sets=sets)
    assert result["map"] > 0.6, result["map"]
    backbone, _ = hash_layer.split_image_hasher(_load_hasher(whole))
    fresh = backbone_lib.build_backbone("tiny_cnn")
    change = np.abs(backbone.get_layer("conv1").kernel.numpy()
                    - fresh.get_layer("conv1").kernel.numpy()).max()
    assert change > 1e-4, change
    # The run leaves its fine-tuned backbone where --backbone_weights reads.
    written = backbone_lib.build_backbone("tiny_cnn", weights=str(
        whole / backbone_lib.FINE_TUNED_WEIGHTS_FILE))
    for got, want in zip(written.get_weights(), backbone.get_weights()):
        np.testing.assert_array_equal(got, want)
    resumed = tmp_path / "resumed"
    run.run_experiment(_experiment(resumed, **options, epochs=1), sets=sets)
    again = run.run_experiment(_experiment(resumed, **options), sets=sets)
    assert again["map"] == result["map"]
    for got, want in zip(_load_hasher(resumed).get_weights(),
                         _load_hasher(whole).get_weights()):
        np.testing.assert_array_equal(got, want)


def test_paired_within_adam_step_is_keras_adam_on_the_pair_loss(tmp_path):
    """Two steps of the product's fine-tuning step (within pairing, two
    copies of each image, l2 loss, Adam) equal two Keras Adam steps on
    mean((u u^T / K - S)^2) over every pair of the batch, taken with a
    plain tape: the step `benchmarks/finetune_probe.py` takes."""
    sets = _toy_sets(_toy_dataset())
    experiment = _experiment(
        tmp_path / "run", optimizer="adam", learning_rate=1e-3,
        hash_lr_multiplier=1.0, weight_decay=0.0, attention=False,
        paired_views=True, pairing="within", loss="l2", dropout_rate=0.0,
        scale_schedule="none", global_batch_size=16)
    strategy = run.prepare(experiment)
    inputs = run.load_inputs(experiment, sets, chief=True)
    matrix = run.build_similarity(experiment, inputs.train_features)
    with strategy.scope():
        model = run.build_model(experiment, inputs, matrix, strategy)
    hasher = model.hasher
    reference = [keras.Variable(v.numpy()) for v in hasher.trainable_variables]
    fixed = [v.numpy() for v in hasher.non_trainable_variables]
    adam = keras.optimizers.Adam(1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    images = tf.constant(inputs.train_images)
    for rows in ([0, 5, 9, 14, 20, 33, 41, 60], [2, 7, 11, 19, 25, 30, 50, 90]):
        index = tf.constant(rows + rows)
        batch = image_inputs.gather_images(images, index, IMAGE_SIZE)
        target = tf.cast(model.similarity_block(index, index), tf.float32)
        with tf.GradientTape() as tape:
            logits, _ = hasher.stateless_call(
                [v.value for v in reference], fixed, batch, training=True)
            codes = tf.tanh(logits)
            loss = tf.reduce_mean(tf.square(
                tf.matmul(codes, codes, transpose_b=True) / 16.0 - target))
        adam.apply(tape.gradient(loss, reference), reference)
        model.train_step((batch, index))
    for got, want in zip(hasher.trainable_variables, reference):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-6)


def test_stock_similarity_features_join_the_stock_rows_of_the_same_split(
        tmp_path, monkeypatch):
    """Stage two with similarity_stock_features: S's graph (and the start's)
    reads each train row's stock and fine-tuned unit rows side by side,
    the stock ones read on the split the fine-tuned sets were drawn with;
    the head still reads the fine-tuned rows alone."""
    from uhga_tf.similarity import features as features_lib

    stock = dataclasses.replace(_toy_sets(_toy_dataset()), split_seed=5)
    # Stand-in for a fine-tuned backbone's features of the same rows.
    tuned = dataclasses.replace(stock, features={
        name: features[:, ::-1] + 1.0
        for name, features in stock.features.items()})
    experiment = _experiment(
        tmp_path / "run", trainable_backbone=False,
        backbone_weights=str(tmp_path / "tuned.weights.h5"),
        similarity_stock_features=True, similarity="coassociation",
        similarity_knn=5, similarity_cluster_size=8, hash_init="structure",
        feature_centring=True, feature_unit_rows=True, epochs=1)
    loads = []

    def load(data, model, seed, progress=True):
        loads.append((model.backbone_weights, seed))
        return stock

    monkeypatch.setattr(run.retrieval_sets, "load_retrieval_sets", load)
    rows = run.stock_similarity_features(experiment, tuned)
    assert loads == [("default", 5)]
    first = features_lib.unit_rows(stock.features["train"])
    second = features_lib.unit_rows(tuned.features["train"])
    np.testing.assert_allclose(rows, np.concatenate([first, second], 1))
    # Their cosine is the mean of the two backbones' cosines.
    np.testing.assert_allclose(
        features_lib.unit_rows(rows[:5]) @ features_lib.unit_rows(
            rows[5:10]).T,
        (first[:5] @ first[5:10].T + second[:5] @ second[5:10].T) / 2,
        atol=1e-6)

    built_on = []
    build = run.build_similarity

    def recording_build(experiment, features):
        built_on.append(features)
        return build(experiment, features)

    monkeypatch.setattr(run, "build_similarity", recording_build)
    result = run.run_experiment(experiment, sets=tuned)
    np.testing.assert_allclose(built_on[0], rows)
    assert 0.0 < result["validation_map"] <= 1.0
    # The head (and so the exported model) reads the tuned rows alone.
    hasher = _load_hasher(tmp_path / "run")
    np.testing.assert_allclose(
        hasher.get_layer("feature_centring").mean.numpy(),
        second.mean(axis=0), atol=1e-6)

    with pytest.raises(ValueError, match="do not record the seed"):
        run.stock_similarity_features(
            experiment, dataclasses.replace(tuned, split_seed=None))
    shuffled = dict(tuned.indices, train=tuned.indices["train"][::-1])
    with pytest.raises(ValueError, match="not these sets' train rows"):
        run.stock_similarity_features(
            experiment, dataclasses.replace(tuned, indices=shuffled))
    for overrides in ({"backbone_weights": "default"},
                      {"trainable_backbone": True}):
        with pytest.raises(ValueError, match="similarity_stock_features"):
            config_lib.with_values(experiment, overrides)


def test_stage_one_is_trained_once_and_read_back(tmp_path, monkeypatch):
    """The two-stage recipe's stage one: FINE_TUNE_RECIPE over the base
    flags, stored under <cache_dir>/fine_tuned/ by its experiment's digest
    (the same name in any cache_dir), read back instead of trained again,
    and its backbone named by content wherever it lies."""
    from uhga_tf.training import fine_tune

    sets = _toy_sets(_toy_dataset())
    base = _experiment(tmp_path / "unused", trainable_backbone=False,
                       cache_dir=str(tmp_path / "cache"))
    stage_one = fine_tune.stage_one_experiment(base, seed=3)
    assert stage_one.train.seed == 3
    assert stage_one.model.trainable_backbone
    assert stage_one.model.code_length == 64
    assert stage_one.loss.pairing == "within"
    assert stage_one.train.epochs == 2
    elsewhere = fine_tune.stage_one_experiment(config_lib.with_values(
        base, {"cache_dir": str(tmp_path / "other")}), seed=3)
    assert (os.path.basename(elsewhere.workdir)
            == os.path.basename(stage_one.workdir))
    assert fine_tune.stage_one_experiment(base, seed=4).workdir != (
        stage_one.workdir)

    # The toy features have 16 dimensions: a 16-bit stage one.
    monkeypatch.setitem(config_lib.FINE_TUNE_RECIPE, "code_length", 16)
    stage_one = fine_tune.stage_one_experiment(base, seed=3)
    record = fine_tune.fine_tuned_backbone(base, 3, sets)
    assert record["weights"] == os.path.join(
        stage_one.workdir, backbone_lib.FINE_TUNED_WEIGHTS_FILE)
    assert record["steps"] == 12  # 2 epochs of 96 rows, 16 distinct a batch
    assert 0.0 < record["validation_map"] <= 1.0

    def no_training(*args, **kwargs):
        raise AssertionError("stage one was trained again")

    with monkeypatch.context() as patch:
        patch.setattr(fine_tune.run_lib, "run_experiment", no_training)
        assert fine_tune.fine_tuned_backbone(base, 3, sets) == record
        # Without sets, stage one draws the base's split (seed 0), not
        # its own seed's, whose train rows overlap stage two's queries.
        split_seeds = []

        def load(data, model, seed, progress=True):
            split_seeds.append(seed)
            return sets

        trained_on = []

        def train(experiment, sets=None):
            trained_on.append(sets)
            raise AssertionError("stop before training")

        patch.setattr(fine_tune.retrieval_sets, "load_retrieval_sets", load)
        assert fine_tune.fine_tuned_backbone(base, 3) == record
        patch.setattr(fine_tune.run_lib, "run_experiment", train)
        with pytest.raises(AssertionError, match="stop before training"):
            fine_tune.fine_tuned_backbone(base, 5)
        assert split_seeds == [base.train.seed] == [0]
        assert trained_on == [sets]
        # An entry trained on other rows (another split) is refused.
        other = dataclasses.replace(sets, description="split seed 1")
        with pytest.raises(ValueError, match="trained on other data"):
            fine_tune.fine_tuned_backbone(base, 3, other)
    assert record["stage_one_data"] == sets.description
    assert record["commit"] == provenance.git_sha()
    # A changed recipe or base names another store entry: results on this
    # record's backbone are stale (benchmarks/check_cells.py).
    assert fine_tune.record_is_current(base, record)
    # Given the stock sets' description, a stage one on other rows is not.
    assert fine_tune.record_is_current(base, record, sets.description)
    assert not fine_tune.record_is_current(base, record, "split seed 1")
    assert not fine_tune.record_is_current(
        config_lib.with_values(base, {"similarity_knn": 7}), record)
    with monkeypatch.context() as patch:
        patch.setitem(config_lib.FINE_TUNE_RECIPE, "epochs", 3)
        assert not fine_tune.record_is_current(base, record)

    copy = tmp_path / "copy.weights.h5"
    shutil.copyfile(record["weights"], copy)
    assert backbone_lib.weights_identity(str(copy)) == (
        record["weights_identity"])
    digests = [provenance.experiment_digest(config_lib.with_values(
        base, {"backbone_weights": path}))
        for path in (record["weights"], str(copy))]
    assert digests[0] == digests[1]
    assert digests[0]["model"]["backbone_weights"].startswith("sha256:")
    assert provenance.experiment_digest(base)["model"]["backbone_weights"] == (
        "default")


def test_a_second_round_starts_from_the_first_rounds_backbone(
        tmp_path, monkeypatch):
    """rounds=2: round two fine-tunes round one's backbone on S rebuilt from
    that backbone's features (the base's split seed), in a store entry of
    its own; the record is round two's, round one's under earlier_rounds."""
    from uhga_tf.training import fine_tune

    dataset = _toy_dataset()
    sets = _toy_sets(dataset)
    base = _experiment(tmp_path / "unused", trainable_backbone=False,
                       cache_dir=str(tmp_path / "cache"), seed=5)
    monkeypatch.setitem(config_lib.FINE_TUNE_RECIPE, "code_length", 16)
    monkeypatch.setitem(config_lib.FINE_TUNE_RECIPE, "epochs", 1)
    loaded = []

    def load_retrieval_sets(data, model, seed, progress=True):
        loaded.append((model.backbone_weights, seed))
        return _toy_sets(dataset, weights=model.backbone_weights)

    monkeypatch.setattr(
        fine_tune.retrieval_sets, "load_retrieval_sets", load_retrieval_sets)
    record = fine_tune.fine_tuned_backbone(base, 3, sets, rounds=2)
    (first,) = record["earlier_rounds"]
    assert loaded == [(first["weights"], 5)]
    assert record["rounds"] == 2
    assert first["start_weights"] == "default"
    assert record["start_weights"] == first["weights_identity"]
    assert record["weights_identity"] != first["weights_identity"]
    assert record["workdir"] != first["workdir"]
    assert record["steps"] == first["steps"] == 6  # 1 epoch
    assert record["experiment"]["model"]["backbone_weights"] == (
        first["weights"])
    assert "experiment" not in first
    assert fine_tune.record_is_current(base, record)
    # Given the stock sets' description, a stage one on other rows is not.
    assert fine_tune.record_is_current(base, record, sets.description)
    assert not fine_tune.record_is_current(base, record, "split seed 1")
    stale = {**record, "earlier_rounds": [
        {**first, "weights_identity": "sha256:" + "0" * 64}]}
    assert not fine_tune.record_is_current(base, stale)
    # Round one is the one-round stage one, read back, not trained again.
    one_round = fine_tune.fine_tuned_backbone(base, 3, sets)
    assert one_round["rounds"] == 1
    assert {k: v for k, v in one_round.items()
            if k not in ("experiment", "rounds")} == first
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        fine_tune.fine_tuned_backbone(base, 3, sets, rounds=0)

    # Stage two: a frozen run on the fine-tuned backbone's features, whose
    # export carries that backbone (images in, the stage-two codes out).
    tuned_sets = _toy_sets(sets.image_dataset, weights=record["weights"])
    assert np.abs(tuned_sets.features["query"]
                  - sets.features["query"]).max() > 1e-3
    stage_two = tmp_path / "stage_two"
    run.run_experiment(config_lib.with_values(base, {
        "trainable_backbone": False, "backbone_weights": record["weights"],
        "workdir": str(stage_two)}), sets=tuned_sets)
    target = saved_model.export_from_checkpoint(
        str(stage_two), str(tmp_path / "export"))
    relaxed = _load_hasher(stage_two).predict(
        tuned_sets.features["query"], verbose=0)
    pixels = sets.image_dataset.images[sets.indices["query"]]
    got = tf.saved_model.load(target).signatures["encode_images"](
        images=tf.constant(pixels))["codes"].numpy()
    firm = np.abs(relaxed) >= 1e-4
    np.testing.assert_array_equal(
        got[firm], codes_lib.binarize(relaxed)[firm])
