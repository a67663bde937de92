"""UHGAModel: the GA training step of method.md §11 (eqs. (4)-(20), (22)).

One step: forward the hasher on the 2B features under a tape, relaxed codes
tanh(s_t z), code gradients of the pairwise loss, attention -> Ĝ, backprop
Ĝ to the hasher, explicit update (18), look-ahead loss (19) at the updated
weights (``hasher.stateless_call``), dphi by a JVP (19') or a second-order
tape, Adam on phi (20).

Distribution (MirroredStrategy / MultiWorkerMirroredStrategy): every replica
pairs only its local batch (S rows gathered for the local indices); its code
gradient is divided by ``num_replicas_in_sync`` after the attention (the
attention sees the replica's own G, as a single device would) and *inside*
the phi tape, so that the phi gradient of each replica is its share of the
global one; the hasher gradient is all-reduced (SUM) before (18) so all
replicas apply the same update, the look-ahead gradient is all-reduced too
(the JVP tangent is the global one), and the phi shares are summed by the
Keras attention optimizer (its apply all-reduces with SUM; never all-reduce
dphi by hand as well). The result equals a single device averaging the
per-replica half-batch steps (tests/test_distributed.py, both look-aheads).
"""

import contextlib
import dataclasses
import typing

import keras
import numpy as np
import tensorflow as tf

from uhga_tf import config as config_lib
from uhga_tf import similarity as similarity_lib
from uhga_tf.models import attention_net as attention_lib
from uhga_tf.models import hash_layer as hash_layer_lib
from uhga_tf.training import hash_optimizer as hash_optimizer_lib
from uhga_tf.training import losses

# Logged under a second name for the dashboards and tests that read it.
_LOG_ALIASES = {"attention_loss": "lookahead_loss"}


class _StepInputs(typing.NamedTuple):
    """What every phase of one step reads (nothing here changes)."""

    features: tf.Tensor  # [2B or B, ...] both branches concatenated
    index_1: tf.Tensor  # S rows of the first branch
    index_2: tf.Tensor  # S columns of the second branch
    size: tf.Tensor  # rows of the first branch
    similarity_block: tf.Tensor  # [b1, b2] int8
    scale: tf.Tensor  # s_t of eq. (4)
    learning_rate: tf.Tensor  # eta_t
    values: list  # W, the hasher's trainable values
    non_trainable: list  # the hasher's other state (dropout seeds, BN)
    phi: list  # the attention net's variables ([] without attention)
    replicas: float  # replicas in sync


class _Attended(typing.NamedTuple):
    """Ĝ (this replica's share) and the tape that recorded it from phi."""

    u: tf.Tensor
    v: tf.Tensor
    stats: dict  # attention_mean, attention_std
    tape: tf.GradientTape


class _HashUpdate(typing.NamedTuple):
    """Result of the hash-update phase: W' and nu' of eq. (18)."""

    pair_loss: tf.Tensor
    hash_grads: list  # ĝ_W, all-reduced
    new_values: list
    new_momenta: list
    new_non_trainable: list
    attended: typing.Optional[_Attended]  # None without attention


class _Lookahead(typing.NamedTuple):
    """Look-ahead loss (19) at W' and the tape that recorded it from W'."""

    loss: tf.Tensor
    scaled_loss: tf.Tensor  # this replica's share: loss / replicas
    tape: tf.GradientTape


def _num_replicas():
    context = tf.distribute.get_replica_context()
    if context is None:
        return 1
    return context.num_replicas_in_sync


def _all_reduce_sum(values):
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


