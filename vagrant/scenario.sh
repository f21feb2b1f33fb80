#!/usr/bin/env bash
# The tekton-dashboard scenario (tests/scenarios/tekton/, the data `warren-lab scenario tekton`
# runs) against the Vagrant kubeadm cluster, with real kubectl, real kube-proxy and real probes:
# pods probe with `kubectl exec … wget`, the load balancer VM with curl from 10.2.3.4.
# Prints expected vs observed per cell and a verdict per experiment; exits 1 on any mismatch.
#
# usage: vagrant/scenario.sh [--proxy-mode ipvs|iptables] [--keep] [--timeout SECONDS]
#   --proxy-mode  which expected table to compare with (default: the cluster's kube-proxy mode;
#                 switching the cluster's mode is a provisioning step, see README.md)
#   --keep        leave the scenario's namespaces and policies in place afterwards
#   --timeout     bound for each experiment to converge (default 120)
# Needs: vagrant (the cluster up), kubectl and python3 with PyYAML on the host.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
data="$repo/tests/scenarios/tekton"
proxy_mode=""
keep=0
converge_timeout=120
probe_timeout=3

while (($#)); do
  case "$1" in
    --proxy-mode) proxy_mode=${2:?--proxy-mode needs ipvs or iptables}; shift 2 ;;
    --keep) keep=1; shift ;;
    --timeout) converge_timeout=${2:?--timeout needs seconds}; shift 2 ;;
    -h | --help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

for tool in vagrant kubectl python3; do
  command -v "$tool" >/dev/null || { echo "scenario.sh needs $tool on the host" >&2; exit 2; }
done
[[ -f "$data/scenario.yaml" ]] || { echo "no scenario data at $data" >&2; exit 2; }

sd() { python3 "$here/scenario_data.py" --dir "$data" "$@"; }
log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

workdir=$(mktemp -d)
cleanup_files() { rm -rf "$workdir"; }
trap cleanup_files EXIT

# The cluster's admin kubeconfig; its server is node1's private address, which the host reaches.
cd "$here"
vagrant ssh node1 -c 'sudo cat /etc/kubernetes/admin.conf' 2>/dev/null >"$workdir/kubeconfig"
grep -q 'server: https://' "$workdir/kubeconfig" || { echo "could not read node1's admin.conf (is the cluster up?)" >&2; exit 2; }
export KUBECONFIG="$workdir/kubeconfig"
kubectl get nodes -o wide >&2

if [[ -z "$proxy_mode" ]]; then
  proxy_mode=$(kubectl -n kube-system get configmap kube-proxy -o jsonpath='{.data.config\.conf}' \
    | awk '$1 == "mode:" { gsub(/"/, "", $2); print $2 }')
  proxy_mode=${proxy_mode:-iptables}
fi
log "kube-proxy mode: $proxy_mode"

IFS=$'\t' read -r target_ns target_svc target_pod lb_ip < <(sd info)

declare -A src_kind src_ns src_pod path_to path_port path_pods_only
while IFS=$'\t' read -r id kind ns pod; do
  src_kind[$id]=$kind src_ns[$id]=$ns src_pod[$id]=$pod
done < <(sd sources)
while IFS=$'\t' read -r id to port pods_only; do
  path_to[$id]=$to path_port[$id]=$port path_pods_only[$id]=$pods_only
done < <(sd paths)

