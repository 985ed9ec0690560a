"""Serve the application with waitress in a background thread of ``dicomnode serve``."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Config

log = logging.getLogger("dicomnode.http.server")


class HttpServer:
    """A running waitress server; :meth:`close` stops it."""

    def __init__(self, server, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

    def close(self) -> None:
        self._server.close()
        self._thread.join(10)


def start_http(cfg: Config, sessions: sessionmaker[Session], metrics_folder: Path) -> HttpServer | None:
    """Start the page, API and metrics on ``http.bind_address``:``http.port``; None (logged) when the
    port cannot be bound: the DICOM node runs on without its page."""
    from waitress.server import create_server

    from dicomnode.http.app import create_app

    app = create_app(cfg, sessions, metrics_folder)
    try:
        server = create_server(app, host=cfg.http.bind_address, port=cfg.http.port, threads=4,
                               ident="dicomnode", clear_untrusted_proxy_headers=True)
    except OSError as exc:
        log.error("HTTP page and metrics not started: cannot bind %s:%d (%s); set http.port or http.enabled",
                  cfg.http.bind_address, cfg.http.port, exc)
        return None
    thread = threading.Thread(target=server.run, name="dicomnode-http", daemon=True)
    thread.start()
    log.info("HTTP page, API and /metrics on http://%s:%s/%s", cfg.http.bind_address, server.effective_port,
             " (token required)" if cfg.http.token else "")
    return HttpServer(server, thread)
