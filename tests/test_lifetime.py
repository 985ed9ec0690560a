"""Processes that never outlive their owner (dicomnode.lifetime), with real processes and a real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import parent_pid, process_ended, wait_for

# A process that owns a fork-server pool whose readers are blocked (one on a FIFO nobody writes), as a
# worker's readers can be: it prints their pids and waits to be killed.
OWNER = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from dicomnode.lifetime import helper_started

    def started_then_block(marks, fifo):
        open(os.path.join(marks, str(os.getpid())), "w").close()  # the initializer has run
        if fifo:
            open(fifo, "rb").read()  # blocks in open(): no writer ever comes
        time.sleep(3600)

    if __name__ == "__main__":
        marks, fifo = sys.argv[1], sys.argv[2]
        context = multiprocessing.get_context("forkserver")
        pool = ProcessPoolExecutor(2, mp_context=context, initializer=helper_started, initargs=(os.getpid(),))
        pool.submit(started_then_block, marks, fifo); pool.submit(started_then_block, marks, "")
        while len(os.listdir(marks)) < 2:
            time.sleep(0.05)
        print(" ".join(os.listdir(marks)), flush=True)
        time.sleep(3600)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_readers_of_a_fork_server_ignore_ctrl_c_and_end_when_their_owner_is_killed(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    marks = tmp_path / "started"
    marks.mkdir()
    owner = subprocess.Popen([sys.executable, str(script), str(marks), str(fifo)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        readers = [int(p) for p in owner.stdout.readline().split()]
        assert len(readers) == 2 and not any(process_ended(p) for p in readers)
        # Ctrl-C is the owner's to handle: the readers ignore SIGINT (bit 2 of the ignored-signals mask).
        for pid in readers:
            ignored = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("SigIgn:"))
            assert int(ignored.split()[1], 16) & (1 << (signal.SIGINT - 1)), f"reader {pid} does not ignore SIGINT"
        # Their parent is the fork server, not the owner: PR_SET_PDEATHSIG alone would not reach them.
        assert all(parent_pid(p) != owner.pid for p in readers)
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(30)
    wait_for(lambda: all(process_ended(p) for p in readers), "the killed owner's readers to end")
