"""run_experiment(config): features -> similarity matrix -> UHGA fit -> MAP.

Two paths share everything but the hasher's input: the default trains the
hash head on frozen, cached backbone features; `trainable_backbone=true`
fine-tunes backbone + head end to end on the train images (gathered by the
same step-deterministic branch indices) and encodes every set from its
images. The similarity matrix always comes from the cached features.

Resumable: a rerun with the same config restores the newest complete
checkpoint (model, attention net, both optimizers with their slots, the
in-graph step that drives the scale and lr schedules, and the seed
generator) and continues the exact same data order, which is a pure function
of (seed, branch, epoch).

`run_experiment` reads as its steps, like a Model Garden task:
`prepare` -> `load_inputs` -> `build_similarity` -> `build_model` ->
`restore_or_start` -> `build_callbacks` -> `fit` -> `evaluate_final`.
This module imports TensorFlow; entry points import it after flag parsing.
"""

import dataclasses
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from uhga_tf import codes as codes_lib
from uhga_tf import config
from uhga_tf import io_utils
from uhga_tf import provenance
from uhga_tf import similarity
from uhga_tf.baselines import references
from uhga_tf.data import retrieval_sets
from uhga_tf.evaluation import cosine
from uhga_tf.evaluation import metrics
from uhga_tf.models import backbone as backbone_lib
from uhga_tf.models import hash_layer
from uhga_tf.similarity import features as features_lib
from uhga_tf.training import callbacks as callbacks_lib
from uhga_tf.training import checkpoints
from uhga_tf.training import hash_optimizer
from uhga_tf.training import image_inputs
from uhga_tf.training import uhga_model

# Final metrics and the code commit in the workdir, written last: its
# presence marks a finished run.
RESULTS_FILE = "results.json"

# Config fields that may change between a run and its resumption; every other
# field defines the model, and a workdir holding another model is refused.
_RESUMABLE_FIELDS = {
    "epochs", "eval_every_epochs", "checkpoint_every_steps",
    "keep_checkpoints", "progress", "logdir", "workdir", "strategy",
    "data_dir", "cache_dir", "top_k", "ap_denominator", "empty_query",
    "hamming_radius",
}


def method_name(experiment):
    """Table-2 row name of a config (method.md §14)."""
    base = "SSDH" if experiment.loss.loss == "ssdh_l2" else "Ours"
    return base + ("+GA" if experiment.attention.attention else "")


def make_strategy(name):
    """Build the tf.distribute strategy named by `TrainConfig.strategy`."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    tf_config = os.environ.get("TF_CONFIG")
    if not tf_config:
        raise ValueError(
            "strategy=multi_worker needs the TF_CONFIG environment variable "
            "(JSON with 'cluster' and 'task'); received none"
        )
    try:
        parsed = json.loads(tf_config)
        cluster, task = parsed["cluster"], parsed["task"]
        workers = cluster[task["type"]]
        if not 0 <= int(task["index"]) < len(workers):
            raise ValueError("task index out of range")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            "TF_CONFIG must be JSON like {\"cluster\": {\"worker\": "
            "[\"host:port\", ...]}, \"task\": {\"type\": \"worker\", "
            f"\"index\": 0}}}}; received {tf_config!r} ({e})"
        ) from e
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy):
    """True on the worker that owns the workdir (single process: always)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return (
        not has_chief
        and resolver.task_type == "worker"
        and resolver.task_id == 0
    )


