"""`dicomnode serve`'s listener processes: they die with the main process, and share one association limit."""

from __future__ import annotations

import os
import signal

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from conftest import wait_for
from test_hostile_peers import alive, listener_pids, serving


def test_listeners_exit_when_the_main_process_is_killed(tmp_path):
    with serving(tmp_path, processes=2) as (proc, port, log_path):
        listeners = wait_for(lambda: (pids := listener_pids(proc.pid)) and len(pids) == 2 and pids,
                               what="two listener processes")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
        # PR_SET_PDEATHSIG (or the ppid watch) stops them; the deadline only bounds a hang.
        wait_for(lambda: not any(alive(pid) for pid in listeners), timeout=120,
                   what="the listener processes' exit")


def test_max_associations_holds_for_the_node_not_per_process(tmp_path):
    with serving(tmp_path, "max_associations: 16", processes=4) as (proc, port, log_path):
        wait_for(lambda: len(listener_pids(proc.pid)) == 4, what="four listener processes")
        ae = AE(ae_title="SCU")
        ae.add_requested_context(Verification)
        held = []
        try:
            for _ in range(16):
                held.append(ae.associate("127.0.0.1", port, ae_title="DICOMNODE"))
            assert all(a.is_established for a in held), [a.is_rejected for a in held]
            seventeenth = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
            assert seventeenth.is_rejected
            # A slot freed is a slot available again (counted when the association ends).
            held.pop().release()
            again = wait_for(lambda: (a := ae.associate("127.0.0.1", port, ae_title="DICOMNODE")).is_established
                               and a, what="an association after one was released")
            held.append(again)
        finally:
            for a in held:
                if a.is_established:
                    a.release()
    assert "rejected: 16 association(s) active on the node (listener.max_associations)" in log_path.read_text()
