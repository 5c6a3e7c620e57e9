#!/usr/bin/env bash
# A one-node Slurm on this machine, for tests and for trying cluster/slurm/train.sbatch without a cluster.
#
#   sudo cluster/slurm/setup_local_slurm.sh up       # install if missing, configure, start; waits for the node
#   sudo cluster/slurm/setup_local_slurm.sh status   # daemons, node state, queue
#   sudo cluster/slurm/setup_local_slurm.sh down     # cancel jobs, stop what `up` started, remove its config
#
# `up` installs Debian's `slurm-wlm munge` (Slurm 22.05) when slurmctld/slurmd/munged are missing, creates a munge
# key if there is none, writes a one-node /etc/slurm/slurm.conf for this host (CPUs and memory from `slurmd -C`,
# select/cons_tres, proctrack/linuxproc, task/none, SlurmUser=root: no cgroups or systemd needed), starts munged,
# slurmctld and slurmd, and waits until the node is idle. It never overwrites a slurm.conf it did not write:
# on a machine that already runs Slurm it stops with an error. `down` stops only the daemons `up` started (by the
# pids it recorded) and removes only files it wrote. Both are idempotent.
#
# Environment: SLURM_LOCAL_STATE (default /var/lib/dist-nmt-slurm: pids, logs, spool, controller state),
# SLURM_LOCAL_PARTITION (default "debug").
# Exit codes: 0 ok, 1 failure, 3 cannot install (not root, or apt-get failed) -- tests skip on 3.
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/lib/dist-nmt-slurm}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by dist_nmt cluster/slurm/setup_local_slurm.sh"
log() { printf '[local-slurm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit "${2:-1}"; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "Slurm is not installed and installing it needs root" 3
  log "installing slurm-wlm munge from Debian (about a minute)"
  # Debian's policy-rc.d, if present, keeps apt from starting the daemons; this script starts its own.
  apt-get update -qq >&2 || die "apt-get update failed" 3
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 \
    || die "apt-get install slurm-wlm munge failed" 3
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged is already serving (ours from an earlier `up`, or the system's)
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    echo "$MARK" > "$STATE/created-munge-key"
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged
  # munged writes its pid file as the munge user under /run/munge; keep a copy next to the others for `down`.
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$STATE/munged.pid"
  munge -n | unmunge >/dev/null || die "munged started but does not answer; see /var/log/munge/munged.log"
}

node_line() {
  # `slurmd -C` reports this host's real topology; keep what slurm.conf needs and leave 5% of memory free.
  local line
  line=$(slurmd -C 2>/dev/null | head -n 1 || true)
  if [[ $line != NodeName=* ]]; then
    line="NodeName=$(hostname -s) CPUs=$(nproc) RealMemory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))"
  fi
  local mem
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
  sed "s/RealMemory=$mem/RealMemory=$(( mem * 95 / 100 ))/; s/ UpTime=.*//" <<<"$line"
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching a real Slurm configuration"
  fi
  local host
  host=$(hostname -s)
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/slurmd"
  cat > "$CONF" <<EOF
$MARK
# One node, no accounting, no cgroups: enough for sbatch/srun/scontrol on a single machine.
ClusterName=localcluster
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# A requeued job waits cred_expire seconds (default 120) before it may start again, and pending jobs are looked at
# every sched_interval seconds (default 60); both are shortened so local requeue tests take seconds, not minutes.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
# Keep finished jobs visible to 'scontrol show job' (exit codes, restart counts) for ten minutes.
MinJobAge=600
KillWait=30
$(node_line) State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemons() {
  if ! pid_alive "$STATE/slurmctld.pid"; then
    slurmctld -c   # -c: start from a clean state, no jobs left over from an earlier run
  fi
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
  scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer; see $STATE/slurmctld.log"
  if ! pid_alive "$STATE/slurmd.pid"; then
    slurmd
  fi
  local host state=""
  host=$(hostname -s)
  for _ in $(seq 120); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -n 1)
    case $state in
      idle|mixed|allocated) log "ready: node $host is $state, partition $PARTITION"; return 0 ;;
      down*|drain*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node $host did not become idle (state '$state'); see $STATE/slurmd.log and $STATE/slurmctld.log"
}

stop_pid() {  # stop_pid NAME: TERM the pid `up` recorded, wait for it, KILL if needed
  local file=$STATE/$1.pid
  pid_alive "$file" || { rm -f "$file"; return 0; }
  local pid
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$file"
  log "stopped $1 (pid $pid)"
}

cmd_up() {
  [ "$(id -u)" -eq 0 ] || die "run as root (it installs packages, writes /etc/slurm and starts daemons)" 3
  install_packages
  mkdir -p "$STATE"
  start_munge
  write_conf
  start_daemons
}

cmd_down() {
  [ "$(id -u)" -eq 0 ] || die "run as root" 1
  if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF" && scontrol ping >/dev/null 2>&1; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  stop_pid slurmd
  stop_pid slurmctld
  stop_pid munged
  if [ -f "$STATE/created-munge-key" ]; then rm -f /etc/munge/munge.key "$STATE/created-munge-key"; fi
  if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then rm -f "$CONF"; fi
  rm -rf "$STATE/ctld" "$STATE/slurmd"
  log "down"
}

cmd_status() {
  for name in munged slurmctld slurmd; do
    if pid_alive "$STATE/$name.pid"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"
    else echo "$name: not started by this script"; fi
  done
  sinfo 2>/dev/null || true
  squeue 2>/dev/null || true
}

case ${1:-up} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "usage: $0 up|down|status" 1 ;;
esac
