"""Classification worker (placeholder until the classifier issue lands)."""

import logging
import threading

from dicomnode.config import Config

log = logging.getLogger("dicomnode.worker")


def run(cfg: Config, stop: threading.Event) -> None:
    log.warning("classification worker not implemented yet; jobs stay queued")