def check_workdir(experiment):
    """Refuse a workdir that holds a run of a different model."""
    config.check_writable_dir(experiment.workdir, "workdir")
    path = os.path.join(experiment.workdir, "config.json")
    if not os.path.exists(path):
        return
    stored = config.read_json(path)
    new = experiment.to_dict()
    # A field added after the stored run was written takes its default there.
    defaults = type(experiment)().to_dict()
    differing = []
    for section, fields in new.items():
        if not isinstance(fields, dict):
            continue
        for name, value in fields.items():
            if name in _RESUMABLE_FIELDS:
                continue
            old = stored.get(section, {}).get(
                name, defaults.get(section, {}).get(name, "<missing>")
            )
            # config.json of an older run may spell a value differently
            # (positive_weight "auto", ssdh_alpha -1.0 for unset).
            if old != "<missing>":
                old = config.canonical_value(name, old)
            if old != value:
                differing.append(f"{name}: stored {old!r}, requested {value!r}")
    if differing:
        raise ValueError(
            f"workdir {experiment.workdir!r} holds a checkpoint of another "
            f"model ({'; '.join(differing[:5])}); use a new workdir or "
            "delete the old one"
        )


def branch_batch_size(experiment):
    """Images per branch per step (global, over all replicas)."""
    if experiment.loss.pairing == "cross":
        return experiment.train.global_batch_size // 2
    return experiment.train.global_batch_size


def distinct_batch_size(experiment):
    """Train rows a branch draws per step: half the branch with
    `paired_views` under within pairing, which holds each row twice."""
    batch = branch_batch_size(experiment)
    if experiment.train.paired_views and experiment.loss.pairing == "within":
        return batch // 2
    return batch


def branch_indices(seed, branch, epoch, num_train, steps_per_epoch, batch):
    """Train-set rows a branch visits in one epoch, [steps, batch].

    A pure function of its arguments, so a resumed run replays the data order
    from any step without iterator state.
    """
    rng = np.random.default_rng([seed, branch, epoch])
    order = rng.permutation(num_train)[: steps_per_epoch * batch]
    return order.reshape(steps_per_epoch, batch)


def _branch_rows(experiment, num_train, start_step, end_step, replicas):
    """Per branch, the train rows of steps [start_step, end_step), [s, b]."""
    batch = distinct_batch_size(experiment)
    steps_per_epoch = num_train // batch
    seed = experiment.train.seed
    within = experiment.loss.pairing == "within"
    branches = 1 if within or experiment.train.paired_views else 2
    first_epoch = start_step // steps_per_epoch
    last_epoch = (end_step - 1) // steps_per_epoch
    offset = first_epoch * steps_per_epoch
    per_branch = []
    for branch in range(branches):
        rows = np.concatenate([
            branch_indices(
                seed + branch, branch, epoch, num_train, steps_per_epoch,
                batch,
            )
            for epoch in range(first_epoch, last_epoch + 1)
        ])
        per_branch.append(rows[start_step - offset: end_step - offset])
    if experiment.train.paired_views and within:
        # Each replica's share holds its rows twice, so both views of an
        # image meet on one replica.
        rows = per_branch[0]
        rows = rows.reshape(len(rows), replicas, -1)
        per_branch[0] = np.concatenate([rows, rows], axis=2).reshape(
            len(rows), -1)
    elif experiment.train.paired_views:
        per_branch.append(per_branch[0])
    return per_branch


def _row_lookup(train_features, train_images, image_size):
    """(idx, seed) -> the branch input of those train rows: features, or
    images (augmented when seed is not None)."""
    if train_images is None:
        features_const = tf.constant(train_features, dtype=tf.float32)
        return lambda idx, seed: tf.gather(features_const, idx)
    if len(train_images) != len(train_features):
        raise ValueError(
            f"train_images has {len(train_images)} rows, train_features "
            f"{len(train_features)}; they must be the same train set"
        )
    images_const = tf.constant(train_images, dtype=tf.uint8)
    return lambda idx, seed: image_inputs.gather_images(
        images_const, idx, image_size, seed
    )


