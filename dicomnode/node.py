"""``dicomnode serve``: the listener processes, the stability scheduler and the in-node worker.

The main process checks the schema, binds the port, starts N listener processes that accept from that
one socket (one Python process is bound to one core, so concurrent associations need several, as
DCMTK's ``--fork``), runs the stability job and, unless disabled, ``worker.processes`` classification
worker processes (at ``worker.nice``; the model is loaded only there). Ctrl-C or SIGTERM stops everything
cleanly; a listener or worker process that dies is restarted (a worker killed by the kernel for memory
or crashing in the inference runtime takes nothing else with it; its job is claimed again once the lease expired).
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
from dicomnode.lifetime import die_with_parent
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


#: Seconds a listener process waits for its server to shut down before it exits anyway.
_SHUTDOWN_GRACE_S = 5.0


def _listener_main(cfg: Config, listening: socket.socket, slot: int, counts, parent: int, ready) -> None:
    """Body of a listener process: serve associations accepted from the shared socket.

    ``counts`` is the node's shared association count array and ``slot`` this process's index in it
    (see :mod:`dicomnode.receive.association_limit`); ``parent`` the main process's PID; ``ready`` the
    write end of a pipe (a pipe, not an Event: an Event's lock held by a parent killed mid-wait would
    block this process for ever).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us with SIGTERM
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    setup_logging(cfg.log_level)
    die_with_parent(parent)
    from dicomnode.receive.association_limit import AssociationSlots
    from dicomnode.receive.ingest import NodeContext
    from dicomnode.receive.listener import start_listener

    # The instance file is always fsynced before Success. The index commit of a listener is fsynced
    # too only with listener.power_loss_safe (SQLite FULL): otherwise a commit survives a crash of
    # the process but a power loss can take the last ones, as with Orthanc's defaults (WAL + NORMAL).
    # FULL adds a second fsync to every C-STORE, in series on each association.
    engine = make_engine(cfg.resolved_database_url,
                         sqlite_synchronous="FULL" if cfg.listener.power_loss_safe else "NORMAL")
    ctx = NodeContext(cfg, make_sessionmaker(engine))
    slots = AssociationSlots(cfg.listener.max_associations, counts, slot)
    server = start_listener(ctx, listening=listening, slots=slots)
    from dicomnode.queue.stability import release_handlers

    for event, handler in release_handlers(ctx.sessions):  # early completeness (worker.release_grace_s)
        server.bind(event, handler)
    try:
        ready.send_bytes(b"1")
        ready.close()
    except OSError:  # the main process is gone already
        stop.set()
    # Exit with the main process, even when it was killed with SIGKILL and could not stop us:
    # SIGTERM from PR_SET_PDEATHSIG, or this ppid watch where that is not available.
    while not stop.wait(1.0):
        if os.getppid() != parent:
            log.warning("main process %d is gone; listener process exiting", parent)
            break

    def shut_down() -> None:
        server.shutdown()
        server.server_close()
        engine.dispose()

    closer = threading.Thread(target=shut_down, name="dicomnode-listener-stop", daemon=True)
    closer.start()
    closer.join(_SHUTDOWN_GRACE_S)
    if closer.is_alive():  # an association thread holds the server: leave anyway, files are fsynced
        log.warning("listener shutdown did not finish within %.0f s; exiting", _SHUTDOWN_GRACE_S)
        logging.shutdown()
        os._exit(0)