@keras.saving.register_keras_serializable(package="uhga_tf")
class UHGAModel(keras.Model):
    """Train a hasher with gradient attention (GA) on a similarity matrix.

    Built from whole config sections: `loss_config` (`config.LossConfig`:
    loss, pairing, omega, scale schedule, regularizers) and
    `attention_config` (`config.AttentionConfig`: GA on/off, look-ahead,
    attention MLP); both are validated by their dataclasses.

    Data per replica: ``pairing="cross"``: ((features_1, index_1),
    (features_2, index_2)), features float [b, D], index int [b] rows of S;
    ``pairing="within"``: (features, index). Keras' (x, None, None) wrapping
    from ``train_on_batch`` is accepted.

    Names: the hasher outputs ``logits`` z (pre-activation), the model
    ``relaxed_codes`` tanh(s_t z); ``codes`` are the int8 ±1 of
    `uhga_tf.codes.binarize`.

    Example:
    >>> model = UHGAModel(build_hasher(1280, 64), sim, experiment.loss,
    ...                   experiment.attention)
    >>> model.compile(hash_optimizer=HashOptimizer(5e-4),
    ...               attention_optimizer=keras.optimizers.Adam(0.05,
    ...                                                         epsilon=1e-8))
    >>> model.fit(dataset)
    """

    def __init__(
        self,
        hasher,
        similarity_matrix,
        loss_config=None,
        attention_config=None,
        *,
        seed=0,
        attention_dtype="float32",
        attention_jit_compile=True,
        replica_batch_size=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.loss_config = loss_config or config_lib.LossConfig()
        self.attention_config = (
            attention_config or config_lib.AttentionConfig()
        )
        self.hasher = hasher
        self.seed = seed
        self.attention_dtype = attention_dtype
        self.attention_jit_compile = bool(attention_jit_compile)
        # MultiWorkerMirroredStrategy hands replicas batches of unknown
        # static size; the attention kernels need it, so the runner states it.
        self.replica_batch_size = replica_batch_size
        self._set_similarity(similarity_matrix)
        self.step = self.add_weight(
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            name="step",
            aggregation="only_first_replica",
        )
        self.attention_net = None
        names = ["pair_loss", "scale", "learning_rate"]
        if self.attention:
            att = self.attention_config
            self.attention_net = attention_lib.AttentionNet(
                hidden_units=att.attention_hidden,
                grad_p=att.attention_grad_p,
                seed=seed,
                dtype=attention_dtype,
                name="attention_net",
            )
            self.attention_net.build((None, attention_lib.NUM_INPUTS))
            names += ["lookahead_loss", "attention_mean", "attention_std"]
        self._trackers = {n: keras.metrics.Mean(name=n) for n in names}
        self.hash_optimizer = None
        self.attention_optimizer = None

    def _set_similarity(self, similarity_matrix):
        """Keep S and resolve omega (`positive_weight` None = auto) on it.

        Any S of `uhga_tf.similarity` (a dense int8 [N, N] matrix, the
        paper's modes, or a compact structure whose batch blocks are built
        per step); a bare int8 [N, N] array is wrapped as a dense S.
        """
        self._similarity = similarity_lib.as_similarity(similarity_matrix)
        self._similarity_tensors = self._similarity.tensors()
        weight = self.loss_config.positive_weight
        self.positive_weight = similarity_lib.resolve_positive_weight(
            "auto" if weight is None else weight, self._similarity
        )

    # ------------------------------------------------------------------ API
    @property
    def attention(self):
        """True when the model trains with gradient attention (Ours+GA)."""
        return self.attention_config.attention

    @property
    def lookahead(self):
        """`jvp` (19') or `second_order` (literal); settable."""
        return self.attention_config.lookahead

    @lookahead.setter
    def lookahead(self, value):
        self.attention_config = dataclasses.replace(
            self.attention_config, lookahead=value
        )

    @property
    def pairing(self):
        return self.loss_config.pairing

    def compile(self, hash_optimizer=None, attention_optimizer=None, **kwargs):
        """Attach one optimizer per sub-network (call in strategy scope).

        Args:
            hash_optimizer: HashOptimizer (explicit eq. (18)); required.
            attention_optimizer: Keras optimizer for phi, e.g.
                ``keras.optimizers.Adam(lr, epsilon=1e-8)``; required when
                attention is on.
        """
        for name in ("optimizer", "loss"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"UHGAModel.compile takes hash_optimizer= and "
                    f"attention_optimizer=, not {name}=; received "
                    f"{name}={kwargs[name]!r}"
                )
            kwargs.pop(name, None)
        if not isinstance(hash_optimizer, hash_optimizer_lib.HashOptimizer):
            raise ValueError(
                "hash_optimizer must be a HashOptimizer; received "
                f"hash_optimizer={hash_optimizer!r}"
            )
        if self.attention and attention_optimizer is None:
            raise ValueError(
                "attention_optimizer is required when attention=True; "
                "received attention_optimizer=None"
            )
        super().compile(**kwargs)
        self.hash_optimizer = hash_optimizer
        variables = self.hasher.trainable_variables
        hash_ids = {
            id(v)
            for layer in self.hasher._flatten_layers()
            if isinstance(layer, hash_layer_lib.HashLayer)
            for v in layer.trainable_variables
        }
        multipliers = [
            hash_optimizer.hash_lr_multiplier if id(v) in hash_ids else 1.0
            for v in variables
        ]
        hash_optimizer.build(variables, multipliers)
        self.attention_optimizer = attention_optimizer
        if self.attention:
            attention_optimizer.build(self.attention_net.trainable_variables)

    @property
    def metrics(self):
        return list(self._trackers.values())

    def call(self, features, training=False):
        return self.relaxed_codes(features, training=training)

    def current_scale(self, step=None):
        """s_t at ``step`` (default: the step variable, at least 1)."""
        step = self.step if step is None else step
        loss = self.loss_config
        return hash_layer_lib.scale_at_step(
            tf.maximum(tf.convert_to_tensor(step, tf.int64), 1),
            loss.scale_schedule,
            loss.scale_step,
            loss.scale_gamma,
            loss.scale_power,
        )

    def relaxed_codes(self, features, training=False):
        """Relaxed codes tanh(s_t z) [b, K] at the current scale."""
        logits = self.hasher(features, training=training)
        return tf.tanh(tf.cast(self.current_scale(), logits.dtype) * logits)

    # ------------------------------------------------------------- helpers
    def _unpack(self, data):
        if isinstance(data, (tuple, list)):
            rest = list(data[1:])
            if len(data) in (1, 2, 3) and all(r is None for r in rest):
                data = data[0]
        if self.replica_batch_size:
            data = tf.nest.map_structure(self._static_batch, data)
        if self.pairing == "cross":
            (features_1, index_1), (features_2, index_2) = data
            features = tf.concat([features_1, features_2], axis=0)
            return features, index_1, index_2, tf.shape(features_1)[0]
        features, index = data
        return features, index, index, tf.shape(features)[0]

    def _static_batch(self, tensor):
        shape = [self.replica_batch_size] + tensor.shape.as_list()[1:]
        return tf.ensure_shape(tensor, shape)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras would reduce a sample batch across replicas to build the
        # model symbolically; that reduce fails for nested per-replica data
        # under MultiWorkerMirroredStrategy. Every variable of UHGAModel
        # exists once compile has run, so there is nothing left to build.
        if self.hash_optimizer is not None and all(
            layer.built for layer in self._flatten_layers(include_self=False)
        ):
            self.built = True
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def similarity_block(self, index_1, index_2):
        """S entries [b1, b2] of two batches of train rows (int8, or float
        for a graded S)."""
        return self._similarity.block(
            index_1, index_2, self._similarity_tensors)

    @property
    def hashing_loss(self):
        """The step's loss (`losses.HashingLoss`) under this model's config.

        Made on each use, so it always carries the current omega.
        """
        return losses.HashingLoss(
            self.loss_config, self.positive_weight, self.pairing
        )

    def _combine(self, grad_u, grad_v):
        if self.pairing == "cross":
            return tf.concat([grad_u, grad_v], axis=0)
        return grad_u + grad_v

    def _forward(self, values, non_trainable, features, scale):
        """(relaxed codes at weights `values`, new non-trainable state)."""
        logits, new_non_trainable = self.hasher.stateless_call(
            values, non_trainable, features, training=True
        )
        return (
            tf.tanh(tf.cast(scale, logits.dtype) * logits),
            new_non_trainable,
        )

    def _attend(self, u, v, grad):
        dtype = self.attention_dtype
        att = self.attention_config
        return attention_lib.attend(
            tf.cast(u, dtype),
            tf.cast(v, dtype),
            tf.cast(grad, dtype),
            self.attention_net,
            budget=float(att.attention_budget),
            grad_p=float(att.attention_grad_p),
            chunk_rows=att.attention_chunk_rows,
            within=self.pairing == "within",
            return_stats=True,
            jit_compile=self.attention_jit_compile,
        )

    # ------------------------------------------------------------ the step
    def compute_step(self, data, step=None):
        """Compute one step without changing any variable.

        Phases: inputs -> hash update (forward at W, G, attention Ĝ, W' of
        (18)) -> look-ahead loss (19) at W' -> dphi, by a JVP (19') or by
        the second-order tape that stays open over all phases.

        Returns a dict: pair_loss, lookahead_loss (attention only),
        new_values (W' list), new_momenta, hash_grads (all-reduced ĝ_W),
        attention_grads (this replica's share of dphi; the Keras optimizer
        sums them over replicas), new_non_trainable, scale, learning_rate,
        attention_mean/std.
        """
        if self.hash_optimizer is None:
            raise ValueError(
                "UHGAModel must be compiled with hash_optimizer= before "
                "training; received an uncompiled model"
            )
        step = self.step + 1 if step is None else step
        inputs = self._step_inputs(data, step)
        second_order = self.attention and self.lookahead == "second_order"
        with contextlib.ExitStack() as stack:
            if second_order:
                outer = stack.enter_context(
                    tf.GradientTape(watch_accessed_variables=False)
                )
                outer.watch(inputs.phi)
            update = self._hash_update(inputs)
            if self.attention:
                lookahead = self._lookahead(inputs, update.new_values)
        out = {
            "scale": inputs.scale,
            "learning_rate": inputs.learning_rate,
            "pair_loss": update.pair_loss,
            "new_non_trainable": update.new_non_trainable,
            "hash_grads": update.hash_grads,
            "new_values": [tf.stop_gradient(w) for w in update.new_values],
            "new_momenta": update.new_momenta,
        }
        if not self.attention:
            return out
        out.update(update.attended.stats)
        out["lookahead_loss"] = lookahead.loss
        if second_order:
            out["attention_grads"] = outer.gradient(
                lookahead.scaled_loss, inputs.phi
            )
        else:
            out["attention_grads"] = self._jvp_attention_grads(
                inputs, update, lookahead
            )
        return out

    def _step_inputs(self, data, step):
        features, index_1, index_2, size = self._unpack(data)
        hasher = self.hasher
        return _StepInputs(
            features=features,
            index_1=index_1,
            index_2=index_2,
            size=size,
            similarity_block=self.similarity_block(index_1, index_2),
            scale=self.current_scale(step),
            learning_rate=self.hash_optimizer.learning_rate_at(step),
            values=[
                tf.convert_to_tensor(v) for v in hasher.trainable_variables
            ],
            non_trainable=[
                tf.convert_to_tensor(v) for v in hasher.non_trainable_variables
            ],
            phi=(
                [v.value for v in self.attention_net.trainable_variables]
                if self.attention
                else []
            ),
            replicas=float(_num_replicas()),
        )

    def _hash_update(self, inputs):
        """Forward at W, code gradient G (attended under GA), W' of (18)."""
        with tf.GradientTape(watch_accessed_variables=False) as tape_w:
            tape_w.watch(inputs.values)
            relaxed_codes, new_non_trainable = self._forward(
                inputs.values, inputs.non_trainable, inputs.features,
                inputs.scale,
            )
        pair_loss, grad, u, v, regularizer_grad = (
            self.hashing_loss.value_and_code_gradients(
                relaxed_codes, inputs.size, inputs.similarity_block
            )
        )
        attended = None
        if self.attention:
            attended = self._attended_gradients(inputs, u, v, grad)
            code_grad = tf.cast(
                self._combine(attended.u, attended.v), relaxed_codes.dtype
            )
        else:
            code_grad = self._combine(
                tf.matmul(grad, v), tf.matmul(grad, u, transpose_a=True)
            ) / inputs.replicas
        if regularizer_grad is not None:
            code_grad += regularizer_grad / inputs.replicas
        local_grads = tape_w.gradient(
            relaxed_codes, inputs.values, output_gradients=code_grad
        )
        hash_grads = _all_reduce_sum(local_grads)
        new_values, new_momenta = self.hash_optimizer.update(
            inputs.values, hash_grads, inputs.learning_rate
        )
        return _HashUpdate(
            pair_loss=pair_loss,
            hash_grads=hash_grads,
            new_values=new_values,
            new_momenta=new_momenta,
            new_non_trainable=new_non_trainable,
            attended=attended,
        )

    def _attended_gradients(self, inputs, u, v, grad):
        """Ĝ of the attention net, recorded on a tape from phi."""
        with tf.GradientTape(watch_accessed_variables=False) as tape_phi:
            tape_phi.watch(inputs.phi)
            attended_u, attended_v, stats = self._attend(u, v, grad)
            # This replica's share of the global cotangent: the 1/replicas
            # must be recorded here, because the phi gradient is this
            # replica's share and the Keras attention optimizer SUMS the
            # shares over replicas.
            attended_u = attended_u / inputs.replicas
            attended_v = attended_v / inputs.replicas
        return _Attended(attended_u, attended_v, stats, tape_phi)

    def _lookahead(self, inputs, new_values):
        """Look-ahead loss (19) at W', recorded on a tape from W'."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(new_values)
            relaxed_codes, _ = self._forward(
                new_values, inputs.non_trainable, inputs.features,
                inputs.scale,
            )
            loss = self.hashing_loss.value(
                relaxed_codes, inputs.size, inputs.similarity_block
            )
            scaled_loss = loss / inputs.replicas
        return _Lookahead(loss, scaled_loss, tape)

    def _jvp_attention_grads(self, inputs, update, lookahead):
        """dphi of (19'): the look-ahead gradient pushed through dW'/dĜ.

        dL(W')/dphi = <dL/dW', dW'/dĜ dĜ/dphi>; the first two factors are
        a JVP of the relaxed codes at W along the optimizer's tangent, which
        weights the attention tape's Ĝ.
        """
        lookahead_grads = _all_reduce_sum(
            lookahead.tape.gradient(lookahead.scaled_loss, update.new_values)
        )
        tangents = self.hash_optimizer.gradient_tangents(
            inputs.values, lookahead_grads, inputs.learning_rate
        )
        with tf.autodiff.ForwardAccumulator(inputs.values, tangents) as acc:
            relaxed_codes, _ = self._forward(
                inputs.values, inputs.non_trainable, inputs.features,
                inputs.scale,
            )
        # J(W) tangent, [2B or B, K]
        directional = tf.cast(acc.jvp(relaxed_codes), self.attention_dtype)
        if self.pairing == "cross":
            size = inputs.size
            out_grads = [directional[:size], directional[size:]]
        else:
            out_grads = [directional, directional]
        attended = update.attended
        return attended.tape.gradient(
            [attended.u, attended.v], inputs.phi, output_gradients=out_grads
        )

    def train_step(self, data):
        out = self.compute_step(data)
        assign = hash_optimizer_lib.assign_variables
        assign(self.hasher.trainable_variables, out["new_values"])
        assign(self.hash_optimizer.momenta, out["new_momenta"])
        assign(
            [self.hash_optimizer.iterations],
            [self.hash_optimizer.iterations + 1],
        )
        non_trainable = self.hasher.non_trainable_variables
        if non_trainable:
            assign(non_trainable, out["new_non_trainable"])
        if self.attention:
            self.attention_optimizer.apply(
                out["attention_grads"], self.attention_net.trainable_variables
            )
        self.step.assign_add(1)
        for name, tracker in self._trackers.items():
            tracker.update_state(out[name])
        logs = {name: t.result() for name, t in self._trackers.items()}
        for alias, name in _LOG_ALIASES.items():
            if name in logs:
                logs[alias] = logs[name]
        if isinstance(
            tf.distribute.get_strategy(),
            tf.distribute.MultiWorkerMirroredStrategy,
        ):
            # Keras reduces logs across workers with reduce(MEAN, axis=0),
            # which needs a leading axis; it returns the scalar mean.
            logs = {name: tf.reshape(v, [1]) for name, v in logs.items()}
        return logs

    def get_config(self):
        config = super().get_config()
        config.update(
            hasher=keras.saving.serialize_keras_object(self.hasher),
            loss_config=dataclasses.asdict(self.loss_config),
            attention_config=dataclasses.asdict(self.attention_config),
            seed=self.seed,
            attention_dtype=self.attention_dtype,
            attention_jit_compile=self.attention_jit_compile,
            replica_batch_size=self.replica_batch_size,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "similarity_matrix" not in config:
            raise ValueError(
                "UHGAModel.from_config needs config['similarity_matrix'] "
                "(int8 [N, N]; it is not stored in the config); received "
                "none"
            )
        hasher = keras.saving.deserialize_keras_object(config.pop("hasher"))
        matrix = config.pop("similarity_matrix")
        loss_config = config_lib.LossConfig(**config.pop("loss_config", {}))
        attention_config = config_lib.AttentionConfig(
            **config.pop("attention_config", {})
        )
        return cls(hasher, matrix, loss_config, attention_config, **config)