def make_train_dataset(
    strategy, experiment, train_features, start_step, end_step,
    train_images=None, image_size=None,
):
    """Distributed dataset of steps [start_step, end_step).

    Each element is ((features_1, index_1), (features_2, index_2)) for cross
    pairing or (features, index) for within pairing, split so that replica r
    gets rows [r * b, (r + 1) * b) of the global batch (b = batch / replicas):
    pairs never cross replicas. With `train_images` (uint8 [n_train, H, W,
    3], the end-to-end path) the branches carry float32 images [b, S, S, 3]
    resized to `image_size` instead of features, in the same order.
    """
    replicas = strategy.num_replicas_in_sync
    per_replica = branch_batch_size(experiment) // replicas
    per_branch = _branch_rows(
        experiment, len(train_features), start_step, end_step, replicas
    )
    lookup = _row_lookup(train_features, train_images, image_size)
    augment = experiment.model.image_augmentation
    seed = experiment.train.seed
    # Element e = step * replicas + replica, the same on every resume.
    elements = (np.arange(start_step, end_step)[:, None] * replicas
                + np.arange(replicas)[None, :])

    def gather(element, *index_batches):
        out = tuple(
            (lookup(idx, tf.stack([tf.constant(seed, tf.int64),
                                   element * 2 + branch])
                    if augment else None), idx)
            for branch, idx in enumerate(index_batches))
        return out if len(out) > 1 else out[0]

    def dataset_fn(input_context):
        pipeline = input_context.input_pipeline_id
        local = replicas // input_context.num_input_pipelines
        sliced = [elements[:, pipeline * local: (pipeline + 1) * local]
                  .reshape(-1).astype(np.int64)]
        for rows in per_branch:
            rows = rows.reshape(len(rows), replicas, per_replica)
            rows = rows[:, pipeline * local: (pipeline + 1) * local]
            sliced.append(rows.reshape(-1, per_replica))
        ds = tf.data.Dataset.from_tensor_slices(tuple(sliced))
        ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF
        )
        options.deterministic = True
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)


def encode(hasher, features, batch_size=4096):
    """int8 ±1 codes of features via the hasher (rule logits >= 0 -> +1)."""
    logits = [
        np.asarray(hasher(features[i: i + batch_size], training=False))
        for i in range(0, len(features), batch_size)
    ]
    return codes_lib.binarize(np.concatenate(logits))


@dataclasses.dataclass
class TrainInputs:
    """What `load_inputs` gathers for the rest of a run.

    Attributes:
        sets: the `RetrievalSets` (features, labels of every set).
        train_features: float [n_train, D], the hash head's train rows.
        similarity_features: float [n_train, D'], the rows S's kNN graph
            (and the `hash_init=structure` start's) is built on:
            `train_features`, or `stock_similarity_features` with
            `similarity_stock_features`.
        steps_per_epoch: n_train // per-branch batch.
        train_images: uint8 train images (end-to-end path) or None.
        image_size: backbone input size (end-to-end path) or None.
        encode_fn: `image_inputs.ImageEncoder` (end-to-end) or None; set
            once the hasher exists.
    """

    sets: object
    train_features: np.ndarray
    similarity_features: np.ndarray
    steps_per_epoch: int
    train_images: object = None
    image_size: object = None
    image_dataset: object = None
    encode_fn: object = None