def _worker_main(cfg: Config, parent: int) -> None:
    """Body of a worker process: classification jobs (and early slices) until SIGTERM or the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us with SIGTERM
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    setup_logging(cfg.log_level)
    die_with_parent(parent)
    if cfg.worker.nice:
        try:
            os.nice(cfg.worker.nice)
        except OSError as exc:
            log.warning("worker: could not set niceness %d: %s", cfg.worker.nice, exc)

    def watch_parent() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                stop.set()

    threading.Thread(target=watch_parent, name="dicomnode-parent-watch", daemon=True).start()
    from dicomnode.queue import worker

    worker.run(cfg, stop)


#: Seconds between two restarts of one worker process (a worker that dies at once is not respawned in a loop).
_WORKER_RESTART_S = 5.0


def serve(cfg: Config, stop: threading.Event | None = None) -> int:
    """Run the node until ``stop`` is set or SIGINT/SIGTERM arrives; returns the exit code."""
    stop = stop or threading.Event()
    engine, sessions = open_index(cfg)
    storage_dir = cfg.resolved_storage_dir
    storage_dir.mkdir(parents=True, exist_ok=True)
    recover_at_start(cfg.resolved_data_dir, storage_dir, sessions, cfg.listener.duplicate_policy)
    from dicomnode.http import metrics

    metrics_folder = metrics.setup(cfg.resolved_data_dir, fresh=True)  # before the children: they inherit it

    from dicomnode.receive.listener import listening_socket

    listening = listening_socket(cfg)
    n = listener_processes(cfg)
    spawn = mp.get_context("spawn")
    # listener.max_associations holds for the node: each process counts its associations in its slot
    from dicomnode.receive.association_limit import shared_counts

    counts = shared_counts(n, spawn)

    def start_child(i: int):
        ready, child_end = spawn.Pipe(duplex=False)
        counts[i] = 0  # a restarted process starts with no association (a dead one's are gone)
        proc = spawn.Process(target=_listener_main, args=(cfg, listening, i, counts, os.getpid(), child_end),
                             name=f"dicomnode-listener-{i}", daemon=True)
        proc.start()
        child_end.close()
        try:
            started = ready.poll(60) and ready.recv_bytes() == b"1"
        except (EOFError, OSError):  # the process died before it was ready
            started = False
        ready.close()
        if not started:
            raise RuntimeError(f"listener process {i} did not start (see the log above)")
        return proc

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())

    def start_worker(i: int):
        # Not daemonic: a worker has reader processes of its own (queue.worker.WorkerState.reader_pool). It
        # still never outlives the node: the shutdown below terminates it, PR_SET_PDEATHSIG and the parent
        # watch end it if the node is killed.
        proc = spawn.Process(target=_worker_main, args=(cfg, os.getpid()), name=f"dicomnode-worker-{i}",
                             daemon=False)
        proc.start()
        return proc, time.monotonic()

    children = []
    scheduler = retention = None
    workers: list = []
    http_server = None
    try:
        children = [start_child(i) for i in range(n)]
        log.info("%s listening on %s:%d (%d listener process(es), storage %s, StableAge %.3g s)",
                 cfg.ae_title, cfg.bind_address, cfg.port, n, storage_dir, cfg.stable_age_s)
        from dicomnode.queue.stability import scheduler_interval, start_scheduler

        grace = cfg.worker.release_grace_s
        scheduler = start_scheduler(sessions, cfg.stable_age_s, scheduler_interval(cfg.check_interval_s, grace), grace)
        from dicomnode.receive.retention import start_retention

        retention = start_retention(sessions, storage_dir, cfg.retention)  # None unless retention.enabled
        if cfg.worker.enabled:
            workers = [start_worker(i) for i in range(cfg.worker.processes)]
        if cfg.http.enabled:
            from dicomnode.http.server import start_http

            http_server = start_http(cfg, sessions, metrics_folder)
        while not stop.wait(1.0):
            for i, proc in enumerate(children):
                if not proc.is_alive():
                    log.error("listener process %s exited with %s; restarting it", proc.name, proc.exitcode)
                    children[i] = start_child(i)
            for i, (proc, started) in enumerate(workers):
                if not proc.is_alive() and time.monotonic() - started >= _WORKER_RESTART_S:
                    log.error("worker process %s exited with %s; restarting it", proc.name, proc.exitcode)
                    workers[i] = start_worker(i)
    finally:
        log.info("stopping")
        stop.set()
        for proc in children + [w for w, _ in workers]:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + 15
        for proc in children + [w for w, _ in workers]:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        if retention is not None:
            retention.shutdown(wait=False)
        if http_server is not None:
            http_server.close()
        listening.close()
        engine.dispose()
    log.info("stopped")
    return 0
