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

import keras
import numpy as np
import tensorflow as tf

from uhga_tf import similarity as similarity_lib
from uhga_tf import structured_similarity
from uhga_tf.models import attention_net as attention_lib
from uhga_tf.models import hash_layer as hash_layer_lib
from uhga_tf.training import hash_optimizer as hash_optimizer_lib

LOSSES = ("ga_logistic", "ssdh_l2")
LOOKAHEADS = ("jvp", "second_order")
PAIRINGS = ("cross", "within")


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


def pair_loss_and_grad(u, v, similarity_block, loss="ga_logistic",
                       sigmoid_param=0.2, positive_weight=10.0):
    """Pairwise loss (7) or (22) and G = dL/dQ (8).

    Args:
        u: [B1, K], v: [B2, K] relaxed codes.
        similarity_block: [B1, B2] S entries in {-1, 0, +1} (any dtype).

    Returns:
        (loss scalar, G [B1, B2]); both differentiable in u, v.
    """
    s_entries = tf.cast(similarity_block, u.dtype)
    q = tf.matmul(u, v, transpose_b=True)
    if loss == "ga_logistic":
        target = tf.cast(tf.equal(s_entries, 1.0), u.dtype)
        labeled = tf.cast(tf.not_equal(s_entries, 0.0), u.dtype)
        weight = labeled * (1.0 + (positive_weight - 1.0) * target)  # (6)
        total = tf.reduce_sum(weight)
        gq = sigmoid_param * q
        value = tf.math.divide_no_nan(
            tf.reduce_sum(weight * (tf.nn.softplus(gq) - target * gq)), total
        )
        grad = tf.math.divide_no_nan(
            sigmoid_param * weight * (tf.sigmoid(gq) - target), total
        )
        return value, grad
    code_length = tf.cast(tf.shape(u)[1], u.dtype)
    pairs = tf.cast(tf.shape(u)[0] * tf.shape(v)[0], u.dtype)
    residual = q / code_length - s_entries
    magnitude = tf.abs(s_entries)
    value = tf.reduce_sum(magnitude * tf.square(residual)) / pairs  # (22)
    grad = 2.0 * magnitude * residual / (code_length * pairs)
    return value, grad


