"""Server-side batching: concurrent requests merged into one graph run."""

import collections
import queue
import threading
import time

import numpy as np
import tensorflow as tf


class _Pending:
    __slots__ = ("key", "function", "input_name", "array", "done", "result")

    def __init__(self, key, function, input_name, array):
        self.key = key
        self.function = function
        self.input_name = input_name
        self.array = array
        self.done = threading.Event()
        self.result = None  # dict of arrays, or an exception


class Batcher:
    """Merge concurrent single-input requests into batched graph runs."""

    def __init__(self, max_batch_size, batch_timeout_ms):
        self.max_batch_size = max_batch_size
        self.timeout_s = batch_timeout_ms / 1000.0
        self._queue = queue.Queue()
        self._carry = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="uhga-batcher", daemon=True
        )
        self._thread.start()

    def run(self, servable, signature_name, input_name, array):
        """Run `array` through the signature, possibly with other requests.

        Returns:
            {output_name: np.ndarray} for this request's items only.
        """
        key = (id(servable), signature_name, input_name, array.shape[1:])
        pending = _Pending(
            key, servable.functions[signature_name], input_name, array
        )
        self._queue.put(pending)
        pending.done.wait()
        if isinstance(pending.result, BaseException):
            raise pending.result
        return pending.result

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def _next(self, timeout):
        if self._carry:
            return self._carry.popleft()
        return self._queue.get(timeout=timeout)

    def _loop(self):
        while not self._stop.is_set():
            try:
                first = self._next(timeout=0.1)
            except queue.Empty:
                continue
            batch, size = [first], len(first.array)
            deadline = time.monotonic() + self.timeout_s
            skipped = []
            while size < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    if self._carry:
                        item = self._carry.popleft()
                    elif remaining > 0:
                        item = self._queue.get(timeout=remaining)
                    else:
                        item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if (
                    item.key == first.key
                    and size + len(item.array) <= self.max_batch_size
                ):
                    batch.append(item)
                    size += len(item.array)
                else:
                    skipped.append(item)
            self._carry.extendleft(reversed(skipped))
            self._execute(batch)

    @staticmethod
    def _execute(batch):
        function, input_name = batch[0].function, batch[0].input_name
        try:
            arrays = [item.array for item in batch]
            merged = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            outputs = function(**{input_name: tf.constant(merged)})
            outputs = {k: v.numpy() for k, v in outputs.items()}
        except tf.errors.OpError as e:
            if len(batch) == 1:
                batch[0].result = e
                batch[0].done.set()
                return
            # One bad request must not fail the others: run each alone.
            for item in batch:
                Batcher._execute([item])
            return
        except Exception as e:  # noqa: BLE001 - handed to the waiting thread
            for item in batch:
                item.result = e
                item.done.set()
            return
        start = 0
        for item in batch:
            stop = start + len(item.array)
            item.result = {k: v[start:stop] for k, v in outputs.items()}
            start = stop
            item.done.set()
