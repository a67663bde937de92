"""Side work of a UHGA fit: checkpoints, code statistics, validation MAP.

Nothing here runs inside the train step: the callbacks encode eagerly at
epoch end (mAP is NumPy work) and write TensorBoard summaries and
`metrics.jsonl`, one JSON object per epoch.
"""

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from uhga_tf import codes as codes_lib
from uhga_tf.data import retrieval_sets
from uhga_tf.evaluation import metrics
from uhga_tf.models import attention_net
from uhga_tf.training import checkpoints


class CheckpointCallback(keras.callbacks.Callback):
    """Save a checkpoint every `every_steps` global steps and at each epoch end.

    `tf.train.CheckpointManager` writes the data files first and updates its
    `checkpoint` index last, so a kill mid-save leaves the previous complete
    checkpoint as the newest one that a restart can see.
    """

    def __init__(self, manager, every_steps):
        super().__init__()
        self.manager = manager
        self.every_steps = every_steps

    def _step(self):
        return int(self.model.step.numpy())

    def _save(self, step):
        try:
            self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError):
            # A full disk: keep the whole checkpoints, not the half one.
            checkpoints.remove_partial(self.manager, step)
            raise

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        if step % self.every_steps == 0:
            self._save(step)

    def on_epoch_end(self, epoch, logs=None):
        step = self._step()
        latest = self.manager.latest_checkpoint
        if not latest or not latest.endswith(f"-{step}"):
            self._save(step)


class CodeStatisticsCallback(keras.callbacks.Callback):
    """Per-epoch code statistics, validation MAP and metrics.jsonl.

    Logged under `<logdir>/codes`: the fraction of train-set code bits that
    flipped since the last epoch, per-bit balance, the relaxed-to-binary gap
    mean((|u| - 1)^2), histograms of relaxed codes
    (and of attention weights when the model exposes them), and validation
    MAP every `eval_every_epochs` epochs and at the last epoch (not on an
    unlabelled collection). Validation
    queries come from database \\ train and are ranked against the database
    without themselves, so the reported query set is never used for model
    selection (protocol.md §1.3).

    `encode_fn(set_name, rows=None) -> logits [n, K]` encodes rows of a set;
    the default runs `hasher` over `sets.features[set_name][rows]`. The
    end-to-end path passes an `image_inputs.ImageEncoder`, which encodes
    the images through the fine-tuned backbone instead.
    """

    def __init__(
        self, hasher, sets, logdir, metrics_path, eval_every_epochs,
        last_epoch, model=None, encode_fn=None,
    ):
        super().__init__()
        self.hasher = hasher
        self.sets = sets
        self.encode_fn = encode_fn or self._encode_features
        self.writer = tf.summary.create_file_writer(
            os.path.join(logdir, "codes"))
        self.metrics_path = metrics_path
        self.eval_every_epochs = eval_every_epochs
        self.last_epoch = last_epoch
        self.uhga_model = model
        self.previous_codes = None
        self.database_mask = retrieval_sets.validation_database_mask(sets)
        self.epoch_start = None

    def _encode_features(self, set_name, rows=None):
        features = self.sets.features[set_name]
        if rows is not None:
            features = features[rows]
        return np.concatenate(
            [
                np.asarray(self.hasher(features[i:i + 4096], training=False))
                for i in range(0, len(features), 4096)
            ]
        )

    def _logits_and_relaxed_codes(self, set_name, rows=None):
        scale = float(self.uhga_model.current_scale().numpy())
        logits = self.encode_fn(set_name, rows)
        return logits, np.tanh(scale * logits)

    def _attention_weights(self, relaxed_codes, sample=64):
        """a1 [sample, sample, K] on the first train rows (both branches).

        The train step keeps no Python-visible copy of its attention weights
        (it is traced once), so they are recomputed here on a fixed sample
        with the current attention net and the step's own loss gradient.
        """
        model = self.uhga_model
        if not getattr(model, "attention", False):
            return None
        rows = np.arange(min(2 * sample, len(relaxed_codes)))
        half = len(rows) // 2
        u = tf.constant(relaxed_codes[rows[:half]], tf.float32)
        v = tf.constant(relaxed_codes[rows[half:2 * half]], tf.float32)
        block = self._similarity_rows(rows[:half], rows[half:2 * half])
        _, grad = model.hashing_loss.pair_terms(u, v, block)
        return attention_net.attention_weights(
            u, v, grad, model.attention_net,
            grad_p=float(model.attention_config.attention_grad_p),
            jit_compile=False,
        )

    def _similarity_rows(self, rows_1, rows_2):
        """S block [len(rows_1), len(rows_2)] of train rows."""
        return self.uhga_model.similarity_block(rows_1, rows_2)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        epoch_number = epoch + 1
        step = int(self.uhga_model.step.numpy())
        logits, relaxed_codes = self._logits_and_relaxed_codes("train")
        train_codes = codes_lib.binarize(logits)
        record = {
            "epoch": epoch_number,
            "step": step,
            "epoch_time_s": time.time() - (self.epoch_start or time.time()),
        }
        record.update({k: float(v) for k, v in logs.items()})
        if self.previous_codes is not None:
            record["bits_flipped"] = float(
                np.mean(train_codes != self.previous_codes))
        self.previous_codes = train_codes
        record["bit_balance"] = codes_lib.bit_balance(train_codes)
        # How far the relaxed codes still are from the binary ones.
        record["quantization_gap"] = float(
            np.mean(np.square(np.abs(relaxed_codes) - 1.0)))
        if self.sets.labelled and (
            epoch_number % self.eval_every_epochs == 0
            or epoch_number == self.last_epoch
        ):
            database_labels = self.sets.labels["database"][self.database_mask]
            query_logits, _ = self._logits_and_relaxed_codes("validation")
            database_logits, _ = self._logits_and_relaxed_codes(
                "database", self.database_mask
            )
            record["validation_map"] = float(
                metrics.tie_aware_map(
                    codes_lib.binarize(query_logits),
                    codes_lib.binarize(database_logits),
                    self.sets.labels["validation"],
                    database_labels,
                )
            )
            logging.info(
                "epoch %d: validation MAP %.4f", epoch_number,
                record["validation_map"],
            )
        with self.writer.as_default(step=step):
            for key in ("bits_flipped", "bit_balance", "quantization_gap",
                        "validation_map"):
                if key in record:
                    tf.summary.scalar(key, record[key])
            tf.summary.histogram("relaxed_codes", relaxed_codes)
            weights = self._attention_weights(relaxed_codes)
            if weights is not None:
                tf.summary.histogram("attention_weights", weights)
        self.writer.flush()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
