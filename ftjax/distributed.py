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
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

DEFAULT_PORT = 12355


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
               local_device_ids: Optional[Sequence[int]] = None) -> dict:
    """Joins this process to a multi-process JAX run (call before any other jax use).

    Args:
      coordinator_address: "host:port" of process 0's coordinator service.
      num_processes: how many processes take part.
      process_id: this process's rank in [0, num_processes).
      local_device_ids: the local devices this process drives (default: all).
    Returns:
      The arguments used, with "source" saying where they came from.
    Raises:
      ValueError: the run cannot be described (no coordinator, bad ranks).
    """
    import jax

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
    jax.distributed.initialize(**{k: v for k, v in args.items() if v is not None})
    return {**args, "source": source}
