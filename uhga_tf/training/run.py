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
"""

import json
import os
import time

import numpy as np
from absl import logging

from uhga_tf import config
from uhga_tf.data import retrieval_sets

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
    import tensorflow as tf

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


def branch_indices(seed, branch, epoch, num_train, steps_per_epoch, batch):
    """Train-set rows a branch visits in one epoch, [steps, batch].

    A pure function of its arguments, so a resumed run replays the data order
    from any step without iterator state.
    """
    rng = np.random.default_rng([seed, branch, epoch])
    order = rng.permutation(num_train)[: steps_per_epoch * batch]
    return order.reshape(steps_per_epoch, batch)


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
    import tensorflow as tf

    from uhga_tf.training import image_inputs

    num_train = len(train_features)
    batch = branch_batch_size(experiment)
    steps_per_epoch = num_train // batch
    replicas = strategy.num_replicas_in_sync
    per_replica = batch // replicas
    seed = experiment.train.seed
    branches = 2 if experiment.loss.pairing == "cross" else 1

    first_epoch, last_epoch = (
        start_step // steps_per_epoch,
        (end_step - 1) // steps_per_epoch,
    )
    per_branch = []
    for branch in range(branches):
        rows = np.concatenate(
            [
                branch_indices(
                    seed + branch, branch, epoch, num_train, steps_per_epoch,
                    batch,
                )
                for epoch in range(first_epoch, last_epoch + 1)
            ]
        )
        offset = first_epoch * steps_per_epoch
        per_branch.append(rows[start_step - offset: end_step - offset])
    if train_images is None:
        features_const = tf.constant(train_features, dtype=tf.float32)

        def lookup(idx):
            return tf.gather(features_const, idx)
    else:
        if len(train_images) != num_train:
            raise ValueError(
                f"train_images has {len(train_images)} rows, train_features "
                f"{num_train}; they must be the same train set"
            )
        images_const = tf.constant(train_images, dtype=tf.uint8)

        def lookup(idx):
            return image_inputs.gather_images(images_const, idx, image_size)

    def dataset_fn(input_context):
        pipeline = input_context.input_pipeline_id
        local = replicas // input_context.num_input_pipelines
        sliced = []
        for rows in per_branch:
            rows = rows.reshape(len(rows), replicas, per_replica)
            rows = rows[:, pipeline * local: (pipeline + 1) * local]
            sliced.append(rows.reshape(-1, per_replica))

        def gather(*index_batches):
            out = tuple((lookup(idx), idx) for idx in index_batches)
            return out if len(out) > 1 else out[0]

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
    """Binary codes of features via the hasher (rule z >= 0 -> +1)."""
    from uhga_tf import codes

    outputs = [
        np.asarray(hasher(features[i: i + batch_size], training=False))
        for i in range(0, len(features), batch_size)
    ]
    return codes.binarize(np.concatenate(outputs))


def run_experiment(experiment, sets=None):
    """Train UHGA as configured; return final metrics (dict).

    Args:
        experiment: `config.ExperimentConfig`.
        sets: optional preloaded `RetrievalSets` (tests, sweeps).

    Returns:
        dict with map (MAP on the query/database split under the eval
        config), map_tie_aware, cosine_map (float-feature reference),
        validation_map, steps, wall_time_s, method, code_length.
    """
    import keras
    import tensorflow as tf

    from uhga_tf import codes as codes_lib
    from uhga_tf import similarity
    from uhga_tf.evaluation import metrics
    from uhga_tf.models import hash_layer
    from uhga_tf.training import callbacks as callbacks_lib
    from uhga_tf.training import checkpoints
    from uhga_tf.training import hash_optimizer
    from uhga_tf.training import image_inputs
    from uhga_tf.training import uhga_model

    start_time = time.time()
    # Everything that can fail on user input fails before anything is written.
    image_inputs.check_experiment(experiment)
    check_workdir(experiment)
    strategy = make_strategy(experiment.train.strategy)
    replicas = strategy.num_replicas_in_sync
    batch = branch_batch_size(experiment)
    if batch % replicas:
        raise ValueError(
            f"per-branch batch {batch} must divide evenly over {replicas} "
            f"replicas; received global_batch_size="
            f"{experiment.train.global_batch_size}"
        )
    chief = is_chief(strategy)
    keras.utils.set_random_seed(experiment.train.seed)
    if experiment.train.deterministic:
        tf.config.experimental.enable_op_determinism()

    if sets is None:
        sets = retrieval_sets.load_retrieval_sets(
            experiment.data, experiment.model, experiment.train.seed,
            progress=experiment.progress and chief,
        )
    end_to_end = experiment.model.trainable_backbone
    image_dataset = image_size = None
    if end_to_end:
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
    num_train = len(train_features)
    if num_train < batch:
        raise ValueError(
            f"train split has {num_train} images, fewer than the per-branch "
            f"batch {batch}"
        )
    steps_per_epoch = num_train // batch
    total_steps = steps_per_epoch * experiment.train.epochs

    matrix = build_similarity(experiment, train_features)
    positive_weight = experiment.loss.positive_weight
    positive_weight = similarity.resolve_positive_weight(
        positive_weight if positive_weight == "auto" else float(
            positive_weight),
        matrix,
    )
    diagnostics = similarity_diagnostics(
        matrix, sets.labels["train"], experiment.train.seed
    )
    if diagnostics:
        logging.info(
            "similarity matrix vs labels (diagnostics only, never used to "
            "train or select): %s",
            {k: round(v, 4) for k, v in diagnostics.items()},
        )

    workdir = experiment.workdir
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not chief:
        # Non-chief workers must still write (collective save) but to a
        # private place that nobody restores from.
        resolver = strategy.cluster_resolver
        ckpt_dir = os.path.join(
            workdir, f".worker-{resolver.task_type}-{resolver.task_id}"
        )

    lr_steps = experiment.train.lr_step_epochs * steps_per_epoch
    centring = (
        hash_layer.centring_statistics(train_features)
        if experiment.model.feature_centring else None
    )
    # Building a backbone for feature extraction draws from the global seed;
    # reseed so the hash layer's init does not depend on a cache hit.
    keras.utils.set_random_seed(experiment.train.seed)
    with strategy.scope():
        if end_to_end:
            backbone = image_inputs.build_backbone(experiment.model)
            if backbone.output_shape[-1] != sets.feature_dim:
                raise ValueError(
                    f"backbone {experiment.model.backbone!r} gives "
                    f"{backbone.output_shape[-1]}-d features but the cached "
                    f"features are {sets.feature_dim}-d; they must come from "
                    "the same backbone"
                )
            hasher = hash_layer.build_image_hasher(
                backbone,
                experiment.model.code_length,
                hash_head=experiment.model.hash_head,
                hidden_units=experiment.model.hash_hidden,
                dropout_rate=experiment.model.dropout_rate,
                centring=centring,
            )
        else:
            hasher = hash_layer.build_hasher(
                sets.feature_dim,
                experiment.model.code_length,
                hash_head=experiment.model.hash_head,
                hidden_units=experiment.model.hash_hidden,
                dropout_rate=experiment.model.dropout_rate,
                centring=centring,
            )
        loss_cfg, att_cfg = experiment.loss, experiment.attention
        model = uhga_model.UHGAModel(
            hasher,
            matrix,
            code_length=experiment.model.code_length,
            loss=loss_cfg.loss,
            attention=att_cfg.attention,
            lookahead=att_cfg.lookahead,
            sigmoid_param=loss_cfg.sigmoid_param,
            positive_weight=positive_weight,
            pairing=loss_cfg.pairing,
            scale_schedule=loss_cfg.scale_schedule,
            scale_step=loss_cfg.scale_step,
            scale_gamma=loss_cfg.scale_gamma,
            scale_power=loss_cfg.scale_power,
            attention_hidden=att_cfg.attention_hidden,
            attention_grad_p=att_cfg.attention_grad_p,
            attention_budget=att_cfg.attention_budget,
            attention_chunk_rows=att_cfg.attention_chunk_rows,
            quantization_weight=loss_cfg.quantization_weight,
            balance_weight=loss_cfg.balance_weight,
            seed=experiment.train.seed,
            replica_batch_size=batch // replicas,
        )
        optimizer = hash_optimizer.HashOptimizer(
            learning_rate=experiment.train.learning_rate,
            momentum=experiment.train.momentum,
            nesterov=experiment.train.nesterov,
            weight_decay=experiment.train.weight_decay,
            hash_lr_multiplier=experiment.train.hash_lr_multiplier,
            lr_decay=experiment.train.lr_decay,
            lr_step_steps=lr_steps,
        )
        attention_optimizer = (
            keras.optimizers.Adam(
                learning_rate=att_cfg.attention_learning_rate,
                beta_1=0.9, beta_2=0.999, epsilon=1e-8,
            )
            if att_cfg.attention
            else None
        )
        model.compile(
            hash_optimizer=optimizer, attention_optimizer=attention_optimizer
        )
        extra = {}
        if attention_optimizer is not None:
            extra["attention_optimizer"] = attention_optimizer
        # Dropout seed states (dropout_rate > 0, or dropout inside a
        # fine-tuned backbone) are not Keras weights and tf.train.Checkpoint
        # does not reach them through the model; without them a resumed run
        # would redraw the masks of the steps it already took.
        weight_ids = {id(w) for w in hasher.weights}
        seed_states = [
            v for v in hasher.non_trainable_variables
            if id(v) not in weight_ids
        ]
        if seed_states:
            extra["hasher_seed_states"] = seed_states
        checkpoint = tf.train.Checkpoint(
            model=model, hash_optimizer=optimizer, **extra
        )
    checkpoints.drop_damaged(ckpt_dir)
    manager = tf.train.CheckpointManager(
        checkpoint, ckpt_dir, max_to_keep=experiment.train.keep_checkpoints
    )
    start_step = 0
    if manager.latest_checkpoint:
        checkpoints.restore(checkpoint, manager.latest_checkpoint)
        start_step = int(model.step.numpy())
        logging.info(
            "resuming from step %d (%s)", start_step, manager.latest_checkpoint
        )
    # Only now, with the restore (or a fresh start) known to work.
    if chief:
        os.makedirs(workdir, exist_ok=True)
        _write_json_atomic(
            os.path.join(workdir, "config.json"), experiment.to_dict()
        )
        logging.info("config: %s", experiment.to_json())

    if end_to_end:
        encode_fn = image_inputs.ImageEncoder(
            hasher, sets, image_dataset, image_size
        )
        train_images = image_inputs.train_images(sets, image_dataset)
    else:
        encode_fn = train_images = None

    logdir = experiment.logdir or os.path.join(workdir, "logs")
    callbacks = [
        callbacks_lib.CheckpointCallback(
            manager, experiment.train.checkpoint_every_steps
        ),
    ]
    if chief:
        callbacks += [
            callbacks_lib.CodeStatisticsCallback(
                hasher=hasher,
                sets=sets,
                logdir=logdir,
                metrics_path=os.path.join(workdir, "metrics.jsonl"),
                eval_every_epochs=experiment.train.eval_every_epochs,
                last_epoch=experiment.train.epochs,
                model=model,
                encode_fn=encode_fn,
            ),
            keras.callbacks.TensorBoard(
                log_dir=logdir, update_freq="epoch", write_graph=False
            ),
        ]
    verbose = (1 if os.isatty(2) else 2) if experiment.progress and chief else 0

    if start_step < total_steps:
        # A resumed run may start mid-epoch: finish that epoch first, then
        # continue with whole epochs, so epoch numbers stay those of an
        # uninterrupted run.
        first_epoch = start_step // steps_per_epoch
        segments = []
        if start_step % steps_per_epoch:
            segments.append((first_epoch, first_epoch + 1, start_step,
                             (first_epoch + 1) * steps_per_epoch))
            first_epoch += 1
        if first_epoch < experiment.train.epochs:
            segments.append((first_epoch, experiment.train.epochs,
                             first_epoch * steps_per_epoch, total_steps))
        for initial_epoch, epochs, seg_start, seg_end in segments:
            dataset = make_train_dataset(
                strategy, experiment, train_features, seg_start, seg_end,
                train_images=train_images, image_size=image_size,
            )
            steps = (seg_end - seg_start) // (epochs - initial_epoch)
            model.fit(
                dataset,
                initial_epoch=initial_epoch,
                epochs=epochs,
                steps_per_epoch=steps,
                callbacks=callbacks,
                verbose=verbose,
                shuffle=False,
            )
    manager.save(checkpoint_number=int(model.step.numpy()))

    if end_to_end:
        query_codes = codes_lib.binarize(encode_fn("query"))
        database_codes = codes_lib.binarize(encode_fn("database"))
        validation_codes = codes_lib.binarize(encode_fn("validation"))
    else:
        query_codes = encode(hasher, sets.features["query"])
        database_codes = encode(hasher, sets.features["database"])
        validation_codes = encode(hasher, sets.features["validation"])
    check_not_collapsed(database_codes)
    eval_cfg = experiment.eval
    result = metrics.evaluate_codes(
        query_codes, database_codes, sets.labels["query"],
        sets.labels["database"],
        top_k=eval_cfg.top_k or None,
        ap_denominator=eval_cfg.ap_denominator,
        empty_query=eval_cfg.empty_query,
        hamming_radius=eval_cfg.hamming_radius,
    )
    from uhga_tf.evaluation import cosine

    result.update(
        method=method_name(experiment),
        code_length=experiment.model.code_length,
        cosine_map=cosine.cosine_map(
            sets.features["query"], sets.features["database"],
            sets.labels["query"], sets.labels["database"],
            top_k=eval_cfg.top_k or None,
        ),
        itq_map=itq_map(experiment, sets),
        validation_map=validation_map(validation_codes, database_codes, sets),
        steps=int(model.step.numpy()),
        similarity_mode=experiment.similarity.similarity,
        similarity_fractions=matrix.fractions,
        similarity_diagnostics=diagnostics,
        tau_sim=getattr(matrix, "tau_sim", None),
        tau_dis=getattr(matrix, "tau_dis", None),
        data=sets.description,
        wall_time_s=time.time() - start_time,
    )
    if chief:
        _save_hasher(hasher, os.path.join(workdir, "hasher.keras"))
        _write_json_atomic(os.path.join(workdir, "results.json"), result)
    logging.info(
        "final MAP %.4f (tie-aware %.4f) after %d steps",
        result["map"], result["map_tie_aware"], result["steps"],
    )
    return result


def build_similarity(experiment, train_features):
    """S of the configured mode: dense (paper) or structured (beyond it)."""
    from uhga_tf import similarity
    from uhga_tf import structured_similarity

    sim_cfg = experiment.similarity
    if sim_cfg.similarity in structured_similarity.STRUCTURED_MODES:
        return structured_similarity.build_structured_similarity(
            train_features,
            similarity=sim_cfg.similarity,
            similarity_knn=sim_cfg.similarity_knn,
            similarity_clusters=sim_cfg.similarity_clusters,
            similarity_runs=sim_cfg.similarity_runs,
            similarity_dissimilar_quantile=(
                sim_cfg.similarity_dissimilar_quantile
            ),
            seed=experiment.train.seed,
        )
    matrix = similarity.build_similarity_matrix(
        train_features,
        similarity=sim_cfg.similarity,
        similarity_lambda=sim_cfg.similarity_lambda,
        ssdh_alpha=None if sim_cfg.ssdh_alpha < 0 else sim_cfg.ssdh_alpha,
        ssdh_beta=None if sim_cfg.ssdh_beta < 0 else sim_cfg.ssdh_beta,
        similarity_threshold=(
            None if sim_cfg.similarity_threshold < 0
            else sim_cfg.similarity_threshold
        ),
        dissimilarity_threshold=(
            None if sim_cfg.dissimilarity_threshold < 0
            else sim_cfg.dissimilarity_threshold
        ),
    )
    logging.info(
        "similarity matrix (%s): tau_sim=%.4f tau_dis=%.4f fractions %s",
        matrix.mode, matrix.tau_sim, matrix.tau_dis, matrix.fractions,
    )
    return matrix


def similarity_diagnostics(matrix, train_labels, seed):
    """P(same class | S=+1), P(different class | S=-1) on sampled pairs.

    For analysis only: stored with the results, never used to train or to
    select. Empty when the train set has no labels.
    """
    from uhga_tf import structured_similarity

    if train_labels is None or len(train_labels) == 0:
        return {}
    rows, cols = structured_similarity.sample_pairs(len(train_labels), seed)
    if isinstance(matrix, structured_similarity.StructuredSimilarity):
        block = matrix.block(rows, cols).numpy()
    else:
        block = matrix.similarity_matrix[np.ix_(rows, cols)]
    return structured_similarity.label_agreement(
        block, train_labels[rows], train_labels[cols]
    )


def itq_map(experiment, sets):
    """MAP of ITQ at the same code length on the same split: the bar.

    ITQ is fitted on the same train features in a second or two; a learned
    code that does not beat it is not worth training.
    """
    from uhga_tf import tables
    from uhga_tf.evaluation import metrics

    query_codes, database_codes = tables.shallow_codes(
        "ITQ", experiment.model.code_length, sets, experiment.train.seed
    )
    return float(metrics.mean_average_precision(
        query_codes, database_codes, sets.labels["query"],
        sets.labels["database"], top_k=experiment.eval.top_k or None,
        ap_denominator=experiment.eval.ap_denominator,
        empty_query=experiment.eval.empty_query,
    ))


def validation_map(validation_codes, database_codes, sets):
    """MAP@ALL of the validation queries against database \\ validation.

    The number to select defaults on (protocol.md §1.3); the reported
    query set is never used for that.
    """
    from uhga_tf.evaluation import metrics

    keep = retrieval_sets.validation_database_mask(sets)
    return float(metrics.mean_average_precision(
        validation_codes, database_codes[keep],
        sets.labels["validation"], sets.labels["database"][keep],
    ))


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
    tmp = path + ".tmp.keras"
    hasher.save(tmp)
    os.replace(tmp, path)


def _write_json_atomic(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_to_builtin)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _to_builtin(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")

