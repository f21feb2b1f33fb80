#!/usr/bin/env bash
# Lab timings: `warren-lab up` to all nodes Ready, and pod create to Running for pods on every node.
# Prints a table and writes target/bench/lab.json. Timing is reported, never asserted.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
LAB="${WARREN_BIN_DIR:-$root/target/release}/warren-lab"
STATE=/run/warren-lab-bench
lab() { "$LAB" --state-dir "$STATE" "$@"; }
trap 'lab down >/dev/null 2>&1 || true' EXIT
mkdir -p target/bench

t0=$(date +%s.%N)
lab up >/dev/null
t1=$(date +%s.%N)
lab kubectl -- apply -f tests/scenarios/basic/pods.yaml >/dev/null
while [ "$(lab kubectl -- get pods -A --no-headers 2>/dev/null | grep -c ' Running ')" -lt 6 ]; do sleep 0.2; done
t2=$(date +%s.%N)
vm=$(lab status --json | jq -r '.vm')
up=$(echo "$t1 - $t0" | bc -l)
pods=$(echo "$t2 - $t1" | bc -l)
printf '%-34s %10s\n' "lab ($([ "$vm" = true ] && echo micro-VM || echo this kernel))" "seconds"
printf '%-34s %10.1f   (aim: < 60 in the VM)\n' "up → 3 nodes Ready" "$up"
printf '%-34s %10.1f\n' "6 pods created → all Running" "$pods"
printf '{"vm": %s, "up_to_ready_s": %.2f, "six_pods_to_running_s": %.2f}\n' "$vm" "$up" "$pods" > target/bench/lab.json
