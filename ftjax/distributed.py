"""Multi-host start-up: a thin layer over `jax.distributed.initialize`.

Every process runs the same program (JAX's multi-controller model): call
`ftjax.distributed.initialize()` first, then build a mesh over `jax.devices()`
(all processes' devices) and load the model with it. `Model.generate` returns
host values on every process (shards held elsewhere are gathered), so process 0
can print them.

Where the coordinator and the process ids come from, first match wins:
  1. the arguments;
  2. FTJAX_COORDINATOR ("host:port"), FTJAX_NUM_PROCESSES, FTJAX_PROCESS_ID
     (and optionally FTJAX_LOCAL_DEVICE_IDS, "0,1,2,3");
  3. SLURM (srun): SLURM_PROCID / SLURM_NTASKS, coordinator = the first host of
     SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) on FTJAX_COORDINATOR_PORT
     (default 12355);
  4. Open MPI (mpirun): OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE; the
     coordinator must come from FTJAX_COORDINATOR (Open MPI does not name a
     head host portably), e.g. `mpirun -x FTJAX_COORDINATOR=node0:12355 ...`.

Faults (bounded, documented times):
  - a process that never joins: the others end after `initialization_timeout_seconds`
    (FTJAX_INIT_TIMEOUT, default 300): jax aborts with DEADLINE_EXCEEDED (where jax
    raises instead, `initialize` re-raises a RuntimeError naming the coordinator);
  - a peer that dies later: a collective running with it fails at once (gloo's
    connection is reset); the uncaught error then ends this process with one line
    naming the fault and exit code 1 (not jax's abort with a C++ stack trace at
    shutdown). A process not in a collective is ended by jax's coordination service
    once the peer has missed heartbeats for `heartbeat_timeout_seconds`
    (FTJAX_HEARTBEAT_TIMEOUT, default 30; jax's own default is 100): jax names the
    lost task ("Task 1 heartbeat timeout") and aborts.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional, Sequence

DEFAULT_PORT = 12355
DEFAULT_HEARTBEAT_TIMEOUT = 30
DEFAULT_INIT_TIMEOUT = 300
# Errors of a collective or of the coordination service when a peer is gone.
_LOST_PEER = re.compile(r"Gloo .*failed|Connection (reset|closed) by peer|heartbeat|"
                        r"unhealthy|coordination service|Socket closed|Broken pipe",
                        re.IGNORECASE)


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: "gpu[003-007,9],cpu1" -> "gpu003"."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[,-]", ranges)[0]


def detect(environ=None) -> dict:
    """The `jax.distributed.initialize` arguments the environment gives (may be empty).

    Returns a dict with some of coordinator_address, num_processes, process_id,
    local_device_ids, and "source" naming where they came from.
    """
    env = os.environ if environ is None else environ
    port = int(env.get("FTJAX_COORDINATOR_PORT", DEFAULT_PORT))
    out: dict = {}
    if "FTJAX_COORDINATOR" in env or "FTJAX_NUM_PROCESSES" in env:
        out = {"source": "FTJAX_* environment",
               "coordinator_address": env.get("FTJAX_COORDINATOR"),
               "num_processes": _int(env, "FTJAX_NUM_PROCESSES"),
               "process_id": _int(env, "FTJAX_PROCESS_ID")}
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        out = {"source": "SLURM",
               "coordinator_address": f"{first_slurm_host(nodes)}:{port}" if nodes else None,
               "num_processes": _int(env, "SLURM_NTASKS"),
               "process_id": _int(env, "SLURM_PROCID")}
    elif "OMPI_COMM_WORLD_RANK" in env:
        out = {"source": "Open MPI",
               "coordinator_address": env.get("FTJAX_COORDINATOR"),
               "num_processes": _int(env, "OMPI_COMM_WORLD_SIZE"),
               "process_id": _int(env, "OMPI_COMM_WORLD_RANK")}
    if "FTJAX_LOCAL_DEVICE_IDS" in env:
        out["local_device_ids"] = [int(i) for i in env["FTJAX_LOCAL_DEVICE_IDS"].split(",") if i]
    return out


def _int(env, name) -> Optional[int]:
    value = env.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an int") from None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None,
               heartbeat_timeout_seconds: Optional[int] = None,
               initialization_timeout_seconds: Optional[int] = None) -> dict:
    """Joins this process to a multi-process JAX run (call before any other jax use).

    Args:
      coordinator_address: "host:port" of process 0's coordinator service.
      num_processes: how many processes take part.
      process_id: this process's rank in [0, num_processes).
      local_device_ids: the local devices this process drives (default: all).
      heartbeat_timeout_seconds: a peer silent this long is declared dead and the
        run ends (default FTJAX_HEARTBEAT_TIMEOUT or 30).
      initialization_timeout_seconds: how long to wait for every process to join
        (default FTJAX_INIT_TIMEOUT or 300).
    Returns:
      The arguments used, with "source" saying where they came from.
    Raises:
      ValueError: the run cannot be described (no coordinator, bad ranks, timeouts).
      RuntimeError: joining failed with a Python-level error from jax (jax 0.10 - 0.12
        abort the process instead when the initialization timeout passes).
    """
    import jax

    env = os.environ
    heartbeat = heartbeat_timeout_seconds or _int(env, "FTJAX_HEARTBEAT_TIMEOUT") \
        or DEFAULT_HEARTBEAT_TIMEOUT
    init_timeout = initialization_timeout_seconds or _int(env, "FTJAX_INIT_TIMEOUT") \
        or DEFAULT_INIT_TIMEOUT
    for name, value in (("heartbeat_timeout_seconds", heartbeat),
                        ("initialization_timeout_seconds", init_timeout)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ftjax.distributed.initialize: {name} must be an int >= 1, "
                             f"got {value!r}")
    found = detect()
    args = {"coordinator_address": coordinator_address, "num_processes": num_processes,
            "process_id": process_id, "local_device_ids": local_device_ids}
    explicit = any(v is not None for v in args.values())
    for k, v in found.items():
        if k in args and args[k] is None:
            args[k] = v
    source = "arguments" if explicit else found.get("source", "nothing")
    if args["coordinator_address"] is None or args["num_processes"] is None \
            or args["process_id"] is None:
        raise ValueError(
            f"ftjax.distributed.initialize: incomplete multi-process description from {source} "
            f"(coordinator_address={args['coordinator_address']!r}, num_processes="
            f"{args['num_processes']!r}, process_id={args['process_id']!r}); pass them, or "
            "set FTJAX_COORDINATOR / FTJAX_NUM_PROCESSES / FTJAX_PROCESS_ID, or run under "
            "srun / mpirun")
    if not 0 <= args["process_id"] < args["num_processes"]:
        raise ValueError(f"ftjax.distributed.initialize: process_id {args['process_id']} is not "
                         f"in [0, num_processes={args['num_processes']})")
    # CPU devices of different processes talk through gloo (jax's default on 0.10 and
    # 0.12; set explicitly so an older default of "none" cannot break collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**{k: v for k, v in args.items() if v is not None},
                                   heartbeat_timeout_seconds=heartbeat,
                                   initialization_timeout=init_timeout)
    except Exception as e:  # jax raises its runtime error type (DEADLINE_EXCEEDED, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RuntimeError(
            f"ftjax.distributed.initialize: process {args['process_id']} could not join "
            f"{args['num_processes']} processes at {args['coordinator_address']} within "
            f"{init_timeout} s ({first})") from e
    _install_lost_peer_hook(args["process_id"], heartbeat)
    return {**args, "source": source, "heartbeat_timeout_seconds": heartbeat,
            "initialization_timeout_seconds": init_timeout}


def lost_peer_message(exc: BaseException) -> Optional[str]:
    """The first line of the error in `exc`'s chain that says a peer is gone, or None."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        for line in str(exc).splitlines():
            if _LOST_PEER.search(line):
                return line.strip()[:300]
        exc = exc.__cause__ or exc.__context__
    return None


def _install_lost_peer_hook(process_id: int, heartbeat: int) -> None:
    """Ends the process with one clear line when it dies of a lost peer.

    Without this, the error of the failed collective is followed, at interpreter exit,
    by jax's distributed shutdown waiting for the dead peer and aborting with a C++
    stack trace. `os._exit` skips that shutdown (the run cannot continue anyway).
    """
    previous = sys.excepthook

    def hook(kind, value, tb):
        line = lost_peer_message(value)
        if line is None:
            return previous(kind, value, tb)
        sys.stdout.flush()
        print(f"ftjax.distributed: process {process_id} lost contact with another process of "
              f"the run ({kind.__name__}: {line}); ending with exit code 1 (peers are declared "
              f"dead after heartbeat_timeout_seconds={heartbeat})", file=sys.stderr, flush=True)
        os._exit(1)

    sys.excepthook = hook
