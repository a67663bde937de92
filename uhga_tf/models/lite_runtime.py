"""Frozen-backbone inference through TensorFlow Lite's XNNPACK kernels.

Feature extraction only runs the backbone forward. On 2 CPU cores the TFLite
interpreter (XNNPACK, float32) runs EfficientNet-Lite0 at 160 px about twice
as fast as a `tf.function` (`benchmarks/features.py` has both rows), which
halves the feature extraction of a first `configs/cifar.flags` run
(`--feature_runtime=tflite`). Its outputs equal
TensorFlow's up to float rounding: summation order differs, as it already
does between TensorFlow on CPUs with different instruction sets. The
exported SavedModel keeps the TensorFlow backbone.

The interpreter takes a fixed input shape, so a model is converted once per
batch size and a short last batch is padded with zeros (inference has no
batch statistics, so padding never changes the real rows).
"""

import os
import warnings

import numpy as np
import tensorflow as tf
# The public converter keeps Keras 3 variables as TFLite resource variables,
# which the interpreter reads uninitialised (garbage features, no error);
# a graph with the weights folded in as constants converts correctly.
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)


def _interpreter_class():
    """TFLite's Interpreter: LiteRT's package first, else `tf.lite`'s."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter
    except ImportError:
        return getattr(getattr(tf, "lite", None), "Interpreter", None)


def _num_threads():
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    if configured > 0:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LitePredictor:
    """`model` converted to TFLite for one batch size; call it on batches.

    Args:
        model: `keras.Model` of one image input `[b, S, S, 3]` (float32).
        batch_size: the largest batch it will be called with.
        num_threads: interpreter threads; None means TensorFlow's intra-op
            setting, else the CPUs this process may use.

    Raises:
        RuntimeError: TFLite is missing or cannot convert the model (an op
            without a TFLite kernel).
    """

    def __init__(self, model, batch_size, num_threads=None):
        interpreter_class = _interpreter_class()
        if interpreter_class is None or not hasattr(tf, "lite"):
            raise RuntimeError(
                "TFLite is not available in this TensorFlow build "
                f"({tf.__version__}); use runtime='tensorflow'"
            )
        self.batch_size = int(batch_size)
        input_shape = [self.batch_size] + list(model.input_shape[1:])

        @tf.function(input_signature=[tf.TensorSpec(input_shape, tf.float32)])
        def forward(images):
            return tf.cast(model(images, training=False), tf.float32)

        try:
            frozen = convert_variables_to_constants_v2(
                forward.get_concrete_function()
            )
            converter = tf.lite.TFLiteConverter.from_concrete_functions(
                [frozen], model
            )
            flatbuffer = converter.convert()
        except Exception as e:  # the converter raises several private types
            raise RuntimeError(
                f"TFLite cannot convert backbone {model.name!r}: "
                f"{type(e).__name__}: {str(e)[:500]}"
            ) from e
        # The interpreter reads weights from this buffer without copying
        # them: it must live as long as the interpreter.
        self._flatbuffer = flatbuffer
        with warnings.catch_warnings():
            # tf.lite.Interpreter warns that it moves to LiteRT.
            warnings.simplefilter("ignore")
            self._interpreter = interpreter_class(
                model_content=flatbuffer,
                num_threads=num_threads or _num_threads(),
            )
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]

    def __call__(self, images):
        """float32 features `[b, D]` of images `[b, S, S, 3]`, b <= batch_size."""
        images = np.asarray(images, np.float32)
        n = images.shape[0]
        if n > self.batch_size:
            raise ValueError(
                f"batch of {n} images exceeds the converted batch_size="
                f"{self.batch_size}"
            )
        if n < self.batch_size:
            padding = np.zeros(
                (self.batch_size - n,) + images.shape[1:], np.float32
            )
            images = np.concatenate([images, padding])
        self._interpreter.set_tensor(self._input, images)
        self._interpreter.invoke()
        return np.array(self._interpreter.get_tensor(self._output)[:n])
