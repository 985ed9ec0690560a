"""dicomnode.http.server: waitress serves the app on the configured port and stops; a port that is taken is
logged and leaves the node without its page (no exception)."""

from __future__ import annotations

import json
import socket
import urllib.request

from conftest import free_port
from dicomnode.config import load_config
from dicomnode.http import metrics
from dicomnode.http.server import start_http


def test_serves_and_stops(node_config, index, tmp_path):
    node_config.http.port = free_port()
    server = start_http(node_config, index[1], metrics.metrics_dir(tmp_path))
    assert server is not None and server.port == node_config.http.port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=30) as resp:
            assert json.loads(resp.read()) == {"status": "ok", "ae_title": "DICOMNODE"}
    finally:
        server.close()
    with socket.socket() as s:  # nobody listens on the port any more (SO_REUSEADDR: TIME_WAIT of the request)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", node_config.http.port))
        s.listen()


def test_a_taken_port_is_logged_and_not_raised(node_config, index, tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = load_config(None, {"data_dir": node_config.data_dir, "http.port": taken.getsockname()[1]})
        assert start_http(cfg, index[1], metrics.metrics_dir(tmp_path)) is None
    assert f"cannot bind 127.0.0.1:{cfg.http.port}" in caplog.text
