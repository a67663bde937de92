"""Explicit SGD update of the hashing network, eq. (18).

PyTorch semantics (GA ``SGDWoReplace``), coupled L2 on every tensor:

    d = g + weight_decay * w ;  nu <- mu * nu + d ;
    w' = w - lr_g * (d + mu * nu)          (Nesterov)
    w' = w - lr_g * nu                     (plain momentum)

lr_g = learning_rate_at(t) * multiplier_g, with the step schedule
lr_t = learning_rate * lr_decay ** floor((t - 1) / lr_step_steps) (1-based t)
and multiplier_g = hash_lr_multiplier for hash-layer tensors, 1 otherwise.
The momentum buffers are tf.Variables tracked by this tf.Module, so a
tf.train.Checkpoint of the optimizer (or of a model holding it) saves them.
`optimizer="adam"` swaps the step for Adam's (beyond the paper; the
end-to-end fine-tuning of benchmarks/finetune_probe.py), keeping the rest.
"""

import keras
import tensorflow as tf


def _raw(variable):
    """The tf.Variable (or distributed variable) behind a Keras variable."""
    if isinstance(variable, keras.Variable):
        return variable.value
    return variable


def assign_variables(variables, values):
    """Assign values to variables, in replica or cross-replica context.

    Under tf.distribute in a replica context, the values must already be
    identical on every replica (they are: the gradients are all-reduced);
    the assignment goes through merge_call + extended.update, the same path
    Keras optimizers take, so variables with aggregation NONE work.
    """
    variables = list(variables)
    values = list(values)
    if not variables:
        return
    if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
        strategy = tf.distribute.get_strategy()
        for variable, value in zip(variables, values):
            strategy.extended.update(
                _raw(variable), lambda var, x: var.assign(x), args=(value,),
                group=False,
            )
        return
    if tf.distribute.has_strategy():
        def _merge(strategy, values):
            for variable, value in zip(variables, values):
                strategy.extended.update(
                    _raw(variable), lambda var, x: var.assign(x),
                    args=(value,), group=False,
                )

        tf.distribute.get_replica_context().merge_call(
            _merge, args=(values,)
        )
        return
    for variable, value in zip(variables, values):
        variable.assign(value)


