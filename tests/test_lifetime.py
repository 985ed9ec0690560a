"""Processes that never outlive their owner (dicomnode.lifetime), with real processes and a real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import wait_for

# A process that owns a fork-server pool whose readers are blocked (one on a FIFO nobody writes), as a
# worker's readers can be: it prints their pids and waits to be killed.
OWNER = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from dicomnode.lifetime import exit_with

    def pid_then_block(fifo):
        if fifo:
            open(fifo, "rb").read()  # blocks in open(): no writer ever comes
        time.sleep(3600)

    if __name__ == "__main__":
        context = multiprocessing.get_context("forkserver")
        pool = ProcessPoolExecutor(2, mp_context=context, initializer=exit_with, initargs=(os.getpid(),))
        pool.submit(pid_then_block, sys.argv[1]); pool.submit(pid_then_block, "")
        while len(pool._processes) < 2:
            time.sleep(0.05)
        print(" ".join(str(p) for p in pool._processes), flush=True)
        time.sleep(3600)
""")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_readers_of_a_fork_server_end_when_their_owner_is_killed(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    owner = subprocess.Popen([sys.executable, str(script), str(fifo)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        readers = [int(p) for p in owner.stdout.readline().split()]
        assert len(readers) == 2 and all(alive(p) for p in readers)
        # Their parent is the fork server, not the owner: PR_SET_PDEATHSIG alone would not reach them.
        assert all(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[2] != str(owner.pid)
                   for p in readers)
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(30)
    wait_for(lambda: not any(alive(p) for p in readers), "the killed owner's readers to end")
