"""``dicomnode serve``: the listener processes, the stability scheduler and the in-node worker.

The main process checks the schema, binds the port, starts N listener processes that accept from that
one socket (one Python process is bound to one core, so concurrent associations need several, as
DCMTK's ``--fork``), runs the stability job and, unless disabled, the classification worker. Ctrl-C or
SIGTERM stops everything cleanly; a listener process that dies is restarted.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time

from dicomnode.config import Config
from dicomnode.db.session import make_engine, make_sessionmaker, open_index
from dicomnode.logconfig import setup_logging
from dicomnode.receive.recovery import recover_at_start

log = logging.getLogger("dicomnode.node")


def listener_processes(cfg: Config) -> int:
    """``listener.processes``, or by default two per core, at most 4.

    A listener process spends much of each C-STORE waiting (fsync, the network), so two per core keep
    the cores busy; and one association per process avoids two associations' threads contending for
    one GIL (on 2 cores, 4 parallel associations: ~15% more images/s and ~10% less CPU per image
    than with 2 processes).
    """
    return cfg.listener.processes or max(1, min(4, 2 * (os.cpu_count() or 1)))


def _listener_main(cfg: Config, listening: socket.socket, max_associations: int, ready: mp.Event) -> None:
    """Body of a listener process: serve associations accepted from the shared socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us with SIGTERM
    setup_logging(cfg.log_level)
    from dicomnode.receive.ingest import NodeContext
    from dicomnode.receive.listener import start_listener

    # The instance file is always fsynced before Success. The index commit of a listener is fsynced
    # too only with listener.power_loss_safe (SQLite FULL): otherwise a commit survives a crash of
    # the process but a power loss can take the last ones, as with Orthanc's defaults (WAL + NORMAL).
    # FULL adds a second fsync to every C-STORE, in series on each association.
    engine = make_engine(cfg.resolved_database_url,
                         sqlite_synchronous="FULL" if cfg.listener.power_loss_safe else "NORMAL")
    ctx = NodeContext(cfg, make_sessionmaker(engine))
    server = start_listener(ctx, listening=listening, max_associations=max_associations)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = os.getppid()
    ready.set()
    # Exit with the main process, even when it was killed with SIGKILL and could not stop us.
    while not stop.wait(1.0):
        if os.getppid() != parent:
            break
    server.shutdown()
    server.server_close()
    engine.dispose()


def serve(cfg: Config, stop: threading.Event | None = None) -> int:
    """Run the node until ``stop`` is set or SIGINT/SIGTERM arrives; returns the exit code."""
    stop = stop or threading.Event()
    engine, sessions = open_index(cfg)
    storage_dir = cfg.resolved_storage_dir
    storage_dir.mkdir(parents=True, exist_ok=True)
    recover_at_start(cfg.resolved_data_dir, storage_dir, sessions)

    from dicomnode.receive.listener import listening_socket

    listening = listening_socket(cfg)
    n = listener_processes(cfg)
    per_process = max(1, -(-cfg.listener.max_associations // n))
    spawn = mp.get_context("spawn")

    def start_child(i: int):
        ready = spawn.Event()
        proc = spawn.Process(target=_listener_main, args=(cfg, listening, per_process, ready), name=f"dicomnode-listener-{i}",
                             daemon=True)
        proc.start()
        if not ready.wait(60):
            raise RuntimeError(f"listener process {i} did not start (see the log above)")
        return proc

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())

    children = []
    scheduler = None
    worker_thread = None
    try:
        children = [start_child(i) for i in range(n)]
        log.info("%s listening on %s:%d (%d listener process(es), storage %s, StableAge %.3g s)",
                 cfg.ae_title, cfg.bind_address, cfg.port, n, storage_dir, cfg.stable_age_s)
        from dicomnode.queue.stability import start_scheduler

        scheduler = start_scheduler(sessions, cfg.stable_age_s, cfg.check_interval_s)
        if cfg.worker.enabled:
            from dicomnode.queue import worker

            worker_thread = threading.Thread(target=worker.run, args=(cfg, stop, sessions), name="dicomnode-worker",
                                             daemon=True)
            worker_thread.start()
        while not stop.wait(1.0):
            for i, proc in enumerate(children):
                if not proc.is_alive():
                    log.error("listener process %s exited with %s; restarting it", proc.name, proc.exitcode)
                    children[i] = start_child(i)
    finally:
        log.info("stopping")
        stop.set()
        for proc in children:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + 15
        for proc in children:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        if worker_thread is not None:
            worker_thread.join(30)
        listening.close()
        engine.dispose()
    log.info("stopped")
    return 0