class HashOptimizer(tf.Module):
    """Nesterov SGD with coupled L2 and per-variable lr multipliers (18).

    ``optimizer="adam"`` (beyond the paper) takes Adam's step instead, with
    the same coupled L2, multipliers and schedule; ``momenta`` then holds
    the first moments followed by the second ones (one state list, so the
    train step assigns it as it assigns SGD's momenta).

    Args:
        learning_rate: eta_0 > 0.
        momentum: mu in [0, 1) (Adam: beta_1).
        nesterov: Nesterov momentum (GA: True; SGD only).
        weight_decay: coupled L2 lambda_wd >= 0 on all tensors.
        hash_lr_multiplier: lr factor for hash-layer tensors (GA: 10).
        lr_step_steps: steps per lr decay stage (>= 1; GA: 1,200).
        lr_decay: factor per stage, in (0, 1].
        optimizer: "sgd" or "adam".
    """

    ADAM_BETA_2 = 0.999
    ADAM_EPSILON = 1e-7

    def __init__(
        self,
        learning_rate=1e-3,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        hash_lr_multiplier=10.0,
        lr_step_steps=1200,
        lr_decay=0.5,
        optimizer="sgd",
        name="hash_optimizer",
    ):
        super().__init__(name=name)
        if not learning_rate > 0:
            raise ValueError(
                "learning_rate must be > 0; received "
                f"learning_rate={learning_rate!r}"
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"momentum must be in [0, 1); received momentum={momentum!r}"
            )
        if not weight_decay >= 0:
            raise ValueError(
                "weight_decay must be >= 0; received "
                f"weight_decay={weight_decay!r}"
            )
        if not hash_lr_multiplier > 0:
            raise ValueError(
                "hash_lr_multiplier must be > 0; received "
                f"hash_lr_multiplier={hash_lr_multiplier!r}"
            )
        if not isinstance(lr_step_steps, int) or lr_step_steps < 1:
            raise ValueError(
                "lr_step_steps must be an integer >= 1; received "
                f"lr_step_steps={lr_step_steps!r}"
            )
        if not 0.0 < lr_decay <= 1.0:
            raise ValueError(
                f"lr_decay must be in (0, 1]; received lr_decay={lr_decay!r}"
            )
        if optimizer not in ("sgd", "adam"):
            raise ValueError(
                "optimizer must be 'sgd' or 'adam'; received "
                f"optimizer={optimizer!r}"
            )
        self.optimizer = optimizer
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.hash_lr_multiplier = float(hash_lr_multiplier)
        self.lr_step_steps = lr_step_steps
        self.lr_decay = float(lr_decay)
        self.iterations = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="iterations",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        self.momenta = []
        self.lr_multipliers = []
        self.built = False

    @classmethod
    def from_config(cls, train_config, lr_step_steps):
        """The optimizer of a `config.TrainConfig`; its lr decays every
        `lr_step_steps` steps (lr_step_epochs x steps per epoch)."""
        return cls(
            learning_rate=train_config.learning_rate,
            momentum=train_config.momentum,
            nesterov=train_config.nesterov,
            weight_decay=train_config.weight_decay,
            hash_lr_multiplier=train_config.hash_lr_multiplier,
            lr_decay=train_config.lr_decay,
            lr_step_steps=lr_step_steps,
            optimizer=train_config.optimizer,
        )

    def build(self, variables, lr_multipliers=None):
        """Create one momentum buffer per variable (call in strategy scope).

        Args:
            variables: the hashing-network trainable variables, in the order
                later passed to apply/update.
            lr_multipliers: one float per variable; default all 1.0.
        """
        variables = list(variables)
        if lr_multipliers is None:
            lr_multipliers = [1.0] * len(variables)
        lr_multipliers = [float(m) for m in lr_multipliers]
        if len(lr_multipliers) != len(variables):
            raise ValueError(
                "lr_multipliers must have one entry per variable "
                f"({len(variables)}); received {len(lr_multipliers)}"
            )
        if self.built:
            return
        self.lr_multipliers = lr_multipliers
        slots = 2 if self.optimizer == "adam" else 1
        self.momenta = [
            tf.Variable(
                tf.zeros(v.shape, dtype=v.dtype),
                trainable=False,
                name=f"momentum_{i}",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            for i, v in enumerate(variables * slots)
        ]
        self.built = True

    def learning_rate_at(self, step):
        """eta_t = eta_0 * lr_decay ** floor((t - 1) / lr_step_steps)."""
        t = tf.cast(step, tf.float64)
        stage = tf.floor((t - 1.0) / float(self.lr_step_steps))
        return tf.cast(
            self.learning_rate
            * tf.pow(tf.constant(self.lr_decay, tf.float64), stage),
            tf.float32,
        )

    def update(self, values, grads, learning_rate):
        """Return (w', nu') of (18) as tensors, changing no variable.

        Differentiable in grads and values; the momentum buffers are read
        (old values) but not changed.
        """
        self._check_built(values)
        if self.optimizer == "adam":
            return self._adam_update(values, grads, learning_rate)
        new_values, new_momenta = [], []
        for value, grad, momentum, multiplier in zip(
            values, grads, self.momenta, self.lr_multipliers
        ):
            lr = tf.cast(learning_rate, value.dtype) * multiplier
            direction = grad + self.weight_decay * value
            velocity = self.momentum * tf.cast(momentum, value.dtype) + (
                direction
            )
            if self.nesterov:
                new_values.append(
                    value - lr * (direction + self.momentum * velocity)
                )
            else:
                new_values.append(value - lr * velocity)
            new_momenta.append(velocity)
        return new_values, new_momenta

    def _adam_update(self, values, grads, learning_rate):
        """Adam's (w', [m'..., v'...]) at step iterations + 1."""
        count = len(values)
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1, beta_2 = self.momentum, self.ADAM_BETA_2
        # Bias-corrected step size, as Keras' Adam folds it; one per step.
        corrected = learning_rate * tf.sqrt(1 - tf.pow(beta_2, step)) / (
            1 - tf.pow(beta_1, step))
        new_values, firsts, seconds = [], [], []
        for value, grad, first, second, multiplier in zip(
            values, grads, self.momenta[:count], self.momenta[count:],
            self.lr_multipliers,
        ):
            dtype = value.dtype
            direction = grad + self.weight_decay * value
            first = beta_1 * tf.cast(first, dtype) + (1 - beta_1) * direction
            second = beta_2 * tf.cast(second, dtype) + (1 - beta_2) * tf.square(
                direction)
            lr = tf.cast(corrected * multiplier, dtype)
            new_values.append(
                value - lr * first / (tf.sqrt(second) + self.ADAM_EPSILON))
            firsts.append(first)
            seconds.append(second)
        return new_values, firsts + seconds

    def gradient_tangents(self, values, grads, learning_rate):
        """dw'/dg applied to `grads`: how w' of (18) moves along them.

        Used as the JVP tangent of the look-ahead (19'): -(1 + mu) lr_g g
        with Nesterov, -lr_g g without.
        """
        if self.optimizer != "sgd":
            raise ValueError(
                "the look-ahead of gradient attention differentiates the SGD "
                f"step of eq. (18); received optimizer={self.optimizer!r}"
            )
        factor = 1.0 + self.momentum if self.nesterov else 1.0
        return [
            -factor * tf.cast(learning_rate, w.dtype) * multiplier * g
            for w, g, multiplier in zip(values, grads, self.lr_multipliers)
        ]

    def apply(self, grads, variables, learning_rate=None):
        """Apply (18) to the variables and advance the momentum buffers.

        Args:
            grads: gradients, already summed over replicas.
            variables: the variables given to build, same order.
            learning_rate: eta_t; default from the schedule at
                iterations + 1.

        Returns:
            The new values (tensors).
        """
        variables = list(variables)
        self._check_built(variables)
        if learning_rate is None:
            learning_rate = self.learning_rate_at(self.iterations + 1)
        values = [tf.convert_to_tensor(v) for v in variables]
        new_values, new_momenta = self.update(values, list(grads),
                                              learning_rate)
        assign_variables(variables, new_values)
        assign_variables(self.momenta, new_momenta)
        assign_variables([self.iterations], [self.iterations + 1])
        return new_values

    def _check_built(self, values):
        if not self.built:
            raise ValueError(
                "HashOptimizer.build(variables) must be called before use; "
                "received an unbuilt optimizer"
            )
        if len(values) != len(self.lr_multipliers):
            raise ValueError(
                f"expected {len(self.lr_multipliers)} variables (as built); "
                f"received {len(values)}"
            )