# One probe: prints "connected" when the dashboard itself answered, "no-conn" otherwise.
probe() {
  local src=$1 path=$2 url answer
  url="http://${path_to[$path]}:${path_port[$path]}/hostname"
  if [[ ${src_kind[$src]} == host ]]; then
    answer=$(vagrant ssh "${src_ns[$src]}" -c \
      "curl -s --max-time $probe_timeout --interface $lb_ip $url" 2>/dev/null || true)
  else
    answer=$(kubectl -n "${src_ns[$src]}" exec "${src_pod[$src]}" -- \
      wget -q -O - -T "$probe_timeout" "$url" 2>/dev/null || true)
  fi
  answer=${answer//$'\r'/}
  if [[ "$answer" == "$target_pod" ]]; then echo connected; else echo no-conn; fi
}

# "blocked" and "no-answer" are the same in probe terms (expected.yaml): not connected.
matches() { [[ "$1" == connected && "$2" == connected ]] || [[ "$1" != connected && "$2" != connected ]]; }

set_nodeport_policy() {
  local want=$1 have
  have=$(kubectl -n kube-system get configmap warren-config -o jsonpath='{.data.nodeport_policy}')
  [[ "$have" == "$want" ]] && return 0
  log "warren nodeport_policy: $have -> $want (rolling warren-node)"
  kubectl -n kube-system patch configmap warren-config --type merge -p "{\"data\":{\"nodeport_policy\":\"$want\"}}" >/dev/null
  kubectl -n kube-system rollout restart daemonset/warren-node >/dev/null
  kubectl -n kube-system rollout status daemonset/warren-node --timeout=5m >&2
}

node_blocks_json() {
  local first=1 n block
  printf '{'
  for n in $(kubectl get nodes -o jsonpath='{.items[*].metadata.name}'); do
    block=$(kubectl get node "$n" -o jsonpath='{.metadata.annotations.warren\.dev/block}')
    [[ -n "$block" ]] || block=$(kubectl get node "$n" -o jsonpath='{.spec.podCIDR}')
    [[ -n "$block" ]] || continue
    ((first)) || printf ','
    first=0
    printf '"%s":"%s"' "$n" "$block"
  done
  printf '}'
}

cleanup_cluster() {
  ((keep)) && return 0
  log "removing the scenario's objects"
  sd cluster 2>/dev/null | kubectl delete --ignore-not-found --wait=false -f - >/dev/null 2>&1 || true
}

log "applying the scenario's cluster (namespaces, dashboard on node2, NodePort 31602, clients)"
sd cluster >"$workdir/cluster.yaml"
kubectl apply -f "$workdir/cluster.yaml" >&2
trap 'cleanup_cluster; cleanup_files' EXIT
kubectl wait --for=condition=Ready pod --all -n "$target_ns" --timeout=5m >&2
for id in "${!src_kind[@]}"; do
  [[ ${src_kind[$id]} == pod ]] && kubectl -n "${src_ns[$id]}" wait --for=condition=Ready "pod/${src_pod[$id]}" --timeout=5m >/dev/null
done
original_nodeport_policy=$(kubectl -n kube-system get configmap warren-config -o jsonpath='{.data.nodeport_policy}')
blocks=$(node_blocks_json)
log "node blocks: $blocks"

total_mismatches=0
verdicts=()
printf '\n%-6s %-10s %-15s %-10s %-10s %s\n' EXP SOURCE PATH EXPECTED OBSERVED ""
# The loops read their records on fd 3: kubectl and `vagrant ssh` inside must not eat them.
while IFS=$'\t' read -r -u 3 exp etp np_policy policies title; do
  log "$exp: $title"
  kubectl -n "$target_ns" delete networkpolicy --all >/dev/null
  kubectl -n "$target_ns" patch service "$target_svc" --type merge \
    -p "{\"spec\":{\"externalTrafficPolicy\":\"$etp\"}}" >/dev/null
  set_nodeport_policy "$np_policy"
  IFS=, read -ra files <<<"$policies"
  for f in "${files[@]}"; do
    printf '%s' "$blocks" | sd policy "$data/$f" | kubectl apply -f - >/dev/null
  done

  declare -A expected=()
  while IFS=$'\t' read -r src path want; do expected["$src|$path"]=$want; done < <(sd expected "$proxy_mode" "$exp" </dev/null)
  if ((${#expected[@]} == 0)); then
    echo "expected.yaml has no cells for $proxy_mode/$exp" >&2
    exit 2
  fi

  # Wait until the cells that change with this experiment show it, bounded.
  deadline=$((SECONDS + converge_timeout))
  while IFS=$'\t' read -r -u 3 src path; do
    until matches "${expected["$src|$path"]}" "$(probe "$src" "$path" </dev/null)"; do
      if ((SECONDS > deadline)); then
        log "$exp: $src -> $path did not converge within ${converge_timeout}s; probing anyway"
        break
      fi
      sleep 2
    done
  done 3< <(sd converge "$exp" </dev/null)

  mismatches=0
  for key in $(printf '%s\n' "${!expected[@]}" | sort); do
    src=${key%%|*} path=${key#*|}
    want=${expected[$key]}
    if [[ ${src_kind[$src]:-} == "" || ${path_to[$path]:-} == "" ]]; then
      echo "expected.yaml names $src -> $path, which scenario.yaml does not define" >&2
      exit 2
    fi
    if [[ ${src_kind[$src]} == host && ${path_pods_only[$path]} == 1 ]]; then
      printf '%-6s %-10s %-15s %-10s %-10s %s\n' "$exp" "$src" "$path" "$want" "-" "skipped (pods only)"
      continue
    fi
    got=$(probe "$src" "$path" </dev/null)
    if matches "$want" "$got"; then mark=ok; else mark=MISMATCH; mismatches=$((mismatches + 1)); fi
    printf '%-6s %-10s %-15s %-10s %-10s %s\n' "$exp" "$src" "$path" "$want" "$got" "$mark"
  done
  total_mismatches=$((total_mismatches + mismatches))
  if ((mismatches == 0)); then
    verdicts+=("$exp PASS  ($title)")
  else
    verdicts+=("$exp FAIL  $mismatches cell(s) differ  ($title)")
  fi
  unset expected
done 3< <(sd experiments)

set_nodeport_policy "${original_nodeport_policy:-preserve-source}"
kubectl -n "$target_ns" delete networkpolicy --all >/dev/null

printf '\nkube-proxy %s, real kubeadm cluster:\n' "$proxy_mode"
printf '  %s\n' "${verdicts[@]}"
if ((total_mismatches > 0)); then
  printf '%d cell(s) differ from tests/scenarios/tekton/expected.yaml\n' "$total_mismatches"
  exit 1
fi
printf 'every cell as expected\n'
