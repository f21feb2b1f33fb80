#!/usr/bin/env bash
# `make lab`: bring up the three-node lab (in a micro-VM where the kernel lacks ipip), put pods on
# every node, show what the cluster looks like and who reaches whom, then take it all down.
set -euo pipefail
cd "$(dirname "$0")/.."
LAB=${LAB:-target/release/warren-lab}
STATE=${WARREN_LAB_STATE:-/run/warren-lab-demo}
lab() { "$LAB" --state-dir "$STATE" "$@"; }
cleanup() { lab down >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== warren-lab up"
lab up
echo
echo "== pods on every node (tests/scenarios/basic/pods.yaml)"
lab kubectl -- apply -f tests/scenarios/basic/pods.yaml
for _ in $(seq 1 120); do
  running=$(lab kubectl -- get pods -A --no-headers 2>/dev/null | grep -c ' Running ' || true)
  [ "$running" -ge 6 ] && break
  sleep 1
done
lab kubectl -- get nodes -o wide
lab kubectl -- get pods -A -o wide
echo
echo "== node2's routes (the seed's shape: peer blocks via tunl0, pods via cali*)"
lab exec node:node2 -- ip route
echo
echo "== who reaches whom on TCP 8080 (every pod to every pod)"
lab matrix --namespaces alpha,beta --port 8080 --timeout 2
echo
echo "== the tekton-dashboard scenario (seed 000), in both kube-proxy modes"
lab down >/dev/null
verdicts=()
for mode in iptables ipvs; do
  if lab scenario tekton --proxy-mode "$mode"; then
    verdicts+=("kube-proxy $mode: every cell as expected")
  else
    verdicts+=("kube-proxy $mode: some cells differ from the expected table (see above)")
  fi
done
echo
printf '%s\n' "${verdicts[@]}"
echo "== warren-lab down"