def run_experiment(experiment, sets=None):
    """Train UHGA as configured; return final metrics (dict).

    Args:
        experiment: `config.ExperimentConfig`.
        sets: optional preloaded `RetrievalSets` (tests, sweeps).

    Returns:
        dict with map (MAP on the query/database split under the eval
        config), map_tie_aware, cosine_map (float-feature reference),
        validation_map, steps, wall_time_s, resumed_from_step, method,
        code_length. wall_time_s is this call's; a run resumed from a
        checkpoint (resumed_from_step > 0) spent more before it.
    """
    start_time = time.time()
    strategy = prepare(experiment)
    chief = is_chief(strategy)
    inputs = load_inputs(experiment, sets, chief)
    matrix = build_similarity(experiment, inputs.similarity_features)
    diagnostics = similarity_diagnostics(
        matrix,
        inputs.sets.labels["train"] if inputs.sets.labelled else None,
        experiment.train.seed,
    )
    if diagnostics:
        logging.info(
            "similarity matrix vs labels (diagnostics only, never used to "
            "train or select): %s",
            {k: round(v, 4) for k, v in diagnostics.items()},
        )
    with strategy.scope():
        model = build_model(experiment, inputs, matrix, strategy)
        checkpoint = build_checkpoint(model)
    manager = restore_or_start(experiment, strategy, checkpoint, model, chief)
    resumed_from_step = int(model.step.numpy())
    if inputs.image_dataset is not None:
        inputs.encode_fn = image_inputs.ImageEncoder(
            model.hasher, inputs.sets, inputs.image_dataset, inputs.image_size
        )
    callbacks = build_callbacks(experiment, manager, model, inputs, chief)
    fit(experiment, strategy, model, inputs, callbacks, chief)
    manager.save(checkpoint_number=int(model.step.numpy()))
    result = evaluate_final(experiment, model, inputs, matrix)
    result.update(
        similarity_diagnostics=diagnostics,
        wall_time_s=time.time() - start_time,
        resumed_from_step=resumed_from_step,
        commit=provenance.git_sha(),
    )
    if chief:
        _save_hasher(
            model.hasher, os.path.join(experiment.workdir, "hasher.keras")
        )
        if experiment.model.trainable_backbone:
            _save_backbone_weights(model.hasher, experiment.workdir)
        io_utils.write_json_atomic(
            os.path.join(experiment.workdir, RESULTS_FILE), result
        )
    if inputs.sets.labelled:
        logging.info(
            "final MAP %.4f (tie-aware %.4f) after %d steps",
            result["map"], result["map_tie_aware"], result["steps"],
        )
    return result


def prepare(experiment):
    """Check everything that can fail on user input; return the strategy.

    Nothing is written before these checks pass. Seeds the run and turns on
    op determinism when configured.
    """
    image_inputs.check_experiment(experiment)
    check_workdir(experiment)
    strategy = make_strategy(experiment.train.strategy)
    replicas = strategy.num_replicas_in_sync
    # The distinct rows divide the branch batch, so this one check also
    # spreads every branch evenly.
    distinct = distinct_batch_size(experiment)
    if distinct % replicas:
        within = (" (paired_views with pairing=within keeps both views of "
                  "an image on one replica)"
                  if distinct != branch_batch_size(experiment) else "")
        raise ValueError(
            f"{distinct} distinct images per branch and step must divide "
            f"evenly over {replicas} replicas{within}; received "
            f"global_batch_size={experiment.train.global_batch_size}"
        )
    keras.utils.set_random_seed(experiment.train.seed)
    if experiment.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    return strategy


def load_inputs(experiment, sets, chief):
    """Load (or take) the retrieval sets and check them; `TrainInputs`."""
    if sets is None:
        sets = retrieval_sets.load_retrieval_sets(
            experiment.data, experiment.model, experiment.train.seed,
            progress=experiment.progress and chief,
        )
    image_dataset = image_size = train_images = None
    if experiment.model.trainable_backbone:
        image_dataset = image_inputs.image_dataset_of(
            sets, experiment.data.dataset
        )
        image_size = image_inputs.resolve_image_size(experiment.model)
    for name, features in sets.features.items():
        bad = ~np.all(np.isfinite(features), axis=1)
        if bad.any():
            raise ValueError(
                f"{name} features have {int(bad.sum())} rows with NaN or inf "
                f"(first: row {int(np.argmax(bad))}); every feature row must "
                "be finite (check the feature file or the images)"
            )
    train_features = sets.features["train"]
    batch = distinct_batch_size(experiment)
    if len(train_features) < batch:
        raise ValueError(
            f"train split has {len(train_features)} images, fewer than the "
            f"per-branch batch {batch}"
        )
    if image_dataset is not None:
        train_images = image_inputs.train_images(sets, image_dataset)
    similarity_features = train_features
    if experiment.similarity.similarity_stock_features:
        similarity_features = stock_similarity_features(
            experiment, sets, progress=experiment.progress and chief)
    return TrainInputs(
        sets=sets,
        train_features=train_features,
        similarity_features=similarity_features,
        steps_per_epoch=len(train_features) // batch,
        train_images=train_images,
        image_size=image_size,
        image_dataset=image_dataset,
    )


