#!/usr/bin/env bash
# Debian packages the emulated cluster and the one-machine SLURM need (root only).
# Idempotent and quick when everything is present: apt is only touched when a
# package is missing, so CI can call this on every run.
set -euo pipefail

PKGS=(openssh-server openssh-client pdsh iproute2 util-linux procps slurm-wlm munge)

missing=()
for p in "${PKGS[@]}"; do
  # dpkg-query prints "install ok installed" only for a fully installed package.
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install_cluster_deps.sh: need root to install: ${missing[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d answering 101 stops the packages' postinst from starting sshd,
# munge or slurm daemons system-wide: the scripts in launch/ start their own.
policy=/usr/sbin/policy-rc.d
had_policy=0; [ -e "$policy" ] && had_policy=1
if [ "$had_policy" -eq 0 ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi

apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
