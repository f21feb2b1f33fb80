#!/usr/bin/env bash
# node1: kubeadm init with the seed's CIDRs, kube-proxy in $PROXY_MODE, then warren the way users
# install it: `kubectl apply -f deploy/warren.yaml`.
set -euo pipefail

: "${NODE_IP:?}" "${NODE_NAME:?}" "${PROXY_MODE:?}" "${BOOTSTRAP_TOKEN:?}"
export KUBECONFIG=/etc/kubernetes/admin.conf
log() { printf '[%s control-plane] %s\n' "$(hostname)" "$*"; }

if [[ ! -f /etc/kubernetes/admin.conf ]]; then
  log "kubeadm init"
  kubeadm init \
    --apiserver-advertise-address "$NODE_IP" \
    --node-name "$NODE_NAME" \
    --pod-network-cidr 10.233.64.0/18 \
    --service-cidr 10.233.0.0/18 \
    --token "$BOOTSTRAP_TOKEN" \
    --token-ttl 24h0m0s
fi

install -d -o vagrant -g vagrant /home/vagrant/.kube
install -m 0600 -o vagrant -g vagrant /etc/kubernetes/admin.conf /home/vagrant/.kube/config

# kubeadm's flags have no proxy mode; kube-proxy reads it from its ConfigMap ("" = iptables).
current=$(kubectl -n kube-system get configmap kube-proxy -o jsonpath='{.data.config\.conf}' \
  | awk '$1 == "mode:" { gsub(/"/, "", $2); print $2 }')
want=$PROXY_MODE
[[ "$want" == iptables && -z "$current" ]] && current=iptables
# Seed 000's IPVS cluster masqueraded pods' ClusterIP connections too (bar reached the dashboard
# by service name once tunl0 was whitelisted): masqueradeAll, as warren-lab's IPVS mode runs it.
masq_all=false
[[ "$want" == ipvs ]] && masq_all=true
if [[ "$current" != "$want" ]]; then
  log "kube-proxy mode: ${current:-iptables} -> $want (masqueradeAll: $masq_all)"
  kubectl -n kube-system get configmap kube-proxy -o yaml \
    | sed -E -e "s/^( +)mode: .*/\\1mode: \"$want\"/" \
      -e "s/^( +)masqueradeAll: .*/\\1masqueradeAll: $masq_all/" \
    | kubectl replace -f -
  kubectl -n kube-system rollout restart daemonset/kube-proxy
  kubectl -n kube-system rollout status daemonset/kube-proxy --timeout=5m
fi

# The seed's node1 is control plane and worker.
kubectl taint nodes "$NODE_NAME" node-role.kubernetes.io/control-plane:NoSchedule- 2>/dev/null || true

log "kubectl apply -f deploy/warren.yaml"
kubectl apply -f /warren/deploy/warren.yaml
log "waiting for warren-node on $NODE_NAME and the node to be Ready"
kubectl -n kube-system rollout status daemonset/warren-node --timeout=10m
kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=10m
kubectl get nodes -o wide
