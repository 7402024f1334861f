#!/usr/bin/env bash
# A one-machine SLURM cluster (munged + slurmctld + slurmd) for tests and demos (root).
#
#   launch/slurm_local.sh up WORKDIR     start it, wait until the node is idle,
#                                        print WORKDIR/env.sh (exports SLURM_CONF)
#   launch/slurm_local.sh down WORKDIR   cancel jobs, stop every daemon and task
#                                        (idempotent, safe in a trap)
#
# Then: . WORKDIR/env.sh && sbatch launch/slurm.sbatch ...
#
# No systemd, no cgroups: proctrack/linuxproc + task/none, accounting off. Its own
# munge key and socket, own ports and state dirs, so it touches no system-wide
# SLURM/munge setup and several can run side by side. Every daemon starts with
# SLURM_LOCAL_WORKDIR=<WORKDIR> in its environment: `down` kills the processes
# carrying it and their descendants (job tasks), those of this cluster and no other.
set -euo pipefail

die() { echo "slurm_local.sh: $*" >&2; exit 1; }
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# PIDs of this cluster: processes started with the marker in their environment
# (munged, slurmctld, slurmd and the slurmstepds slurmd forks) and all their
# descendants (the job tasks, whose environment is the job's, not slurmd's).
cluster_pids() {
  local marker=$1 f pid ppid changed=1
  local -A ours=()
  for f in /proc/[0-9]*/environ; do
    pid=${f#/proc/}; pid=${pid%/environ}
    # -z: environ is NUL-separated; unreadable entries (kernel threads, gone) just fail.
    if grep -qzxF "$marker" "$f" 2>/dev/null; then ours[$pid]=1; fi
  done
  local tree
  tree=$(ps -e -o pid=,ppid=)
  while [ "$changed" = 1 ]; do
    changed=0
    while read -r pid ppid; do
      if [ -n "${ours[$ppid]:-}" ] && [ -z "${ours[$pid]:-}" ]; then ours[$pid]=1; changed=1; fi
    done <<<"$tree"
  done
  unset "ours[$$]" "ours[$BASHPID]"
  echo "${!ours[@]}"
}

# ---------------------------------------------------------------- down
cmd_down() {
  local wd=$1
  [ -f "$wd/slurm.state" ] || return 0
  # shellcheck disable=SC1091  # written by cmd_up: CONF, MUNGE_DIR, MARKER
  . "$wd/slurm.state"
  # Cancel jobs while slurmctld still runs (bounded: scancel talks to it).
  SLURM_CONF=$CONF timeout 10 scancel --full --partition=local >/dev/null 2>&1 || true
  local sig i pids
  for sig in TERM KILL; do
    # TERM, up to 5 s to exit (slurmd waits for its steps), then KILL the rest.
    for i in $(seq 1 25); do
      pids=$(cluster_pids "$MARKER")
      [ -z "$pids" ] && break 2
      # shellcheck disable=SC2086  # a list of PIDs
      [ "$i" -eq 1 ] && { kill -s "$sig" $pids 2>/dev/null || true; }
      [ "$sig" = KILL ] && break
      sleep 0.2
    done
  done
  rm -rf "$MUNGE_DIR"
  rm -f "$wd/slurm.state"
  return 0
}

# A TCP port that nothing listens on now (the range stays clear of 29500 and friends).
pick_port() {
  local p
  while :; do
    p=$((30000 + RANDOM % 20000))
    [ -z "$(ss -Hltn "sport = :$p")" ] && [ -z "$(ss -Hltn "sport = :$((p + 1))")" ] && { echo "$p"; return; }
  done
}

# ---------------------------------------------------------------- up
# EXIT trap of `up`: a failed start leaves nothing running.
up_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "slurm_local.sh: up failed, tearing down (logs in $UP_WD/log)" >&2
    cmd_down "$UP_WD"
  fi
  exit "$rc"
}

