"""The models a service holds: each bundle with its backend, its own thread, queue and batcher.

Construction checks the configuration (every bundle loads with its hashes verified; names are unique),
so a mistake stops the service before it listens. Opening the backends and warming them up happens
afterwards, in the background (`start`), while /healthz already answers and /readyz says 503; a model
turns ready after a warm-up batch at its largest batch size, which is also where TensorRT and ONNX
Runtime allocate their buffers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..export.bundle import Bundle, BundleError, load_bundle
from .backends import Backend, BackendFactory, open_backend
from .batcher import DynamicBatcher
from .metrics import ServiceMetrics
from .settings import Settings

log = logging.getLogger("diffad.service")

LOADING, READY, FAILED, STOPPED = "loading", "ready", "failed", "stopped"


@dataclass(eq=False)
class ModelRuntime:
    bundle: Bundle
    executor: ThreadPoolExecutor
    backend: Backend | None = None
    batcher: DynamicBatcher | None = None
    state: str = LOADING
    error: str | None = None
    warmup_s: float | None = None

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def ready(self) -> bool:
        return self.state == READY

    def status(self) -> dict:
        out = {"state": self.state}
        if self.error:
            out["error"] = self.error
        return out

    def info(self) -> dict:
        spec = self.bundle.input
        return {"name": self.name, "input_size": spec.size, "channels": spec.channels,
                "threshold": self.bundle.threshold, "calibrated": self.bundle.calibrated,
                "backend": self.backend.name if self.backend is not None else None,
                "max_batch_size": self.batcher.max_batch_size if self.batcher is not None else None,
                "state": self.state}


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: ServiceMetrics, backend_factory: BackendFactory | None = None):
        if not settings.models:
            raise ValueError("no model to serve: give bundle folders (diffad serve BUNDLE_DIR...) or DIFFAD_MODELS")
        self.settings = settings
        self.metrics = metrics
        self.backend_factory = backend_factory or open_backend
        self.models: dict[str, ModelRuntime] = {}
        for path in settings.models:
            bundle = load_bundle(path)
            if bundle.name in self.models:
                raise BundleError(f"two bundles are named {bundle.name!r} ({self.models[bundle.name].bundle.path} "
                                  f"and {path}): model names must be unique; export one with --name")
            if not bundle.calibrated:
                log.warning("model %s has no calibrated threshold: answers carry threshold, normalized_score and "
                            "is_anomalous as null unless the request gives ?threshold=", bundle.name)
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"diffad-{bundle.name}"[:32])
            self.models[bundle.name] = ModelRuntime(bundle, executor)
            metrics.model_ready.labels(bundle.name).set(0)
        self.draining = False

    @property
    def ready(self) -> bool:
        return not self.draining and all(m.ready for m in self.models.values())

    def status(self) -> dict:
        return {"ready": self.ready, "draining": self.draining,
                "models": {name: m.status() for name, m in self.models.items()}}

    async def start(self) -> None:
        """Open each model's backend on its own thread, warm it up, start its batcher (models in parallel)."""
        await asyncio.gather(*(self._start_one(m) for m in self.models.values()))

    async def _start_one(self, model: ModelRuntime) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        try:
            started = time.monotonic()
            model.backend = await loop.run_in_executor(model.executor, self.backend_factory, model.bundle, settings)
            limit = model.backend.max_batch_size
            batch_size = min(settings.max_batch_size, limit) if limit else settings.max_batch_size
            await loop.run_in_executor(model.executor, self._warm_up, model, batch_size)
            model.batcher = DynamicBatcher(model.name, model.backend, model.executor, batch_size,
                                           settings.max_queue_delay_s, settings.max_queue_size, self.metrics)
            model.batcher.start()
            model.warmup_s = time.monotonic() - started
        except Exception as e:
            model.state, model.error = FAILED, f"{type(e).__name__}: {e}"
            log.error("model %s failed to load: %s", model.name, model.error, exc_info=not isinstance(e, BundleError))
            return
        model.state = READY
        self.metrics.model_ready.labels(model.name).set(1)
        log.info("model %s ready: %s, max batch %d, loaded and warmed up in %.1f s", model.name,
                 model.backend.describe(), model.batcher.max_batch_size, model.warmup_s)

    @staticmethod
    def _warm_up(model: ModelRuntime, batch_size: int) -> None:
        spec = model.bundle.input
        for size in sorted({1, batch_size}):
            images = np.zeros((size, spec.channels, spec.size, spec.size), dtype=np.uint8)
            maps, scores = model.backend(images)
            if maps.shape != (size, 1, spec.size, spec.size) or scores.shape != (size,):
                raise BundleError(f"model {model.name}: the backend answered shapes {maps.shape}, {scores.shape} "
                                  f"for a batch of {size} ({spec.channels}x{spec.size}x{spec.size})")

    def begin_drain(self) -> None:
        """Shutting down: /readyz turns 503 and new requests are refused; queued ones are still answered."""
        if not self.draining:
            log.info("shutting down: taking no new requests, finishing queued ones")
        self.draining = True

    async def close(self, timeout_s: float) -> None:
        self.begin_drain()
        await asyncio.gather(*(m.batcher.close(timeout_s) for m in self.models.values() if m.batcher is not None))
        for model in self.models.values():
            self.metrics.model_ready.labels(model.name).set(0)
            model.state = STOPPED if model.state == READY else model.state
            if model.backend is not None:
                try:
                    await asyncio.get_running_loop().run_in_executor(model.executor, model.backend.close)
                except Exception:
                    log.exception("model %s: closing its backend failed", model.name)
            model.executor.shutdown(wait=False, cancel_futures=True)
