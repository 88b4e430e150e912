#!/usr/bin/env bash
# Starts N local processes of one multi-host ftjax run (coordinator on 127.0.0.1).
#
#   examples/launch_multihost.sh N [PROGRAM ARGS...]
#   e.g. CPU only, 2 processes x 4 virtual devices, TP=8 across both:
#   examples/launch_multihost.sh 2 examples/multihost_generate.py --cpu-devices 4 --tp 8
#
# Every process runs the same program; ftjax.distributed.initialize() reads
# FTJAX_COORDINATOR / FTJAX_NUM_PROCESSES / FTJAX_PROCESS_ID set here.
# Environment: PYTHON (default python3), FTJAX_COORDINATOR_PORT (default: a free port).
#
# On a SLURM cluster, srun starts one process per task and initialize() reads
# SLURM_PROCID / SLURM_NTASKS / SLURM_STEP_NODELIST (coordinator: the first node):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-task=4 \
#        python examples/multihost_generate.py --tp 8 --model /ckpt/gpt-j
#
# With Open MPI, ranks come from OMPI_COMM_WORLD_*; name the coordinator host:
#   mpirun -np 2 -H node0,node1 -x FTJAX_COORDINATOR=node0:12355 \
#        python examples/multihost_generate.py --tp 8 --model /ckpt/gpt-j
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
N=$1; shift
PYTHON=${PYTHON:-python3}
PORT=${FTJAX_COORDINATOR_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < N; i++)); do
  FTJAX_COORDINATOR=127.0.0.1:$PORT FTJAX_NUM_PROCESSES=$N FTJAX_PROCESS_ID=$i \
    "$PYTHON" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
