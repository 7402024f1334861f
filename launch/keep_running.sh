#!/usr/bin/env bash
# Keep a `deepspeed --hostfile` job running through lost nodes.
#
#   launch/keep_running.sh HOSTFILE [deepspeed options] -- train.py [train.py args]
#   launch/keep_running.sh hostfile -- train.py --config configs/imagenet.yaml \
#       --set train.global_batch_size=256 --set data.train_dir=/data/train
#
# DeepSpeed's launcher has no restart of its own (its elasticity config chooses batch
# sizes; it does not relaunch), and its runner stops at the first host of a hostfile that
# does not answer. This wrapper starts the job on the hosts of HOSTFILE that answer ssh
# now, the first of them as the master. When the job fails (a node lost: the others'
# collectives fail within run.collective_timeout_s and every rank exits), it checks the
# hosts again and starts the job anew on those that answer, a node that came back
# included; train.py resumes from the newest complete checkpoint on whatever layout that
# gives. Fix train.global_batch_size so that the optimisation stays the same.
#
# It stops when train.py succeeds, on a user error (exit status 2) or a diverged run (3),
# which would only fail again, after MAX_RESTARTS restarts, or when no host answers.
#
# Variables: MAX_RESTARTS=3, RETRY_DELAY=10 (seconds between a failure and the next start).
set -uo pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 3 ] || usage
hostfile=$1; shift
[ -r "$hostfile" ] || { echo "keep_running.sh: cannot read hostfile $hostfile" >&2; exit 2; }
deepspeed_args=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do deepspeed_args+=("$1"); shift; done
[ "${1:-}" = -- ] && [ $# -ge 2 ] || usage
shift
MAX_RESTARTS=${MAX_RESTARTS:-3}
RETRY_DELAY=${RETRY_DELAY:-10}

live=$(mktemp "${TMPDIR:-/tmp}/hostfile.live.XXXXXX")
trap 'rm -f "$live"' EXIT

# The hosts of $hostfile that answer ssh, into $live (DeepSpeed's hostfile format).
answering_hosts() {
  : >"$live"
  local host slots
  while read -r host slots; do
    case "$host" in '' | \#*) continue ;; esac
    if ssh -o BatchMode=yes -o ConnectTimeout=5 "$host" true </dev/null 2>/dev/null; then
      echo "$host $slots" >>"$live"
    else
      echo "keep_running.sh: $host does not answer ssh: left out of this start" >&2
    fi
  done <"$hostfile"
  [ -s "$live" ]
}

rc=1
for start in $(seq 1 $((MAX_RESTARTS + 1))); do
  if ! answering_hosts; then
    echo "keep_running.sh: no host of $hostfile answers ssh" >&2
    exit 1
  fi
  master=$(head -n 1 "$live" | cut -d' ' -f1)
  echo "keep_running.sh: start $start on $(cut -d' ' -f1 "$live" | paste -sd, -), master $master"
  # --force_multi: over ssh even when one host is left (DeepSpeed would start the ranks
  # on this machine instead).
  deepspeed --hostfile "$live" --force_multi --master_addr "$master" "${deepspeed_args[@]}" "$@"
  rc=$?
  case $rc in
    0) exit 0 ;;
    2 | 3) exit "$rc" ;;
  esac
  if [ "$start" -le "$MAX_RESTARTS" ]; then
    echo "keep_running.sh: the job failed (exit status $rc): starting it again in $RETRY_DELAY s" >&2
    sleep "$RETRY_DELAY"
  fi
done
echo "keep_running.sh: the job failed $((MAX_RESTARTS + 1)) times; giving up (exit status $rc)" >&2
exit "$rc"