@keras.saving.register_keras_serializable(package="uhga_tf")
class UHGAModel(keras.Model):
    """Train a hasher with gradient attention (GA) on a similarity matrix.

    Data per replica: ``pairing="cross"``: ((features_1, index_1),
    (features_2, index_2)), features float [b, D], index int [b] rows of S;
    ``pairing="within"``: (features, index). Keras' (x, None, None) wrapping
    from ``train_on_batch`` is accepted.

    Example:
    >>> model = UHGAModel(build_hasher(1280, 64), sim, code_length=64)
    >>> model.compile(hash_optimizer=HashOptimizer(5e-4),
    ...               attention_optimizer=keras.optimizers.Adam(0.05,
    ...                                                         epsilon=1e-8))
    >>> model.fit(dataset)
    """

    def __init__(
        self,
        hasher,
        similarity_matrix,
        *,
        code_length,
        loss="ga_logistic",
        attention=True,
        lookahead="jvp",
        sigmoid_param=0.2,
        positive_weight=10.0,
        pairing="cross",
        scale_schedule="sqrt_step",
        scale_step=200,
        scale_gamma=0.005,
        scale_power=0.5,
        attention_hidden=100,
        attention_grad_p=10.0,
        attention_budget=2.0,
        attention_chunk_rows=0,
        quantization_weight=0.0,
        balance_weight=0.0,
        seed=0,
        attention_dtype="float32",
        attention_jit_compile=True,
        replica_batch_size=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if loss not in LOSSES:
            raise ValueError(
                f"loss must be one of {LOSSES}; received loss={loss!r}"
            )
        if lookahead not in LOOKAHEADS:
            raise ValueError(
                f"lookahead must be one of {LOOKAHEADS}; received "
                f"lookahead={lookahead!r}"
            )
        if pairing not in PAIRINGS:
            raise ValueError(
                f"pairing must be one of {PAIRINGS}; received "
                f"pairing={pairing!r}"
            )
        if scale_schedule not in hash_layer_lib.SCALE_SCHEDULES:
            raise ValueError(
                f"scale_schedule must be one of "
                f"{hash_layer_lib.SCALE_SCHEDULES}; received "
                f"scale_schedule={scale_schedule!r}"
            )
        if not sigmoid_param > 0:
            raise ValueError(
                "sigmoid_param must be > 0; received "
                f"sigmoid_param={sigmoid_param!r}"
            )
        if not attention_budget > 0:
            raise ValueError(
                "attention_budget must be > 0; received "
                f"attention_budget={attention_budget!r}"
            )
        if not isinstance(attention_chunk_rows, int) or attention_chunk_rows < 0:
            raise ValueError(
                "attention_chunk_rows must be an integer >= 0; received "
                f"attention_chunk_rows={attention_chunk_rows!r}"
            )
        if not balance_weight >= 0:
            raise ValueError(
                "balance_weight must be >= 0; received "
                f"balance_weight={balance_weight!r}"
            )
        if not quantization_weight >= 0:
            raise ValueError(
                "quantization_weight must be >= 0; received "
                f"quantization_weight={quantization_weight!r}"
            )
        # S is either a dense int8 [N, N] matrix (the paper's modes) or a
        # compact StructuredSimilarity whose batch blocks are built per step.
        self._structure = None
        if isinstance(
            similarity_matrix, structured_similarity.StructuredSimilarity
        ):
            self._structure = similarity_matrix
            matrix = None
        else:
            matrix = np.asarray(
                getattr(similarity_matrix, "similarity_matrix",
                        similarity_matrix)
            )
            if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
                raise ValueError(
                    "similarity_matrix must be square [N, N]; received shape "
                    f"{matrix.shape}"
                )
        self.hasher = hasher
        self.code_length = int(code_length)
        self.loss_name = loss
        self.attention = bool(attention)
        self.lookahead = lookahead
        self.sigmoid_param = float(sigmoid_param)
        self.positive_weight_setting = positive_weight
        self.positive_weight = similarity_lib.resolve_positive_weight(
            positive_weight,
            matrix if self._structure is None else self._structure,
        )
        self.pairing = pairing
        self.scale_schedule = scale_schedule
        self.scale_step = scale_step
        self.scale_gamma = scale_gamma
        self.scale_power = scale_power
        self.attention_hidden = attention_hidden
        self.attention_grad_p = float(attention_grad_p)
        self.attention_budget = float(attention_budget)
        self.attention_chunk_rows = attention_chunk_rows
        self.quantization_weight = float(quantization_weight)
        self.balance_weight = float(balance_weight)
        self.seed = seed
        self.attention_dtype = attention_dtype
        self.attention_jit_compile = bool(attention_jit_compile)
        # MultiWorkerMirroredStrategy hands replicas batches of unknown
        # static size; the attention kernels need it, so the runner states it.
        self.replica_batch_size = replica_batch_size
        if self._structure is None:
            self._similarity = tf.constant(matrix.astype(np.int8))
        else:
            self._structure_tensors = self._structure.tensors()
        self.step = self.add_weight(
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            name="step",
            aggregation="only_first_replica",
        )
        self.attention_net = None
        if self.attention:
            self.attention_net = attention_lib.AttentionNet(
                hidden_units=attention_hidden,
                grad_p=attention_grad_p,
                seed=seed,
                dtype=attention_dtype,
                name="attention_net",
            )
            self.attention_net.build((None, attention_lib.NUM_INPUTS))
        names = ["pair_loss", "scale", "learning_rate"]
        if self.attention:
            names += [
                "lookahead_loss",
                "attention_loss",
                "attention_mean",
                "attention_std",
            ]
        self._trackers = {n: keras.metrics.Mean(name=n) for n in names}
        self.hash_optimizer = None
        self.attention_optimizer = None

    # ------------------------------------------------------------------ API
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
        return self.encode(features, training=training)

    def current_scale(self, step=None):
        """s_t at ``step`` (default: the step variable, at least 1)."""
        step = self.step if step is None else step
        return hash_layer_lib.scale_at_step(
            tf.maximum(tf.convert_to_tensor(step, tf.int64), 1),
            self.scale_schedule,
            self.scale_step,
            self.scale_gamma,
            self.scale_power,
        )

    def encode(self, features, training=False):
        """Relaxed codes tanh(s_t z) [b, K] at the current scale."""
        z = self.hasher(features, training=training)
        return tf.tanh(tf.cast(self.current_scale(), z.dtype) * z)

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
        """S entries [b1, b2] (int8) of two batches of train rows."""
        if self._structure is None:
            return tf.gather(
                tf.gather(self._similarity, index_1, axis=0), index_2, axis=1
            )
        return structured_similarity.similarity_block(
            self._structure.mode, self._structure_tensors, index_1, index_2
        )

    def _split(self, codes, size):
        if self.pairing == "cross":
            return codes[:size], codes[size:]
        return codes, codes

    def _regularizer(self, codes):
        """Quantization and bit-balance terms of the relaxed codes.

        quantization: mean((|u| - 1)^2), the relaxed-to-binary gap;
        balance: mean over bits of (batch mean of u)^2, zero when every bit
        is +1 on half the batch (a choice beyond the paper, docs/product_recipe.md).
        """
        value = tf.zeros([], codes.dtype)
        if self.quantization_weight > 0:
            value += self.quantization_weight * tf.reduce_mean(
                tf.square(tf.abs(codes) - 1.0)
            )
        if self.balance_weight > 0:
            value += self.balance_weight * tf.reduce_mean(
                tf.square(tf.reduce_mean(codes, axis=0))
            )
        return value

    def _loss(self, codes, size, similarity_block):
        """Loss of a [2B or B, K] code tensor (value only, differentiable)."""
        u, v = self._split(codes, size)
        value, _ = pair_loss_and_grad(
            u, v, similarity_block, self.loss_name, self.sigmoid_param,
            self.positive_weight,
        )
        return value + self._regularizer(codes)

    def _code_gradients(self, codes, size, similarity_block):
        """(loss, G, u, v, regularizer gradient or None) for the batch."""
        u, v = self._split(tf.stop_gradient(codes), size)
        value, grad = pair_loss_and_grad(
            u, v, similarity_block, self.loss_name, self.sigmoid_param,
            self.positive_weight,
        )
        extra = None
        if self.quantization_weight > 0 or self.balance_weight > 0:
            c = tf.stop_gradient(codes)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(c)
                regularizer = self._regularizer(c)
            value += regularizer
            extra = tape.gradient(regularizer, c)
        return value, grad, u, v, extra

    def _combine(self, grad_u, grad_v):
        if self.pairing == "cross":
            return tf.concat([grad_u, grad_v], axis=0)
        return grad_u + grad_v

    def _forward(self, values, non_trainable, features, scale):
        z, new_non_trainable = self.hasher.stateless_call(
            values, non_trainable, features, training=True
        )
        return tf.tanh(tf.cast(scale, z.dtype) * z), new_non_trainable

    def _attend(self, u, v, grad):
        dtype = self.attention_dtype
        attended_u, attended_v, stats = attention_lib.attend(
            tf.cast(u, dtype),
            tf.cast(v, dtype),
            tf.cast(grad, dtype),
            self.attention_net,
            budget=self.attention_budget,
            grad_p=self.attention_grad_p,
            chunk_rows=self.attention_chunk_rows,
            within=self.pairing == "within",
            return_stats=True,
            jit_compile=self.attention_jit_compile,
        )
        return attended_u, attended_v, stats

    # ------------------------------------------------------------ the step
    def compute_step(self, data, step=None):
        """Compute one step without changing any variable.

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
        scale = self.current_scale(step)
        learning_rate = self.hash_optimizer.learning_rate_at(step)
        features, index_1, index_2, size = self._unpack(data)
        similarity_block = self.similarity_block(index_1, index_2)
        replicas = float(_num_replicas())
        variables = self.hasher.trainable_variables
        values = [tf.convert_to_tensor(v) for v in variables]
        non_trainable = [
            tf.convert_to_tensor(v) for v in self.hasher.non_trainable_variables
        ]
        out = {"scale": scale, "learning_rate": learning_rate}
        phi = (
            [v.value for v in self.attention_net.trainable_variables]
            if self.attention
            else []
        )
        outer = tf.GradientTape(watch_accessed_variables=False)
        second_order = self.attention and self.lookahead == "second_order"
        if second_order:
            outer.__enter__()
            outer.watch(phi)
        try:
            with tf.GradientTape(watch_accessed_variables=False) as tape_w:
                tape_w.watch(values)
                codes, new_non_trainable = self._forward(
                    values, non_trainable, features, scale
                )
            value, grad, u, v, extra = self._code_gradients(
                codes, size, similarity_block
            )
            out["pair_loss"] = value
            out["new_non_trainable"] = new_non_trainable
            if self.attention:
                with tf.GradientTape(watch_accessed_variables=False) as tape_phi:
                    tape_phi.watch(phi)
                    attended_u, attended_v, stats = self._attend(u, v, grad)
                    # This replica's share of the global cotangent: the
                    # 1/replicas must be recorded here, because the phi
                    # gradient below is this replica's share and the Keras
                    # attention optimizer SUMS the shares over replicas.
                    attended_u = attended_u / replicas
                    attended_v = attended_v / replicas
                out.update(stats)
                code_grad = tf.cast(
                    self._combine(attended_u, attended_v), codes.dtype
                )
            else:
                code_grad = self._combine(
                    tf.matmul(grad, v), tf.matmul(grad, u, transpose_a=True)
                ) / replicas
            if extra is not None:
                code_grad += extra / replicas
            local_grads = tape_w.gradient(
                codes, values, output_gradients=code_grad
            )
            hash_grads = _all_reduce_sum(local_grads)
            new_values, new_momenta = self.hash_optimizer._step(
                values, hash_grads, learning_rate
            )
            if self.attention:
                with tf.GradientTape(watch_accessed_variables=False) as tape_la:
                    tape_la.watch(new_values)
                    codes_1, _ = self._forward(
                        new_values, non_trainable, features, scale
                    )
                    lookahead_loss = self._loss(codes_1, size,
                                                similarity_block)
                    scaled_lookahead = lookahead_loss / replicas
        finally:
            if second_order:
                outer.__exit__(None, None, None)
        out["hash_grads"] = hash_grads
        out["new_values"] = [tf.stop_gradient(w) for w in new_values]
        out["new_momenta"] = new_momenta
        if not self.attention:
            return out
        out["lookahead_loss"] = lookahead_loss
        if second_order:
            attention_grads = outer.gradient(scaled_lookahead, phi)
        else:
            lookahead_grads = _all_reduce_sum(
                tape_la.gradient(scaled_lookahead, new_values)
            )
            optimizer = self.hash_optimizer
            factor = 1.0 + optimizer.momentum if optimizer.nesterov else 1.0
            tangents = [
                -factor * tf.cast(learning_rate, w.dtype) * multiplier * g
                for w, g, multiplier in zip(
                    values, lookahead_grads, optimizer.lr_multipliers
                )
            ]
            with tf.autodiff.ForwardAccumulator(values, tangents) as acc:
                codes_0, _ = self._forward(
                    values, non_trainable, features, scale
                )
            directional = acc.jvp(codes_0)  # J(W) tangent, [2B, K]
            directional = tf.cast(directional, self.attention_dtype)
            if self.pairing == "cross":
                out_grads = [directional[:size], directional[size:]]
            else:
                out_grads = [directional, directional]
            attention_grads = tape_phi.gradient(
                [attended_u, attended_v], phi, output_gradients=out_grads
            )
        out["attention_grads"] = attention_grads
        return out

    def train_step(self, data):
        out = self.compute_step(data)
        hasher_variables = self.hasher.trainable_variables
        assign = hash_optimizer_lib.assign_variables
        assign(hasher_variables, out["new_values"])
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
        trackers = self._trackers
        trackers["pair_loss"].update_state(out["pair_loss"])
        trackers["scale"].update_state(out["scale"])
        trackers["learning_rate"].update_state(out["learning_rate"])
        if self.attention:
            trackers["lookahead_loss"].update_state(out["lookahead_loss"])
            trackers["attention_loss"].update_state(out["lookahead_loss"])
            trackers["attention_mean"].update_state(out["attention_mean"])
            trackers["attention_std"].update_state(out["attention_std"])
        logs = {name: t.result() for name, t in trackers.items()}
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
            code_length=self.code_length,
            loss=self.loss_name,
            attention=self.attention,
            lookahead=self.lookahead,
            sigmoid_param=self.sigmoid_param,
            positive_weight=self.positive_weight_setting,
            pairing=self.pairing,
            scale_schedule=self.scale_schedule,
            scale_step=self.scale_step,
            scale_gamma=self.scale_gamma,
            scale_power=self.scale_power,
            attention_hidden=self.attention_hidden,
            attention_grad_p=self.attention_grad_p,
            attention_budget=self.attention_budget,
            attention_chunk_rows=self.attention_chunk_rows,
            quantization_weight=self.quantization_weight,
            balance_weight=self.balance_weight,
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
        return cls(hasher, matrix, **config)
