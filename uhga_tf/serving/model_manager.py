"""Versions of one model under a base path: loading, polling, labels.

`ModelManager` keeps the newest `num_versions` integer version directories
of `<base>/<version>/` loaded, as TF-Serving's file-system source does: a
new version is loaded, warmed up with its recorded requests and swapped in;
requests already running keep the `Servable` they started with. A version
that fails to load is remembered with its error and skipped until its files
change (then it is retried, as TF-Serving retries failed loads).
"""

import os
import threading
import time

from absl import logging
import grpc
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from uhga_tf.saved_model import versions as versions_lib
from uhga_tf.saved_model import warmup as warmup_lib
from uhga_tf.saved_model import wire_names
from uhga_tf.serving.request_checks import RequestError

_INIT_OP_KEY = "__saved_model_init_op"


def _fingerprint(path):
    """(relative path, size, mtime_ns) of every file under a version.

    A failed version is retried once this changes, e.g. when a copy that
    wrote saved_model.pb before variables/ completes.
    """
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            try:
                stat = os.stat(full)
            except OSError:
                continue  # vanished while we looked: the next poll sees it
            files.append(
                (os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns)
            )
    return tuple(files)


class Servable:
    """One loaded version: the SavedModel, its SignatureDefs, its metadata."""

    def __init__(self, path, version):
        self.path = path
        self.version = version
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto = saved_model_pb2.SavedModel.FromString(f.read())
        self.signature_defs = {
            key: value
            for key, value in proto.meta_graphs[0].signature_def.items()
            if key != _INIT_OP_KEY
        }
        self._model = tf.saved_model.load(path)
        self.functions = dict(self._model.signatures)
        missing = set(self.signature_defs) - set(self.functions)
        if missing:
            raise ValueError(
                f"{path}: signatures {sorted(missing)} did not load"
            )

    def warmup_requests(self):
        """Return the PredictRequests in assets.extra (empty if none)."""
        path = os.path.join(
            self.path,
            wire_names.ASSETS_EXTRA,
            wire_names.WARMUP_FILENAME,
        )
        if not os.path.exists(path):
            return []
        return warmup_lib.read_warmup_requests(path)


class ModelManager:
    """Load, swap and look up versions of one model under a base path."""

    def __init__(self, base_path, num_versions=1, version_labels=None):
        self.base_path = base_path
        self.num_versions = num_versions
        self.version_labels = dict(version_labels or {})
        self._servables = {}  # version -> Servable; replaced, never mutated
        self._failed = {}  # version -> why it failed to load
        self._failed_files = {}  # version -> _fingerprint when it failed
        self._lock = threading.Lock()
        self.warmup = None  # callable(servable), set by the server

    def versions(self):
        """Return the loaded versions, oldest first."""
        return sorted(self._servables)

    def failed(self):
        """Return {version: error message} of versions that failed to load."""
        return dict(self._failed)

    def signature_names(self):
        """Return the signature names of the loaded versions."""
        return {
            name
            for servable in self._servables.values()
            for name in servable.signature_defs
        }

    def poll(self):
        """Scan the base path once; load new versions, unload old ones.

        A version that fails to load (any error: a garbage saved_model.pb,
        missing variables, a failing warm-up) is logged, remembered with its
        error and skipped; the next older version stands in for it.

        Returns:
            The versions loaded by this call.
        """
        available = versions_lib.list_versions(self.base_path)
        loaded = []
        chosen = 0
        for version in reversed(available):
            if chosen >= self.num_versions:
                break
            path = os.path.join(self.base_path, str(version))
            if version in self._failed:
                if _fingerprint(path) == self._failed_files.get(version):
                    continue
                # Its files changed (a copy completed, a fix landed):
                # retry, as TF-Serving retries failed loads.
                logging.info("Files of failed version %d changed; retrying",
                             version)
                del self._failed[version]
            if version in self._servables:
                chosen += 1
                continue
            start = time.monotonic()
            files = _fingerprint(path)
            try:
                servable = Servable(path, version)
                if self.warmup is not None:
                    self.warmup(servable)
            except Exception as e:  # noqa: BLE001 - one bad version only
                message = " ".join(
                    (str(e).strip() or type(e).__name__).split()
                )[:500]
                self._failed[version] = f"{type(e).__name__}: {message}"
                self._failed_files[version] = files
                logging.error(
                    "Failed to load version %d from %s: %s",
                    version, path, self._failed[version],
                )
                continue
            chosen += 1
            with self._lock:
                servables = dict(self._servables)
                servables[version] = servable
                self._servables = servables
            loaded.append(version)
            logging.info(
                "Loaded version %d from %s in %.2f s",
                version,
                path,
                time.monotonic() - start,
            )
        with self._lock:
            # A loaded version stays until newer ones replace it, even if its
            # directory vanishes: never drop to zero loaded versions.
            keep = set(sorted(self._servables)[-self.num_versions :])
            gone = sorted(set(self._servables) - keep)
            if gone:
                self._servables = {
                    v: s for v, s in self._servables.items() if v in keep
                }
        for version in gone:
            logging.info("Unloaded version %d", version)
        return loaded

    def get(self, model_spec, model_name):
        """Resolve a ModelSpec to a Servable or raise RequestError."""
        if model_spec.name != model_name:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: model "
                f"{model_spec.name!r} (this server serves {model_name!r})",
            )
        servables = self._servables
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version":
            version = model_spec.version.value
            if version not in servables:
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Servable not found for request: version {version} of "
                    f"model {model_name!r} (loaded versions: "
                    f"{sorted(servables)})",
                )
            return servables[version]
        if choice == "version_label":
            label = model_spec.version_label
            if label not in self.version_labels:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Unrecognized servable version label: {label!r} "
                    f"(known labels: {sorted(self.version_labels)})",
                )
            version = self.version_labels[label]
            if version not in servables:
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Servable not found for request: version {version} "
                    f"(label {label!r}) of model {model_name!r}",
                )
            return servables[version]
        if not servables:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: no version of model "
                f"{model_name!r} is loaded from {self.base_path}",
            )
        return servables[max(servables)]
