#!/usr/bin/env bash
# Benchmarks and soaks, run by `make bench` (as root) with the release binaries.
# Each prints a table and writes JSON under target/bench/. Timing is reported, never asserted;
# the soak exits non-zero on any leak or duplicate address, and so does this script.
#   BENCH_COUNT  ADD/DEL per plugin for bench-cni (default 1000)
#   SOAK_CYCLES  ADD/DEL cycles for soak-cni (default 10000)
#   POLICY_EDITS policy edits per size for policy_writer_bench (default 20)
#   LATENCY_EDITS policy edits per backend for policy_latency_bench (default 30)
#   CONNRATE_SECONDS seconds per phase for bench-connrate (default 10)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo="${CARGO:-cargo}"
target="${CARGO_TARGET_DIR:-$root/target}"
export WARREN_BIN_DIR="${WARREN_BIN_DIR:-$target/release}"

if [[ $EUID -ne 0 ]]; then
  echo "bench.sh: run as root (the benchmarks make network namespaces)" >&2
  exit 1
fi
"$cargo" build --release -p cni-bin -p integration-tests --bins
mkdir -p "$root/target/bench"

echo "== bench-cni: warren vs ptp + host-local"
"$target/release/bench-cni" --count "${BENCH_COUNT:-1000}" --out "$root/target/bench/bench-cni.json"

echo "== soak-cni: ADD/DEL with kill -9, then GC"
"$target/release/soak-cni" --cycles "${SOAK_CYCLES:-10000}" --out "$root/target/bench/soak-cni.json"

echo "== overlay: node event → route, 5 000 peer routes from cold, resync CPU, RSS (warren-node)"
"$cargo" build --release -p node-daemon -p policy --bins --examples
"$target/release/examples/overlay_bench" "$target/release/warren-node" --out "$root/target/bench/overlay.json"

echo "== policy compiler at 1 000 / 10 000 pods and 200 / 1 000 policies"
"$target/release/examples/scale" --out "$root/target/bench/policy_scale.json"

echo "== warren-node per-pass model + compile at 10 000 pods / 1 000 policies: per-pass copy+convert vs conversion cache"
"$target/release/examples/daemon_pass_bench" --out "$root/target/bench/daemon_pass.json"

echo "== policy writer (real iptables/ipset, throw-away netns): sizes, edit latency, pod add at ~100 000 rules"
"$target/release/examples/policy_writer_bench" --edits "${POLICY_EDITS:-20}" --out "$root/target/bench/policy_writer.json"

echo "== warren-node end to end: NetworkPolicy patched through the API → programmed, 10 000 pods / 1 000 policies"
"$target/release/examples/policy_latency_bench" "$target/release/warren-node" --edits "${LATENCY_EDITS:-30}" --out "$root/target/bench/policy_latency.json"

echo "== lab: up to Ready, pod create to Running"
"$root/scripts/bench-lab.sh"

echo "== lab: connection rate between pods on two nodes, without and with 1 000 policies (--vm never, IPIP Never)"
"$target/release/bench-connrate" --seconds "${CONNRATE_SECONDS:-10}" --out "$root/target/bench/connrate.json"

echo "== reports in $root/target/bench/"
