"""Prometheus metrics of the embedded server (prometheus_client).

One `ServingMetrics` per server, on its own registry (so two servers in one
process never share counters). Exposed by `uhga_tf.serving.rest` at
`/monitoring/prometheus/metrics`:

- `uhga_request_count_total{api, method, model, version, signature, status}`:
  requests answered, `status` being the gRPC status name (`OK`,
  `INVALID_ARGUMENT`, ...) whichever API (`grpc` or `rest`) carried them;
- `uhga_request_latency_seconds{...same labels...}`: a histogram of the time
  spent answering (parsing, validation, the graph run, the response);
- `uhga_model_version_loaded{model, version}`: 1 per loaded version, read
  from the server at scrape time, and `uhga_loaded_versions{model}`.

`version` is the version that answered when known, else the one asked for
(a number or `label:<label>`), else empty. Label values are drawn only from
what the server serves: a model name other than the served one, a version
that is not loaded, a label not configured or a signature no loaded version
has are counted as `"<other>"`, so junk requests can neither add series
nor crowd out a newly deployed version (MAX_LABEL_SETS stays as a last
bound on the combinations).
"""

import threading

import prometheus_client
from prometheus_client import core as prometheus_core

from uhga_tf.saved_model import wire_names

# Seconds; single images take ~ms, 64-image batches on 2 CPUs ~seconds.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
)  # fmt: skip
_LABELS = ("api", "method", "model", "version", "signature", "status")
MAX_LABEL_SETS = 256
OTHER = "<other>"


class _LoadedVersions:
    """Collector: the loaded versions, asked for at scrape time."""

    def __init__(self, model_name, versions, signatures=None, labels=()):
        self._model_name = model_name
        self._versions = versions

    def collect(self):
        versions = list(self._versions())
        loaded = prometheus_core.GaugeMetricFamily(
            "uhga_model_version_loaded",
            "1 for each version of the model that is loaded and serving.",
            labels=["model", "version"],
        )
        for version in versions:
            loaded.add_metric([self._model_name, str(version)], 1)
        yield loaded
        count = prometheus_core.GaugeMetricFamily(
            "uhga_loaded_versions",
            "Number of loaded versions of the model.",
            labels=["model"],
        )
        count.add_metric([self._model_name], len(versions))
        yield count


class ServingMetrics:
    """Request counters and latencies of one server, plus loaded versions.

    Args:
        model_name: the served model's name.
        versions: callable returning the loaded versions (ints).
        signatures: callable returning the loaded signature names, or
            None to accept any.
        labels: the configured version labels.
    """

    def __init__(self, model_name, versions, signatures=None, labels=()):
        self.registry = prometheus_client.CollectorRegistry()
        self._requests = prometheus_client.Counter(
            "uhga_request_count",
            "Requests answered, by API, method, model, version, signature "
            "and gRPC status.",
            _LABELS,
            registry=self.registry,
        )
        self._latency = prometheus_client.Histogram(
            "uhga_request_latency_seconds",
            "Time to answer a request, by API, method, model, version, "
            "signature and gRPC status.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LoadedVersions(model_name, versions))
        self._model_name = model_name
        self._versions = versions
        self._signatures = signatures
        self._labels = set(labels)
        self._seen = set()
        self._lock = threading.Lock()

    def observe(self, api, method, model_spec, version, status, seconds):
        """Count one answered request.

        Args:
            api: "grpc" or "rest".
            method: "Predict", "GetModelMetadata" or "GetModelStatus".
            model_spec: the request's ModelSpec (model, asked-for version,
                signature).
            version: the version that answered, or None.
            status: gRPC status name, e.g. "OK", "NOT_FOUND".
            seconds: wall time spent on the request.
        """
        if version is None:
            choice = model_spec.WhichOneof("version_choice")
            if choice == "version":
                version = model_spec.version.value
            elif choice == "version_label":
                version = f"label:{model_spec.version_label}"
        signature = model_spec.signature_name
        if method == "Predict" and not signature:
            signature = wire_names.SIGNATURE_IMAGE_BYTES
        key = self._known(model_spec.name, version, signature)
        with self._lock:
            if OTHER in key:
                pass  # one shared bucket, outside the cap
            elif key not in self._seen:
                if len(self._seen) < MAX_LABEL_SETS:
                    self._seen.add(key)
                else:
                    key = (OTHER, OTHER, OTHER)
        labels = (api, method, *key, status)
        self._requests.labels(*labels).inc()
        self._latency.labels(*labels).observe(seconds)

    def _known(self, model, version, signature):
        """(model, version, signature) with unserved values as OTHER."""
        if model != self._model_name:
            return OTHER, OTHER, OTHER
        if isinstance(version, str):  # "label:<label>"
            if version[len("label:"):] not in self._labels:
                version = OTHER
        elif version is not None and version not in self._versions():
            version = OTHER
        if signature and self._signatures is not None and (
            signature not in self._signatures()
        ):
            signature = OTHER
        return model, "" if version is None else str(version), signature

    def exposition(self):
        """Return (body bytes, content type) in Prometheus' text format."""
        return (
            prometheus_client.generate_latest(self.registry),
            prometheus_client.CONTENT_TYPE_LATEST,
        )
