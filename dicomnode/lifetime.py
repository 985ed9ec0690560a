"""Child processes that never outlive the process that owns them (listeners, workers, a worker's readers)."""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("dicomnode.lifetime")

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Ask Linux to send this process SIGTERM when its parent ``parent`` dies (PR_SET_PDEATHSIG), even by
    SIGKILL.

    Elsewhere (or if prctl fails) a ppid watch of the caller's is the only check. A parent that died
    before the call is caught by comparing the ppid afterwards.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); relying on the parent watch",
                            ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.warning("prctl(PR_SET_PDEATHSIG) unavailable (%s); relying on the parent watch", exc)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def exit_with(pid: int) -> None:
    """End this process (``os._exit``) as soon as process ``pid`` has ended, whatever this process is doing
    (a read blocked on a file included): a pool initializer, for processes whose parent is not ``pid``.

    A fork server's children are an example: the worker owns them, but their parent is the fork server,
    which lives as long as they do. A thread waits on a pidfd of ``pid`` (Linux 5.3+; elsewhere it checks
    every second).
    """
    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd here, or ``pid`` has ended already
            while _alive(pid):
                time.sleep(1.0)
        else:
            select.select([fd], [], [])  # readable once the process has ended
        os._exit(0)

    threading.Thread(target=watch, name="dicomnode-exit-with", daemon=True).start()


def helper_started(owner: int) -> None:
    """Initializer of a helper process (a worker's reader): it ends when ``owner`` ends
    (:func:`exit_with`) and leaves Ctrl-C to the owner, which stops its helpers itself, so that a
    Ctrl-C in a terminal prints no traceback from each of them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with(owner)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first (Linux /proc; empty elsewhere or once it has ended)."""
    out, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out