def stock_similarity_features(experiment, sets, progress=False):
    """Each train row's stock-backbone and `sets`' unit rows side by side.

    Their cosine is the mean of the two backbones' cosines, so S's graph
    keeps what the stock features knew while the head reads only the
    fine-tuned ones (`similarity_stock_features`). The stock features are
    read (from the feature cache, as stage one left them) on the split
    that `sets` were drawn with.

    Raises:
        ValueError: `sets` do not record their split seed, or the stock
            sets' train rows are not `sets`' train rows.
    """
    if sets.split_seed is None:
        raise ValueError(
            "similarity_stock_features=true reads the stock features on "
            "the same split, but these sets do not record the seed they "
            f"were drawn with ({sets.description})")
    stock_model = dataclasses.replace(
        experiment.model, backbone_weights="default")
    stock = retrieval_sets.load_retrieval_sets(
        experiment.data, stock_model, sets.split_seed, progress=progress)
    if not np.array_equal(stock.indices["train"], sets.indices["train"]):
        raise ValueError(
            "the stock features' train rows are not these sets' train rows "
            f"({stock.description} against {sets.description})")
    return np.concatenate([
        features_lib.unit_rows(stock.features["train"]),
        features_lib.unit_rows(sets.features["train"])], axis=1)


def build_hasher(experiment, inputs):
    """The hash network: hash head on features, or backbone + head."""
    model_cfg = experiment.model
    centring = (
        hash_layer.centring_statistics(
            inputs.train_features, unit_rows=model_cfg.feature_unit_rows)
        if model_cfg.feature_centring else None
    )
    head = dict(
        hash_head=model_cfg.hash_head,
        hidden_units=model_cfg.hash_hidden,
        dropout_rate=model_cfg.dropout_rate,
        centring=centring,
        unit_rows=model_cfg.feature_unit_rows,
    )
    # Building a backbone for feature extraction draws from the global seed;
    # reseed so the hash layer's init does not depend on a cache hit.
    keras.utils.set_random_seed(experiment.train.seed)
    feature_dim = inputs.sets.feature_dim
    if not model_cfg.trainable_backbone:
        hasher = hash_layer.build_hasher(
            feature_dim, model_cfg.code_length, **head
        )
        if model_cfg.hash_init == "structure":
            _structure_init(hasher, inputs, centring, experiment)
        return hasher
    backbone = image_inputs.build_backbone(model_cfg)
    if backbone.output_shape[-1] != feature_dim:
        raise ValueError(
            f"backbone {model_cfg.backbone!r} gives "
            f"{backbone.output_shape[-1]}-d features but the cached "
            f"features are {feature_dim}-d; they must come from "
            "the same backbone"
        )
    hasher = hash_layer.build_image_hasher(
        backbone, model_cfg.code_length, **head
    )
    if model_cfg.hash_init == "structure":
        # The cached features are the backbone's output before fine-tuning,
        # so the head starts where the frozen path's does.
        _structure_init(hasher.get_layer(hash_layer.HASH_HEAD_NAME),
                        inputs, centring, experiment)
    return hasher


def _structure_init(hasher, inputs, centring, experiment):
    """Start the dense hash layer of ``hasher`` (a features -> z model) at
    the k-means+LS map (`hash_init`) on the similarity matrix's kNN graph
    and cluster size."""
    from uhga_tf.baselines import structural

    layer = hasher.get_layer("hash_layer")
    if layer.hash_head != "dense":
        raise ValueError("hash_init=structure needs hash_head=dense")
    features = np.asarray(inputs.train_features, dtype=np.float32)
    graph_features = (inputs.similarity_features
                      if experiment.similarity.similarity_stock_features
                      else None)
    if centring is not None:
        # The hash layer's own input: the model's centring layer, not a copy.
        features = np.asarray(hasher.get_layer("feature_centring")(features))
    kernel, bias = structural.structure_hash_map(
        features, layer.code_length, experiment.train.seed,
        knn=experiment.similarity.similarity_knn,
        cluster_size=experiment.similarity.similarity_cluster_size,
        learned_share=experiment.similarity.similarity_learned_share,
        graph_features=graph_features)
    layer.kernel.assign(kernel)
    layer.bias.assign(bias)
    logging.info("hash layer starts at the k-means+LS map (hash_init)")


