"""Running the service under uvicorn (what `diffad serve` does).

On the first SIGTERM or SIGINT the service turns unready: /readyz and new inspections answer 503 with
Retry-After, while it keeps listening for DIFFAD_DRAIN_GRACE_S so that a load balancer sees it leave
rather than finding the port closed; queued work goes on meanwhile. Then uvicorn stops accepting
connections and waits for the requests in flight, and the lifespan answers whatever is still queued
before the process exits. A second signal ends the grace at once (a third, SIGINT, stops uvicorn hard).
"""

from __future__ import annotations

import logging
import threading

import uvicorn

from .app import create_app
from .logs import configure_logging
from .settings import Settings
from .tracing import configure_tracing

log = logging.getLogger("diffad.service")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the registry to drain as soon as a shutdown signal arrives and closing its
    listener only after the grace period (or a second signal)."""

    def __init__(self, config: uvicorn.Config, on_exit_signal, grace_s: float = 0.0):
        super().__init__(config)
        self._on_exit_signal = on_exit_signal
        self.grace_s = grace_s
        self._grace: threading.Timer | None = None

    def handle_exit(self, sig, frame) -> None:
        self._on_exit_signal()
        if self._grace is None and self.grace_s > 0 and not self.should_exit:
            log.info("draining: /readyz and new requests answer 503; closing the listener in %g s "
                     "(DIFFAD_DRAIN_GRACE_S; a second signal closes it now)", self.grace_s)
            self._grace = threading.Timer(self.grace_s, super().handle_exit, (sig, None))
            self._grace.daemon = True
            self._grace.start()
            return
        if self._grace is not None:
            self._grace.cancel()
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> None:
    """Build the app (the bundles are checked here) and serve it until a shutdown signal."""
    configure_logging(settings.log_level, settings.log_format)
    configure_tracing()  # only when OTEL_* variables ask for traces
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
        access_log=False,  # the app writes its own, with request text escaped
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        server_header=False,
    )
    DrainingServer(config, app.state.registry.begin_drain, settings.drain_grace_s).run()
