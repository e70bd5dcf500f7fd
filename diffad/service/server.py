"""Running the service under uvicorn (what `diffad serve` does).

On SIGTERM or SIGINT the service first turns unready and refuses new inspections (503), uvicorn stops
accepting connections and waits for requests in flight, and the lifespan then answers whatever is still
queued before the process exits.
"""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the registry to drain as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit_signal):
        super().__init__(config)
        self._on_exit_signal = on_exit_signal

    def handle_exit(self, sig, frame) -> None:
        self._on_exit_signal()
        super().handle_exit(sig, frame)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S", force=True)


def serve(settings: Settings) -> None:
    """Build the app (the bundles are checked here) and serve it until a shutdown signal."""
    configure_logging(settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
        access_log=False,  # the app writes its own, with request text escaped
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        server_header=False,
    )
    DrainingServer(config, app.state.registry.begin_drain).run()
