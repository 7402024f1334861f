#!/usr/bin/env bash
# Emulate an N-node cluster on one Linux machine (root), so that the real multi-node
# launch paths (DeepSpeed's pdsh/ssh launcher, mpirun over ssh) run unchanged.
#
#   launch/emulate_cluster.sh up N WORKDIR      start node1..nodeN, print the env file
#   launch/emulate_cluster.sh down WORKDIR      stop everything (idempotent, trap-safe)
#   launch/emulate_cluster.sh exec WORKDIR nodeK CMD...   run CMD inside nodeK
#                                               (keeps the caller's env and cwd)
#
# Each node is a network namespace (veth into a bridge, an address in a private
# 10.231.X.0/24 that this script creates; X is the first free bridge number, so
# several clusters can coexist) holding a UTS + mount namespace with its own
# hostname, /etc/hosts and /etc/ssh/ssh_config, and an sshd on the node address.
# Every process of the node (sshd, ssh sessions, the ranks they start) shares the
# machine's filesystem, so the repository and the venv are the same on all nodes.
#
# After `up`, `. WORKDIR/env.sh` gives: PATH with an `ssh` that knows the nodes,
# PDSH_RCMD_TYPE=ssh, DS_ENV_FILE (the .deepspeed_env DeepSpeed's launcher exports
# on every node) and CLUSTER_HOSTFILE (DeepSpeed hostfile, $SLOTS slots per node,
# default 2: one tower pair).
set -euo pipefail

SUBNET_PREFIX=10.231          # /16 reserved for these test clusters
SSHD=/usr/sbin/sshd           # sshd refuses to run from a relative path

die() { echo "emulate_cluster.sh: $*" >&2; exit 1; }

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# ---------------------------------------------------------------- down
# Kills every process living in the cluster's namespaces (sshd, sessions, ranks),
# then deletes namespaces and bridge. Never fails, so it is safe in any trap.
cmd_down() {
  local wd=$1 state=$1/cluster.state
  [ -f "$state" ] || return 0
  # shellcheck disable=SC1090  # written by cmd_up: BRIDGE, NETNS, NODES, SUBNET
  . "$state"
  local ns sig i
  local -a pids
  for sig in TERM KILL; do
    # Give TERM up to 2 s (sshd and python exit at once), then KILL what is left.
    for i in $(seq 1 10); do
      pids=()
      for ns in $NETNS; do
        mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null || true)
      done
      [ "${#pids[@]}" -eq 0 ] && break 2
      [ "$i" -eq 1 ] && { kill -s "$sig" "${pids[@]}" 2>/dev/null || true; }
      [ "$sig" = KILL ] && break
      sleep 0.2
    done
  done
  for ns in $NETNS; do ip netns del "$ns" 2>/dev/null || true; done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -f "$state"
  return 0
}

# ---------------------------------------------------------------- up
# EXIT trap of `up`: a failed start leaves nothing behind.
up_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "emulate_cluster.sh: up failed, tearing down" >&2
    cmd_down "$UP_WD"
  fi
  exit "$rc"
}

cmd_up() {
  local n=$1 wd=$2
  if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt 250 ]; then
    die "N must be 1..250, got '$n'"
  fi
  [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, sshd)"
  local tool
  for tool in ip unshare nsenter ssh ssh-keygen pdsh "$SSHD"; do
    command -v "$tool" >/dev/null || die "'$tool' missing: run launch/install_cluster_deps.sh"
  done
  mkdir -p "$wd"
  wd=$(cd "$wd" && pwd)
  [ -f "$wd/cluster.state" ] && die "$wd already holds a cluster: run 'down $wd' first"

  # Claim a bridge number: `ip link add` is atomic, so two concurrent `up`s never
  # get the same subnet.
  local x bridge=""
  for x in $(seq 1 254); do
    if ip link add "acbr$x" type bridge 2>/dev/null; then bridge=acbr$x; break; fi
  done
  [ -n "$bridge" ] || die "no free bridge number (acbr1..acbr254 all taken)"

  local netns="" k
  for k in $(seq 1 "$n"); do netns+=" ac${x}n$k"; done
  # State first, so that a failure from here on can be cleaned up by `down`.
  printf 'BRIDGE=%s\nNETNS="%s"\nNODES=%s\nSUBNET=%s\n' \
    "$bridge" "${netns# }" "$n" "$SUBNET_PREFIX.$x" >"$wd/cluster.state"
  UP_WD=$wd   # global: the EXIT trap runs after this function has returned
  # Any failure from here on (set -e or die) leaves nothing behind.
  trap up_exit EXIT

  local net=$SUBNET_PREFIX.$x
  ip addr add "$net.1/24" dev "$bridge"      # the host's own leg: ssh/pdsh from here
  ip link set "$bridge" up

  # Files shared by all nodes.
  mkdir -p "$wd/ssh" "$wd/bin"
  chmod 700 "$wd/ssh"
  rm -f "$wd/ssh/id_ed25519" "$wd/ssh/id_ed25519.pub"
  ssh-keygen -q -t ed25519 -N "" -C "emulated-cluster" -f "$wd/ssh/id_ed25519"
  cp "$wd/ssh/id_ed25519.pub" "$wd/ssh/authorized_keys"

  # The host itself is the "login node" on the bridge address: mpirun (hydra) run
  # here makes its proxies on the nodes connect back to `hostname`.
  {
    echo "127.0.0.1 localhost"
    echo "$net.1 $(hostname)"
    for k in $(seq 1 "$n"); do echo "$net.$((k + 1)) node$k"; done
  } >"$wd/hosts"

  # Client config: used via the ssh wrapper on the host, and bind-mounted as
  # /etc/ssh/ssh_config inside every node (where /etc/hosts resolves the names too).
  {
    for k in $(seq 1 "$n"); do printf 'Host node%s\n  HostName %s\n' "$k" "$net.$((k + 1))"; done
    cat <<EOF
Host *
  User root
  IdentityFile $wd/ssh/id_ed25519
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  ConnectTimeout 10
EOF
  } >"$wd/ssh/config"

  # pdsh, mpirun (hydra) and DeepSpeed's runner all call plain `ssh` from PATH.
  printf '#!/bin/sh\nexec /usr/bin/ssh -F %s/ssh/config "$@"\n' "$wd" >"$wd/bin/ssh"
  chmod +x "$wd/bin/ssh"

  mkdir -p /run/sshd            # sshd's privilege-separation directory

  for k in $(seq 1 "$n"); do
    local ns=ac${x}n$k nd=$wd/node$k addr=$net.$((k + 1))
    mkdir -p "$nd"
    ip netns add "$ns"
    ip link add "${ns}h" type veth peer name eth0 netns "$ns"
    ip link set "${ns}h" master "$bridge" up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up

    rm -f "$nd/host_key" "$nd/host_key.pub"
    ssh-keygen -q -t ed25519 -N "" -f "$nd/host_key"
    cat >"$nd/sshd_config" <<EOF
