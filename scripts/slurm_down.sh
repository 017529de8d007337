#!/usr/bin/env bash
# Stop the daemons that scripts/slurm_up.sh started, by the PIDs it recorded (never by name).
# Idempotent: PIDs already gone are skipped. Jobs still running are killed with slurmd.
#   sudo scripts/slurm_down.sh
set -euo pipefail
state=${SLURM_STATE_DIR:-/run/megatron-rl-slurm}
pids=$state/pids
if [[ ! -f $pids ]]; then
  echo "slurm_down: no $pids: nothing to stop"
  exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "slurm_down: must run as root to stop the daemons" >&2; exit 1; }
# Reverse start order: slurmd, slurmctld, munged.
tac "$pids" | while read -r name pid; do
  [[ -n ${pid:-} ]] || continue
  if kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
    echo "slurm_down: stopped $name ($pid)"
  fi
done
rm -f "$pids"
