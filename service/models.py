"""The models a service holds: each bundle with its backend, its own thread, queue and batcher.

Construction checks the configuration (every bundle loads with its hashes verified; names are unique),
so a mistake stops the service before it listens. Opening the backends and warming them up happens
afterwards, in the background (`start`), while /healthz already answers and /readyz says 503; a model
turns ready after a warm-up batch at its largest batch size, which is also where TensorRT and ONNX
Runtime allocate their buffers.

Readiness follows health: a model that fails to load, or whose backend fails DIFFAD_UNHEALTHY_AFTER_FAILURES
batches in a row (a sticky CUDA error, say), turns unready and is opened again, with a backoff of 1, 2,
4 ... 60 s between tries, while the other models go on serving.

A multi-category bundle whose graph takes the category as an input is one runtime (one backend, one set of
weights, one thread, queue and batcher, named as the bundle) behind one served model per category
(<bundle>.<category>, a CategoryModel): each has its own threshold, and its requests carry its category
index into the shared batches. Such models load, fail, turn ready and reload together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..export.bundle import Bundle, BundleError, InputSpec, load_bundle
from ..export.triton import resolve_bundle_dir
from .backends import Backend, BackendFactory, open_backend
from .batcher import DynamicBatcher
from .metrics import ServiceMetrics
from .settings import Settings

log = logging.getLogger("diffad.service")

LOADING, READY, FAILED, RELOADING, STOPPED = "loading", "ready", "failed", "reloading", "stopped"
RETRY_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)  # between tries to open a model; the last repeats


def _close_when_opened(opening: asyncio.Future) -> None:
    if not opening.cancelled() and opening.exception() is None:
        try:
            opening.result().close()
        except Exception:
            log.exception("closing a backend opened during shutdown failed")


@dataclass(eq=False)
class ModelRuntime:
    bundle: Bundle
    executor: ThreadPoolExecutor
    backend: Backend | None = None
    batcher: DynamicBatcher | None = None
    state: str = LOADING
    error: str | None = None
    warmup_s: float | None = None
    consecutive_failures: int = 0
    attempts: int = 0  # tries to open the backend so far
    reopening: asyncio.Task | None = None
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one reload at a time per model
    source: Path | None = None  # the folder as configured: a bundle, or a Triton model folder (newest version)
    served_as: tuple[str, ...] = ()  # the served models it runs, where not itself: a shared graph's categories

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def served_names(self) -> tuple[str, ...]:
        return self.served_as or (self.name,)

    @property
    def ready(self) -> bool:
        return self.state == READY

    def status(self) -> dict:
        out = {"state": self.state}
        if self.error:
            out["error"] = self.error
        return out

    def info(self) -> dict:
        return describe_model(self)


class CategoryQueue:
    """A category's way into its runtime's batcher: the batcher's admit and submit, with the category's index."""

    def __init__(self, batcher: DynamicBatcher, category_index: int):
        self.batcher, self.category_index = batcher, category_index

    @property
    def max_batch_size(self) -> int:
        return self.batcher.max_batch_size

    def admit(self):
        return self.batcher.admit()

    def submit(self, image: np.ndarray, deadline: float, admission=None) -> asyncio.Future:
        return self.batcher.submit(image, deadline, admission, category=self.category_index)


@dataclass(eq=False)
class CategoryModel:
    """One category of a multi-category bundle served from its shared runtime: its own name, threshold and
    calibration (the runtime's current bundle's view for it, so a reload updates them too), the runtime's
    state, backend and batcher."""

    runtime: ModelRuntime
    name: str
    _view: Bundle | None = field(default=None, init=False, repr=False)
    _view_of: Bundle | None = field(default=None, init=False, repr=False)

    @property
    def bundle(self) -> Bundle:
        bundle = self.runtime.bundle
        if self._view_of is not bundle:  # made once per loaded version
            self._view = next(view for view in bundle.models() if view.name == self.name)
            self._view_of = bundle
        return self._view

    @property
    def batcher(self) -> CategoryQueue | None:
        batcher = self.runtime.batcher
        return None if batcher is None else CategoryQueue(batcher, self.bundle.category_index)

    @property
    def backend(self) -> Backend | None:
        return self.runtime.backend

    @property
    def state(self) -> str:
        return self.runtime.state

    @property
    def ready(self) -> bool:
        return self.runtime.ready

    @property
    def error(self) -> str | None:
        return self.runtime.error

    def status(self) -> dict:
        return self.runtime.status()

    def info(self) -> dict:
        return {**describe_model(self), "shares_runtime_with": [n for n in self.runtime.served_names if n != self.name]}


ServedModel = ModelRuntime | CategoryModel


def queue_image(model: ServedModel, image: np.ndarray, deadline: float,
                admission=None) -> tuple[Bundle, asyncio.Future]:
    """Queue one image on the model's batcher now; the version that will answer it (its bundle, whose
    calibration applies) and the result's future. A reload switches bundle and batcher in one step of the
    event loop, so the pair always matches, even while requests queued on the old batcher finish there."""
    return model.bundle, model.batcher.submit(image, deadline, admission)


def describe_model(model: ServedModel) -> dict:
    """A served model as /models lists it."""
    spec = model.bundle.input
    return {"name": model.name, "version": model.bundle.version, "input_size": spec.size, "channels": spec.channels,
            "threshold": model.bundle.threshold, "calibrated": model.bundle.calibrated,
            "backend": model.backend.name if model.backend is not None and model.ready else None,
            "max_batch_size": model.batcher.max_batch_size if model.batcher is not None else None,
            "state": model.state, "method": model.bundle.method, "category": model.bundle.category}


class ReloadError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: ServiceMetrics, backend_factory: BackendFactory | None = None):
        if not settings.models:
            raise ValueError("no model to serve: give bundle folders (diffad serve BUNDLE_DIR...) or DIFFAD_MODELS")
        self.settings = settings
        self.metrics = metrics
        self.backend_factory = backend_factory or open_backend
        self.models: dict[str, ServedModel] = {}  # by served name
        self.runtimes: list[ModelRuntime] = []    # what holds backends, threads and batchers
        for path in settings.models:
            loaded = load_bundle(resolve_bundle_dir(path))
            # a multi-category DeCo-Diff bundle is one model per category (<name>.<category>): on one shared
            # runtime where its graph takes the category as an input, else (older bundles) one runtime each
            views = loaded.models()
            shared = loaded.category_input is not None and len(views) > 1
            for bundle in views:
                if bundle.name in self.models:
                    raise BundleError(f"two bundles are named {bundle.name!r} ({self.models[bundle.name].bundle.path}"
                                      f" and {path}): model names must be unique; export one with --name")
                if not bundle.calibrated:
                    log.warning("model %s has no calibrated threshold: answers carry threshold, normalized_score "
                                "and is_anomalous as null unless the request gives ?threshold=", bundle.name)
            for bundle in [loaded] if shared else views:
                executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"diffad-{bundle.name}"[:32])
                runtime = ModelRuntime(bundle, executor, source=Path(path),
                                       served_as=tuple(v.name for v in views) if shared else ())
                self.runtimes.append(runtime)
                for name in runtime.served_names:
                    self.models[name] = CategoryModel(runtime, name) if shared else runtime
                    metrics.model_ready.labels(name).set(0)
        self.draining = False
        self._watching: asyncio.Task | None = None

    def find(self, name: str | None) -> ServedModel | None:
        """The model a request names, or the only one when it names none; None when there is no such model
        or the choice is ambiguous."""
        if name is None:
            return next(iter(self.models.values())) if len(self.models) == 1 else None
        return self.models.get(name)

    @property
    def ready(self) -> bool:
        """At least one model serves (and the service is not shutting down): a load balancer may send work."""
        return not self.draining and any(m.ready for m in self.models.values())

    def status(self, model: str | None = None) -> dict:
        models = self.models if model is None else {model: self.models[model]}
        ready = not self.draining and (self.ready if model is None else models[model].ready)
        return {"ready": ready, "draining": self.draining, "models": {n: m.status() for n, m in models.items()}}

    async def start(self) -> None:
        """Open each model's backend on its own thread, warm it up, start its batcher (models in parallel);
        a model that fails is tried again in the background."""
        await asyncio.gather(*(self._start_one(m) for m in self.runtimes))
        if self.settings.backend == "triton":
            self._watching = asyncio.get_running_loop().create_task(self._watch_remote(), name="diffad-watch-triton")

    async def _watch_remote(self) -> None:
        """Readiness follows the remote server's: each ready model's backend is asked (on the model's own
        thread) every DIFFAD_TRITON_HEALTH_INTERVAL_S; one that says it cannot serve turns the model unready
        and is opened again with backoff, as after failed batches."""
        loop = asyncio.get_running_loop()
        while not self.draining:
            await asyncio.sleep(self.settings.triton_health_interval_s)
            for model in list(self.runtimes):
                backend = model.backend
                if not model.ready or backend is None:
                    continue
                try:
                    why = await loop.run_in_executor(model.executor, backend.check)
                except Exception as e:  # a check that raises says as much as one that answers no
                    why = f"{type(e).__name__}: {e}"
                if why and model.ready and model.backend is backend and not self.draining:
                    self._turn_unready(model, why)

    async def _start_one(self, model: ModelRuntime) -> None:
        if not await self._open(model):
            self._reopen_later(model)

    async def _open(self, model: ModelRuntime) -> bool:
        """Open, warm up and put to work the model's backend (again, after a failure); False if it failed."""
        model.attempts += 1
        started = time.monotonic()
        try:
            backend, batch_size = await self._open_backend(model.name, model.bundle, model.executor)
        except Exception as e:
            model.error = f"{type(e).__name__}: {e}"
            model.state = FAILED if model.state in (LOADING, FAILED) else RELOADING
            log.error("model %s failed to load (try %d): %s", model.name, model.attempts, model.error,
                      exc_info=not isinstance(e, BundleError))
            return False
        model.backend, model.error, model.consecutive_failures = backend, None, 0
        model.warmup_s = time.monotonic() - started
        if model.batcher is None:
            model.batcher = self._new_batcher(model, backend, model.executor, batch_size)
        else:  # a reopened model: the same queue, the new backend
            model.batcher.run_batch = backend
        model.state = READY
        self._publish(model, backend)
        log.info("model %s ready: %s, max batch %d, loaded and warmed up in %.1f s", model.name,
                 backend.describe(), model.batcher.max_batch_size, model.warmup_s)
        return True

    async def _open_backend(self, name: str, bundle: Bundle, executor: ThreadPoolExecutor) -> tuple[Backend, int]:
        """The bundle's backend, opened on the executor's thread and warmed up, and the batch size it serves
        at; a backend that fails its warm-up is closed before the error goes on."""
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(executor, self.backend_factory, bundle, self.settings)
        try:
            backend = await asyncio.shield(opening)
        except asyncio.CancelledError:  # stopped while opening: close what the thread still returns
            opening.add_done_callback(_close_when_opened)
            raise
        limit = backend.max_batch_size
        batch_size = min(self.settings.max_batch_size, limit) if limit else self.settings.max_batch_size
        try:
            await loop.run_in_executor(executor, backend.prepare, batch_size)
            await loop.run_in_executor(executor, self._warm_up, name, bundle.input, backend, batch_size)
        except Exception:
            await self._close_backend(name, backend, executor)
            raise
        return backend, batch_size

    def _new_batcher(self, model: ModelRuntime, backend: Backend, executor: ThreadPoolExecutor,
                     batch_size: int) -> DynamicBatcher:
        batcher = DynamicBatcher(model.name, backend, executor, batch_size, self.settings.max_queue_delay_s,
                                 self.settings.max_queue_size, self.metrics,
                                 on_batch=lambda ok, m=model: self._batch_done(m, ok))
        batcher.start()
        return batcher

    def _publish(self, model: ModelRuntime, backend: Backend) -> None:
        for name in model.served_names:
            self.metrics.model_ready.labels(name).set(1)
            self.metrics.set_backend(name, backend.name, getattr(backend, "device", "unknown"),
                                     getattr(backend, "precision", "unknown"), getattr(backend, "fallback", None))
            self.metrics.set_version(name, model.bundle.version)

    async def reload(self, name: str) -> dict:
        """Load the model's bundle folder again and, if it holds a new version, serve it without a restart.

        The new version is loaded, verified and warmed up on its own thread beside the old one, which keeps
        serving; then requests switch to it at once, and the old version answers what it still holds before
        its backend is closed. A bundle that fails to load, verify or warm up leaves the old version serving
        (ReloadError says why). The input (size, channels, type) must stay: decoded requests are in flight.
        """
        served = self.models[name]
        model = served.runtime if isinstance(served, CategoryModel) else served
        if self.draining:
            raise ReloadError(503, "the service is shutting down")
        async with model.reload_lock:
            loop = asyncio.get_running_loop()
            previous = model.bundle
            try:
                folder = resolve_bundle_dir(model.source or previous.path)
                whole = await loop.run_in_executor(None, load_bundle, folder)
                if model.served_as:  # a shared graph's categories reload together, as one bundle
                    loaded, held = [whole], tuple(v.name for v in whole.models())
                    if whole.category_input is None or held != model.served_as:
                        raise BundleError(f"{previous.path} now holds {', '.join(held)} (not one graph for "
                                          f"{', '.join(model.served_as)}): a reload keeps the models (serve "
                                          "others with a restart)")
                else:
                    loaded = whole.models()
                bundle = next((b for b in loaded if b.name == model.name), None)
                if bundle is None:
                    held = ", ".join(repr(b.name) for b in loaded)
                    raise BundleError(f"{previous.path} now holds model {held}: a reload keeps the model's "
                                      "name (serve another model with a restart)")
                if bundle.input != previous.input:
                    raise BundleError(f"the new version's input ({bundle.input.channels}x{bundle.input.size}, "
                                      f"{bundle.input.dtype}) differs from the served one's ({previous.input.channels}x"
                                      f"{previous.input.size}, {previous.input.dtype}): restart to change it")
            except BundleError as e:
                raise self._reload_failed(model, name, str(e)) from None
            if bundle.version == previous.version and model.ready:
                self.metrics.reloads.labels(name, "unchanged").inc()
                return {"model": name, "version": bundle.version, "previous_version": previous.version,
                        "reloaded": False}
            started = time.monotonic()
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"diffad-{name}"[:32])
            try:
                backend, batch_size = await self._open_backend(name, bundle, executor)
            except Exception as e:
                executor.shutdown(wait=False)
                why = f"version {bundle.version} did not open: {type(e).__name__}: {e}"
                raise self._reload_failed(model, name, why) from None
            batcher = self._new_batcher(model, backend, executor, batch_size)
            if model.reopening is not None and not model.reopening.done():
                model.reopening.cancel()  # the new version replaces a model being reopened
            old = (model.batcher, model.backend, model.executor)
            # The switch: one step of the event loop, so every request after it goes to the new version.
            model.bundle, model.backend, model.batcher, model.executor = bundle, backend, batcher, executor
            model.state, model.error, model.consecutive_failures = READY, None, 0
            model.warmup_s = time.monotonic() - started
            self._publish(model, backend)
            self.metrics.reloads.labels(name, "reloaded").inc()
            log.info("model %s: version %s serves now (was %s, which finishes what it holds); warmed up in %.1f s",
                     name, bundle.version, previous.version, model.warmup_s)
            old_batcher, old_backend, old_executor = old
            if old_batcher is not None:
                await old_batcher.close(self.settings.request_timeout_s)
            if old_backend is not None:
                await self._close_backend(name, old_backend, old_executor)
            old_executor.shutdown(wait=False)
            return {"model": name, "version": bundle.version, "previous_version": previous.version,
                    "reloaded": True, "warmup_s": round(model.warmup_s, 3)}

    def _reload_failed(self, model: ModelRuntime, name: str, why: str) -> ReloadError:
        self.metrics.reloads.labels(name, "failed").inc()
        log.error("model %s: reload failed, version %s still serves: %s", model.name, model.bundle.version, why)
        return ReloadError(409, f"reload failed, version {model.bundle.version} still serves: {why}")

    def _batch_done(self, model: ModelRuntime, ok: bool) -> None:
        """The batcher's report on each batch: enough failures in a row and the model is opened again."""
        model.consecutive_failures = 0 if ok else model.consecutive_failures + 1
        if (not ok and model.state == READY and not self.draining
                and model.consecutive_failures >= self.settings.unhealthy_after_failures):
            self._turn_unready(model, f"{model.consecutive_failures} batches failed in a row")

    def _turn_unready(self, model: ModelRuntime, why: str) -> None:
        """A serving model that cannot serve (failed batches, or its remote server says so): unready at once,
        its backend opened again (with backoff while that fails)."""
        model.state, model.error = RELOADING, why
        for name in model.served_names:
            self.metrics.model_ready.labels(name).set(0)
        log.error("model %s is unhealthy (%s): unready, opening its backend again", model.name, why)
        self._reopen_later(model, first_delay_s=0.0)

    def _reopen_later(self, model: ModelRuntime, first_delay_s: float | None = None) -> None:
        if self.draining or (model.reopening is not None and not model.reopening.done()):
            return
        model.reopening = asyncio.get_running_loop().create_task(self._reopen(model, first_delay_s),
                                                                 name=f"diffad-reopen-{model.name}")

    async def _reopen(self, model: ModelRuntime, first_delay_s: float | None) -> None:
        tries = 0
        while not self.draining:
            backoff = RETRY_BACKOFF_S[min(tries, len(RETRY_BACKOFF_S) - 1)]
            delay = first_delay_s if first_delay_s is not None and tries == 0 else backoff
            log.info("model %s: opening it again in %g s", model.name, delay)
            await asyncio.sleep(delay)
            if self.draining:
                return
            old, model.backend = model.backend, None
            if old is not None:
                await self._close_backend(model.name, old, model.executor)
            if await self._open(model):
                return
            tries += 1

    @staticmethod
    async def _close_backend(name: str, backend: Backend, executor: ThreadPoolExecutor) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(executor, backend.close)
        except Exception:
            log.exception("model %s: closing its backend failed", name)

    @staticmethod
    def _warm_up(name: str, spec: InputSpec, backend: Backend, batch_size: int) -> None:
        categories = len(backend.bundle.manifest.get("categories") or [0])
        for size in sorted({1, batch_size}):
            images = np.zeros((size, spec.channels, spec.size, spec.size), dtype=np.uint8)
            if getattr(backend, "takes_categories", False):  # a shared graph: each category's index in turn
                maps, scores = backend(images, np.arange(size) % categories)
            else:
                maps, scores = backend(images)
            if maps.shape != (size, 1, spec.size, spec.size) or scores.shape != (size,):
                raise BundleError(f"model {name}: the backend answered shapes {maps.shape}, {scores.shape} "
                                  f"for a batch of {size} ({spec.channels}x{spec.size}x{spec.size})")

    def begin_drain(self) -> None:
        """Shutting down: /readyz turns 503 and new requests are refused; queued ones are still answered."""
        if not self.draining:
            log.info("shutting down: taking no new requests, finishing queued ones")
        self.draining = True

    async def close(self, timeout_s: float) -> None:
        self.begin_drain()
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
        for model in self.runtimes:
            if model.reopening is not None and not model.reopening.done():
                model.reopening.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await model.reopening
        await asyncio.gather(*(m.batcher.close(timeout_s) for m in self.runtimes if m.batcher is not None))
        for model in self.runtimes:
            for name in model.served_names:
                self.metrics.model_ready.labels(name).set(0)
            model.state = STOPPED if model.state == READY else model.state
            if model.backend is not None:
                await self._close_backend(model.name, model.backend, model.executor)
            model.executor.shutdown(wait=False, cancel_futures=True)