def build_model(experiment, inputs, matrix, strategy):
    """The compiled UHGAModel (call in the strategy's scope)."""
    train_cfg, att_cfg = experiment.train, experiment.attention
    model = uhga_model.UHGAModel(
        build_hasher(experiment, inputs),
        matrix,
        experiment.loss,
        att_cfg,
        seed=train_cfg.seed,
        replica_batch_size=(
            branch_batch_size(experiment) // strategy.num_replicas_in_sync
        ),
    )
    optimizer = hash_optimizer.HashOptimizer.from_config(
        train_cfg, train_cfg.lr_step_epochs * inputs.steps_per_epoch
    )
    attention_optimizer = None
    if att_cfg.attention:
        attention_optimizer = keras.optimizers.Adam(
            learning_rate=att_cfg.attention_learning_rate,
            beta_1=0.9, beta_2=0.999, epsilon=1e-8,
        )
    model.compile(
        hash_optimizer=optimizer, attention_optimizer=attention_optimizer
    )
    return model


def build_checkpoint(model):
    """tf.train.Checkpoint of everything a resumed run needs."""
    extra = {}
    if model.attention_optimizer is not None:
        extra["attention_optimizer"] = model.attention_optimizer
    # Dropout seed states (dropout_rate > 0, or dropout inside a fine-tuned
    # backbone) are not Keras weights and tf.train.Checkpoint does not reach
    # them through the model; without them a resumed run would redraw the
    # masks of the steps it already took.
    hasher = model.hasher
    weight_ids = {id(w) for w in hasher.weights}
    seed_states = [
        v for v in hasher.non_trainable_variables if id(v) not in weight_ids
    ]
    if seed_states:
        extra["hasher_seed_states"] = seed_states
    return tf.train.Checkpoint(
        model=model, hash_optimizer=model.hash_optimizer, **extra
    )


def restore_or_start(experiment, strategy, checkpoint, model, chief):
    """Restore the newest whole checkpoint, if any; write config.json.

    Returns the CheckpointManager. Non-chief workers must still write
    (collective save) but to a private place that nobody restores from.
    """
    workdir = experiment.workdir
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not chief:
        resolver = strategy.cluster_resolver
        ckpt_dir = os.path.join(
            workdir, f".worker-{resolver.task_type}-{resolver.task_id}"
        )
    checkpoints.drop_damaged(ckpt_dir)
    manager = tf.train.CheckpointManager(
        checkpoint, ckpt_dir, max_to_keep=experiment.train.keep_checkpoints
    )
    if manager.latest_checkpoint:
        checkpoints.restore(checkpoint, manager.latest_checkpoint)
        logging.info(
            "resuming from step %d (%s)", int(model.step.numpy()),
            manager.latest_checkpoint,
        )
    # Only now, with the restore (or a fresh start) known to work.
    if chief:
        os.makedirs(workdir, exist_ok=True)
        io_utils.write_json_atomic(
            os.path.join(workdir, "config.json"), experiment.to_dict()
        )
        logging.info("config: %s", experiment.to_json())
    return manager