cmd_up() {
  local wd=$1
  [ "$(id -u)" -eq 0 ] || die "needs root (munged runs as the munge user, slurmd as root)"
  local tool
  for tool in munged mungekey slurmctld slurmd sinfo sbatch scontrol setpriv ss; do
    command -v "$tool" >/dev/null || die "'$tool' missing: run launch/install_cluster_deps.sh"
  done
  id munge >/dev/null 2>&1 || die "no 'munge' user: run launch/install_cluster_deps.sh"
  mkdir -p "$wd"
  wd=$(cd "$wd" && pwd)
  [ -f "$wd/slurm.state" ] && die "$wd already holds a SLURM cluster: run 'down $wd' first"

  local conf=$wd/slurm.conf host
  host=$(hostname -s)
  # munged runs as the munge user, which cannot enter a 0700 WORKDIR (pytest's
  # tmp_path is one): its key, socket and logs live in their own dir under /tmp.
  local mdir
  mdir=$(mktemp -d /tmp/slurm-munge.XXXXXX)
  local marker="SLURM_LOCAL_WORKDIR=$wd"
  printf 'CONF=%q\nMUNGE_DIR=%q\nMARKER=%q\n' "$conf" "$mdir" "$marker" >"$wd/slurm.state"
  UP_WD=$wd   # global: the EXIT trap runs after this function has returned
  # Any failure from here on (set -e or die) leaves nothing running.
  trap up_exit EXIT

  mkdir -p "$wd/state" "$wd/spool" "$wd/log"
  mungekey --create --keyfile="$mdir/munge.key" --force
  chown -R munge:munge "$mdir"
  chmod 0400 "$mdir/munge.key"
  # Owned by munge, enterable (not listable) by the clients that use the socket.
  chmod 0711 "$mdir"

  local ctld_port
  ctld_port=$(pick_port)
  cat >"$conf" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$((ctld_port + 1))
SlurmUser=root
MailProg=/bin/true
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket=$mdir/munge.socket,cred_expire=10
StateSaveLocation=$wd/state
SlurmdSpoolDir=$wd/spool
SlurmctldPidFile=$wd/slurmctld.pid
SlurmdPidFile=$wd/slurmd.pid
SlurmctldLogFile=$wd/log/slurmctld.log
SlurmdLogFile=$wd/log/slurmd.log
# No systemd/cgroups here: track tasks by process tree, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Without pmi2 every MPI task under srun believes it is rank 0.
MpiDefault=pmi2
SwitchType=switch/none
SchedulerType=sched/backfill
# Re-scan pending jobs every 2 s (default 60): back-to-back test jobs start at once.
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

  # Daemons in the foreground, detached from the caller (setsid, no inherited
  # pipes): their PIDs are the ones we kill in `down`.
  local pids="" pid
  env "$marker" setsid setpriv --reuid=munge --regid=munge --init-groups munged --foreground --force \
    --key-file="$mdir/munge.key" --socket="$mdir/munge.socket" \
    --pid-file="$mdir/munged.pid" --seed-file="$mdir/munged.seed" --log-file="$mdir/munged.log" \
    </dev/null >"$wd/log/munged.out" 2>&1 &
  pids+=" $!"
  local deadline=$((SECONDS + 15))
  until [ -S "$mdir/munge.socket" ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "munged did not start: $(cat "$wd/log/munged.out" "$mdir/munged.log" 2>/dev/null)"
    sleep 0.1
  done

  env "$marker" SLURM_CONF="$conf" setsid slurmctld -D -i -f "$conf" </dev/null >"$wd/log/slurmctld.out" 2>&1 &
  pids+=" $!"
  env "$marker" SLURM_CONF="$conf" setsid slurmd -D -f "$conf" -N "$host" </dev/null >"$wd/log/slurmd.out" 2>&1 &
  pids+=" $!"

  echo "export SLURM_CONF=$conf" >"$wd/env.sh"

  # Ready when the node reports idle (slurmd registered, nothing drained).
  deadline=$((SECONDS + 60))
  local st=""
  until [ "$st" = idle ]; do
    for pid in $pids; do
      kill -0 "$pid" 2>/dev/null || die "a daemon exited; see $wd/log: $(tail -n 5 "$wd"/log/*.out)"
    done
    [ "$SECONDS" -lt "$deadline" ] || die "node not idle after 60 s (state '$st'); see $wd/log"
    sleep 0.5
    st=$(SLURM_CONF=$conf timeout 5 sinfo -h -n "$host" -o %t 2>/dev/null || true)
  done
  trap - EXIT
  echo "$wd/env.sh"
}

case "${1:-}" in
  up)   [ $# -eq 2 ] || usage; cmd_up "$2" ;;
  down) [ $# -eq 2 ] || usage; cmd_down "$2" ;;
  *)    usage ;;
esac