ListenAddress $addr
HostKey $nd/host_key
PidFile none
AuthorizedKeysFile $wd/ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# WORKDIR may sit under a world-writable /tmp: skip the path-permission check.
StrictModes no
PrintMotd no
X11Forwarding no
UseDNS no
MaxStartups 64:30:128
LogLevel ERROR
EOF
    # Own hostname, /etc/hosts and ssh client config inside this node only, then
    # sshd in the foreground: its PID is the node's anchor for `exec` and `down`.
    # setsid + /dev/null stdio: the node outlives this script and holds no pipe of
    # the caller (a test's subprocess.run would otherwise wait for ever).
    setsid ip netns exec "$ns" unshare --uts --mount --propagation private \
      sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts &&
             mount --bind "$3" /etc/ssh/ssh_config && exec "$4" -D -e -f "$5"' \
      sh "node$k" "$wd/hosts" "$wd/ssh/config" "$SSHD" "$nd/sshd_config" \
      </dev/null >"$nd/sshd.log" 2>&1 &
    echo $! >"$nd/pid"
  done

  # DeepSpeed's runner exports PYTHON* itself; PATH (python, ninja for its op
  # builds, ssh) and VIRTUAL_ENV must come from this file. One KEY=VALUE per line,
  # no blank lines (the runner splits every line on '=').
  {
    echo "PATH=$wd/bin:$PATH"
    local v
    for v in VIRTUAL_ENV TORCH_EXTENSIONS_DIR OMP_NUM_THREADS; do
      if [ -n "${!v:-}" ]; then echo "$v=${!v}"; fi
    done
  } >"$wd/deepspeed_env"

  for k in $(seq 1 "$n"); do echo "node$k slots=${SLOTS:-2}"; done >"$wd/hostfile"

  cat >"$wd/env.sh" <<EOF
export PATH="$wd/bin:\$PATH"
export PDSH_RCMD_TYPE=ssh
export DS_ENV_FILE="$wd/deepspeed_env"
export CLUSTER_HOSTFILE="$wd/hostfile"
export CLUSTER_NODES="$(seq -f 'node%g' -s ' ' 1 "$n")"
EOF

  # Ready when every node answers over ssh with its own hostname.
  local deadline=$((SECONDS + 30)) got
  for k in $(seq 1 "$n"); do
    until got=$("$wd/bin/ssh" "node$k" hostname 2>/dev/null) && [ "$got" = "node$k" ]; do
      kill -0 "$(cat "$wd/node$k/pid")" 2>/dev/null || die "sshd of node$k died: $(cat "$wd/node$k/sshd.log")"
      [ "$SECONDS" -lt "$deadline" ] || die "node$k not reachable over ssh after 30 s"
      sleep 0.2
    done
  done
  trap - EXIT
  echo "$wd/env.sh"
}

# ---------------------------------------------------------------- exec
# Enter a node's network, UTS and mount namespaces directly (no ssh): the command
# keeps this shell's environment and working directory, like a user logged in there.
cmd_exec() {
  local wd=$1 node=$2; shift 2
  [ $# -ge 1 ] || usage
  local pidf=$wd/$node/pid
  if ! { [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; }; then
    die "$node is not running in $wd"
  fi
  exec nsenter -t "$(cat "$pidf")" -n -u -m --wd="$PWD" -- "$@"
}

case "${1:-}" in
  up)   [ $# -eq 3 ] || usage; cmd_up "$2" "$3" ;;
  down) [ $# -eq 2 ] || usage; cmd_down "$2" ;;
  exec) [ $# -ge 4 ] || usage; cmd_exec "$2" "$3" "${@:4}" ;;
  *)    usage ;;
esac
