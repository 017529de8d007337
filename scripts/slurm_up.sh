#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this machine (docs/design.md section 7): Debian's Slurm with
# munge, the daemons started directly (there is no systemd), their PIDs kept in $STATE/pids so
# scripts/slurm_down.sh stops exactly them. Idempotent: daemons already running are left alone.
#   sudo scripts/slurm_up.sh        (needs root: apt-get, /etc/slurm, daemons as root)
# Environment: SLURM_STATE_DIR (default /run/megatron-rl-slurm), SLURM_CPUS (default: nproc),
# SLURM_MEM_MB (default: 90% of MemTotal).
set -euo pipefail
state=${SLURM_STATE_DIR:-/run/megatron-rl-slurm}
pids=$state/pids
die() { echo "slurm_up: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, writes /etc/slurm, starts daemons)"

# ---- packages --------------------------------------------------------------------------------
missing=()
for bin in slurmctld slurmd sbatch munged; do command -v "$bin" >/dev/null || missing+=("$bin"); done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and apt-get is not available"
  echo "slurm_up: installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(slurmctld slurmd slurm-client munge)
  apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 \
    || { apt-get update >/dev/null 2>&1 \
         && apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null; } \
    || die "apt-get install ${pkgs[*]} failed"
fi

# ---- directories and config --------------------------------------------------------------------
host=$(hostname -s)
cpus=${SLURM_CPUS:-$(nproc)}
mem=${SLURM_MEM_MB:-$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)}
mkdir -p "$state" /run/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm \
  /etc/slurm
chown munge:munge /run/munge
chmod 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
conf=/etc/slurm/slurm.conf
cat >"$conf.tmp" <<EOF
# Written by megatron-rl scripts/slurm_up.sh: a one-node cluster for tests.
ClusterName=megatron-rl
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=30
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
cmp -s "$conf.tmp" "$conf" || changed=1
mv "$conf.tmp" "$conf"

# ---- daemons -----------------------------------------------------------------------------------
touch "$pids"
running() {  # running NAME: the recorded PID of NAME is alive and is NAME
  local pid
  pid=$(awk -v n="$1" '$1 == n {print $2}' "$pids" | tail -n1)
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]
}
record() {  # record NAME PIDFILE: wait for the daemon's pid file, then note its PID
  local i
  for ((i = 0; i < 100; i++)); do
    if [[ -s $2 ]] && kill -0 "$(cat "$2")" 2>/dev/null; then
      echo "$1 $(cat "$2")" >>"$pids"
      return 0
    fi
    sleep 0.1
  done
  die "$1 did not start (see /var/log/slurm/$1.log or syslog)"
}
stop() {  # stop NAME: end its recorded PID (a changed slurm.conf needs fresh daemons)
  local pid
  running "$1" || return 0
  pid=$(awk -v n="$1" '$1 == n {print $2}' "$pids" | tail -n1)
  kill -TERM "$pid"
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid"
}
if ((changed)); then stop slurmd; stop slurmctld; fi
if ! running munged; then
  rm -f /run/munge/munged.pid
  runuser -u munge -- "$(command -v munged)" \
    || die "munged failed to start"
  record munged /run/munge/munged.pid
fi
if ! running slurmctld; then
  rm -f /run/slurm/slurmctld.pid
  slurmctld || die "slurmctld failed to start (see /var/log/slurm/slurmctld.log)"
  record slurmctld /run/slurm/slurmctld.pid
fi
if ! running slurmd; then
  rm -f /run/slurm/slurmd.pid
  slurmd || die "slurmd failed to start (see /var/log/slurm/slurmd.log)"
  record slurmd /run/slurm/slurmd.pid
fi

# ---- wait until the node takes jobs ----------------------------------------------------------
for ((i = 0; i < 150; i++)); do
  node_state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  case $node_state in
    idle* | mix* | alloc*) echo "slurm_up: node $host is $node_state; PIDs in $pids"; exit 0 ;;
    down* | drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
die "node $host did not become idle within 30 s (state: ${node_state:-unknown})"
