"""Prometheus metrics of the service, in a registry of its own (one per app, so tests do not clash).

Names are the contract of docs/DESIGN.md; every series carries a `model` label (the model's name from
its bundle, or "_unknown" when a request named none that exists, so clients cannot grow the label set).
Time histograms resolve a few milliseconds to 30 s, finely where the service's latencies lie (20 ms to 3 s on
a CPU), so that histogram_quantile reads p95 and p99 within about 15 % rather than a bucket's factor of 2.5.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

TIME_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.125, 0.15, 0.2,
                0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNKNOWN_MODEL = "_unknown"
MODEL_STATE_KEY = "diffad_model"  # set by /inspect in the request's state: the label of requests_total


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # CPU seconds, resident memory, open files
        r = self.registry
        self.requests = Counter("diffad_requests", "Inspection requests answered, by HTTP status",
                                ["model", "status"], registry=r)
        self.request_duration = Histogram(
            "diffad_request_duration_seconds", "Time from upload received to answer built (decode, queue, "
            "inference, map encoding)", ["model"], buckets=TIME_BUCKETS, registry=r)
        self.queue_duration = Histogram(
            "diffad_queue_duration_seconds", "Time a request waited in its model's queue before its batch ran",
            ["model"], buckets=TIME_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "diffad_inference_duration_seconds", "Backend time per batch", ["model"], buckets=TIME_BUCKETS,
            registry=r)
        self.batch_size = Histogram("diffad_batch_size", "Requests per batch run by the backend", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("diffad_queue_depth", "Requests waiting in the model's queue", ["model"],
                                 registry=r)
        self.backend_info = Gauge(
            "diffad_backend_info", "1 for the backend serving the model: its name, device and precision, and "
            "fallback=\"true\" when backend=auto could not use the TensorRT engine it found",
            ["model", "backend", "device", "precision", "fallback"], registry=r)
        self._backend_labels: set[tuple[str, ...]] = set()
        self.decoding = Gauge("diffad_decoding_requests", "Requests admitted and being read or decoded (they hold "
                              "a place in the queue: diffad_queue_depth counts them)", ["model"], registry=r)
        self.deadline_dropped = Counter(
            "diffad_deadline_dropped", "Requests answered 504 before their batch ran, because their deadline "
            "would pass before the batch could finish: work nobody would wait for is not computed",
            ["model"], registry=r)
        self.model_ready = Gauge("diffad_model_ready", "1 once the model is loaded and warmed up, else 0",
                                 ["model"], registry=r)
        self.model_info = Gauge("diffad_model_info", "1 for the version serving the model (the first 12 hex "
                                "digits of its ONNX file's SHA-256)", ["model", "version"], registry=r)
        self._versions: dict[str, str] = {}
        self.reloads = Counter("diffad_model_reloads", "POST /models/{name}/reload, by result (reloaded, "
                               "unchanged, failed)", ["model", "result"], registry=r)

    def set_backend(self, model: str, backend: str, device: str, precision: str, fallback: str | None) -> None:
        """diffad_backend_info: 1 for what serves the model now (a reopened model's old series removed)."""
        for labels in [k for k in self._backend_labels if k[0] == model]:
            self.backend_info.remove(*labels)
            self._backend_labels.discard(labels)
        labels = (model, backend, device, precision, "true" if fallback else "false")
        self.backend_info.labels(*labels).set(1)
        self._backend_labels.add(labels)

    def set_version(self, model: str, version: str) -> None:
        """diffad_model_info: 1 for the version serving the model now; the version it replaced is removed."""
        previous = self._versions.get(model)
        if previous is not None and previous != version:
            self.model_info.remove(model, previous)
        self.model_info.labels(model, version).set(1)
        self._versions[model] = version

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