def build_callbacks(experiment, manager, model, inputs, chief):
    """Checkpoints on every worker; statistics and TensorBoard on chief."""
    workdir = experiment.workdir
    logdir = experiment.logdir or os.path.join(workdir, "logs")
    callbacks = [
        callbacks_lib.CheckpointCallback(
            manager, experiment.train.checkpoint_every_steps
        ),
    ]
    if not chief:
        return callbacks
    return callbacks + [
        callbacks_lib.CodeStatisticsCallback(
            hasher=model.hasher,
            sets=inputs.sets,
            logdir=logdir,
            metrics_path=os.path.join(workdir, "metrics.jsonl"),
            eval_every_epochs=experiment.train.eval_every_epochs,
            last_epoch=experiment.train.epochs,
            model=model,
            encode_fn=inputs.encode_fn,
        ),
        keras.callbacks.TensorBoard(
            log_dir=logdir, update_freq="epoch", write_graph=False
        ),
    ]


def fit_segments(start_step, steps_per_epoch, epochs):
    """(initial_epoch, epochs, first step, end step) of each `model.fit`.

    A resumed run may start mid-epoch: finish that epoch first, then
    continue with whole epochs, so epoch numbers stay those of an
    uninterrupted run.
    """
    total_steps = steps_per_epoch * epochs
    if start_step >= total_steps:
        return []
    first_epoch = start_step // steps_per_epoch
    segments = []
    if start_step % steps_per_epoch:
        segments.append((first_epoch, first_epoch + 1, start_step,
                         (first_epoch + 1) * steps_per_epoch))
        first_epoch += 1
    if first_epoch < epochs:
        segments.append((first_epoch, epochs,
                         first_epoch * steps_per_epoch, total_steps))
    return segments


def fit(experiment, strategy, model, inputs, callbacks, chief):
    """Train from the model's step to the last epoch."""
    verbose = (
        (1 if os.isatty(2) else 2) if experiment.progress and chief else 0
    )
    segments = fit_segments(
        int(model.step.numpy()), inputs.steps_per_epoch,
        experiment.train.epochs,
    )
    for initial_epoch, epochs, seg_start, seg_end in segments:
        dataset = make_train_dataset(
            strategy, experiment, inputs.train_features, seg_start, seg_end,
            train_images=inputs.train_images, image_size=inputs.image_size,
        )
        model.fit(
            dataset,
            initial_epoch=initial_epoch,
            epochs=epochs,
            steps_per_epoch=(seg_end - seg_start) // (epochs - initial_epoch),
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )


def _set_codes(model, inputs, name):
    """int8 ±1 codes of one retrieval set under the trained hasher."""
    if inputs.encode_fn is not None:
        return codes_lib.binarize(inputs.encode_fn(name))
    return encode(model.hasher, inputs.sets.features[name])


def evaluate_final(experiment, model, inputs, matrix):
    """MAP of the trained codes, with the references and run facts; on an
    unlabelled collection the database codes' `code_statistics` instead."""
    sets, eval_cfg = inputs.sets, experiment.eval
    database_codes = _set_codes(model, inputs, "database")
    check_not_collapsed(database_codes)
    facts = dict(
        method=method_name(experiment),
        code_length=experiment.model.code_length,
        similarity_mode=experiment.similarity.similarity,
        similarity_fractions=matrix.fractions,
        similarity_summary=matrix.summary(),
        data=sets.description,
    )
    if not sets.labelled:
        statistics = codes_lib.code_statistics(database_codes)
        logging.info(
            "unlabelled collection, so no MAP: %d database codes, %s",
            len(database_codes),
            {k: round(v, 4) for k, v in statistics.items()})
        return {**facts, **statistics, "labelled": False,
                "num_database": len(database_codes),
                "steps": int(model.step.numpy())}
    query_codes = _set_codes(model, inputs, "query")
    validation_codes = _set_codes(model, inputs, "validation")
    result = metrics.evaluate_codes(
        query_codes, database_codes, sets.labels["query"],
        sets.labels["database"],
        top_k=eval_cfg.top_k or None,
        ap_denominator=eval_cfg.ap_denominator,
        empty_query=eval_cfg.empty_query,
        hamming_radius=eval_cfg.hamming_radius,
    )
    result.update(
        cosine_map=cosine.cosine_map(
            sets.features["query"], sets.features["database"],
            sets.labels["query"], sets.labels["database"],
            top_k=eval_cfg.top_k or None,
        ),
        cosine_map_centred=cosine.cosine_map(
            sets.features["query"] - inputs.train_features.mean(axis=0),
            sets.features["database"] - inputs.train_features.mean(axis=0),
            sets.labels["query"], sets.labels["database"],
            top_k=eval_cfg.top_k or None,
        ),
        itq_map=itq_map(experiment, sets),
        **validation_metrics(validation_codes, database_codes, sets),
        steps=int(model.step.numpy()),
        **facts,
    )
    return result


