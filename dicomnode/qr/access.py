"""Who may query and retrieve: ``qr.allowed_peers`` and the move destinations (C-ECHO / C-STORE are not this).

By default (``qr.allow_any_peer: false``) C-FIND, C-MOVE and C-GET are answered only for a calling AE
listed in ``qr.allowed_peers`` (with its host, when the entry names one) or configured as a move
destination (AE title and host). Anyone else gets 0x0124 "Refused: Not authorized" and a log line naming
the AE and its address. Associations themselves (and C-ECHO / C-STORE) follow ``security.allowed_peers``.
"""

from __future__ import annotations

import socket
from functools import lru_cache

from dicomnode.config import Config
from dicomnode.dicom_status import NOT_AUTHORIZED  # noqa: F401  (the status refused peers get)


@lru_cache(maxsize=256)
def _addresses(host: str) -> frozenset[str]:
    """The addresses ``host`` (a name or an address) stands for; only itself when it does not resolve."""
    try:
        return frozenset({host} | {info[4][0] for info in socket.getaddrinfo(host, None)})
    except OSError:
        return frozenset({host})


def _host_matches(configured: str, address: str) -> bool:
    return not configured or configured == address or address in _addresses(configured)


def qr_allowed(cfg: Config, ae_title: str, address: str) -> bool:
    """True when the calling AE ``ae_title`` at ``address`` may use C-FIND / C-MOVE / C-GET."""
    if cfg.qr.allow_any_peer:
        return True
    ae = (ae_title or "").strip()
    if any(p.ae_title.strip() == ae and _host_matches(p.host, address) for p in cfg.qr.allowed_peers):
        return True
    return any(d.ae_title.strip() == ae and _host_matches(d.host, address) for d in cfg.qr.move_destinations)
