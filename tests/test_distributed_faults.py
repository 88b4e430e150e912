"""Multi-host faults end in bounded time with a clear error (issue 18, part 4).

Local processes joined through `ftjax.distributed.initialize` on a 127.0.0.1
coordinator; one of them is SIGKILLed after joining, or never starts.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = 5  # seconds

WORKER = """
import os, signal, sys, time
rank, port, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
from ftjax import distributed
try:
    distributed.initialize(f"127.0.0.1:{port}", 2, rank, heartbeat_timeout_seconds=%d,
                           initialization_timeout_seconds=5)
except RuntimeError as e:
    print("INIT-ERROR", e, flush=True)
    sys.exit(3)
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("joined")
print(rank, "joined", flush=True)
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(0.5)
if mode == "collective":
    for i in range(1000):
        multihost_utils.sync_global_devices(f"step{i}")
        time.sleep(0.05)
else:
    time.sleep(120)
print("NOT ENDED", flush=True)
""" % HEARTBEAT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(rank, port, mode):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-c", WORKER, str(rank), str(port), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)


def run_pair(mode):
    port = free_port()
    procs = [start(r, port, mode) for r in (0, 1)]
    t0 = time.monotonic()
    outs = [p.communicate(timeout=180) for p in procs]
    return procs[0].returncode, outs[0][0], outs[0][1], time.monotonic() - t0


def test_dead_peer_in_a_collective_is_one_clear_line():
    rc, out, err, seconds = run_pair("collective")
    assert "0 joined" in out and "NOT ENDED" not in out
    assert rc == 1, err[-2000:]
    assert "ftjax.distributed: process 0 lost contact with another process" in err
    assert "heartbeat_timeout_seconds=5" in err
    assert "Check failure stack trace" not in err  # jax's abort at shutdown is skipped
    assert seconds < 60


def test_dead_peer_of_an_idle_process_ends_it_within_the_heartbeat_timeout():
    """Not in a collective: jax's coordination service ends the survivor once the peer
    missed heartbeats for HEARTBEAT seconds, naming the lost task (jax's own abort)."""
    rc, out, err, seconds = run_pair("idle")
    assert "0 joined" in out and "NOT ENDED" not in out
    assert rc != 0
    assert "Task 1 heartbeat timeout" in err or "heartbeat" in err.lower()
    assert seconds < 60  # two processes' start-up + HEARTBEAT + polling, well below 120


def test_a_process_that_never_joins_ends_the_run_within_the_init_timeout():
    """jax aborts (DEADLINE_EXCEEDED on RegisterTask) once initialization_timeout_seconds
    (5 here) pass: bounded, though jax's own abort, not a Python error."""
    port = free_port()
    p = start(0, port, "collective")
    t0 = time.monotonic()
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "joined" not in out
    assert "DEADLINE_EXCEEDED" in err or "INIT-ERROR" in out
    assert time.monotonic() - t0 < 60