def build_similarity(experiment, train_features):
    """S of the configured mode: dense (paper) or structured (beyond it)."""
    matrix = similarity.build(
        experiment.similarity, train_features, experiment.train.seed)
    logging.info("similarity matrix (%s): %d items, fractions %s",
                 experiment.similarity.similarity, matrix.num_items,
                 {k: round(v, 4) for k, v in matrix.fractions.items()})
    return matrix


def similarity_diagnostics(matrix, train_labels, seed):
    """P(same class | S=+1), P(different class | S=-1) on sampled pairs.

    For analysis only: stored with the results, never used to train or to
    select. Empty when the train set has no labels.
    """
    if train_labels is None or len(train_labels) == 0:
        return {}
    rows, cols, block = similarity.sampled_block(
        matrix, len(train_labels), seed)
    return similarity.label_agreement(
        block, train_labels[rows], train_labels[cols]
    )


def itq_map(experiment, sets):
    """Tie-aware MAP@ALL of ITQ on unit rows, same length, same split.

    ITQ is fitted on the same train features in a second or two; a learned
    code that does not beat it is not worth training.
    """
    query_codes, database_codes = references.shallow_codes(
        "ITQ (unit)", experiment.model.code_length, sets,
        experiment.train.seed
    )
    return float(metrics.tie_aware_map(
        query_codes, database_codes, sets.labels["query"],
        sets.labels["database"], empty_query=experiment.eval.empty_query,
    ))


def validation_metrics(validation_codes, database_codes, sets):
    """The validation queries against database \\ validation.

    The numbers to select defaults on (protocol.md §1.3); the reported
    query set is never used for that.

    Returns:
        {"validation_map": tie-aware MAP@ALL (no tie rule can move it),
        "validation_map_stable": MAP@ALL with ties by database order,
        "validation_map_1000": MAP@1000, "validation_p_100": P@100}.
    """
    keep = retrieval_sets.validation_database_mask(sets)
    result = metrics.evaluate_codes(
        validation_codes, database_codes[keep],
        sets.labels["validation"], sets.labels["database"][keep],
        precision_at=(100,), map_at=(1000,),
    )
    return {
        "validation_map": result["map_tie_aware"],
        "validation_map_stable": result["map"],
        "validation_map_1000": result["map_at"].get(1000),
        "validation_p_100": result["precision_at_n"].get(100),
    }


def check_not_collapsed(database_codes):
    """Stop instead of reporting the MAP of codes that are all equal."""
    if len(database_codes) > 1 and np.all(
        database_codes == database_codes[:1]
    ):
        raise ValueError(
            "training collapsed: every database item got the same code, so "
            "the MAP would only measure tie order; lower learning_rate, or "
            "raise balance_weight, or check the similarity matrix fractions"
        )


def _save_hasher(hasher, path):
    with io_utils.atomic_path(path, suffix=".keras") as tmp:
        hasher.save(tmp)


def _save_backbone_weights(hasher, workdir):
    """Write the fine-tuned backbone where `--backbone_weights` reads it, so
    its features can feed a frozen-feature run (any code length, S rebuilt
    on them)."""
    backbone, _ = hash_layer.split_image_hasher(hasher)
    path = os.path.join(workdir, backbone_lib.FINE_TUNED_WEIGHTS_FILE)
    with io_utils.atomic_path(
            path, suffix=backbone_lib.KERAS_WEIGHTS_SUFFIX) as tmp:
        backbone.save_weights(tmp)
