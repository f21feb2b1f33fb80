#!/usr/bin/env bash
# node2, node3: join node1's cluster with the bootstrap token the Vagrantfile generated. node1 may
# still be building its image or running kubeadm init (libvirt provisions machines in parallel),
# so the join is retried, bounded.
set -euo pipefail

: "${NODE_NAME:?}" "${CONTROL_PLANE_IP:?}" "${BOOTSTRAP_TOKEN:?}"
log() { printf '[%s join] %s\n' "$(hostname)" "$*"; }

if [[ -f /etc/kubernetes/kubelet.conf ]]; then
  log "already joined"
  exit 0
fi

deadline=$((SECONDS + 60 * 60))
until curl -ksf --max-time 5 "https://$CONTROL_PLANE_IP:6443/readyz" >/dev/null; do
  if ((SECONDS > deadline)); then
    echo "the API at $CONTROL_PLANE_IP:6443 did not answer within an hour; is node1 up?" >&2
    exit 1
  fi
  log "waiting for the API at $CONTROL_PLANE_IP:6443"
  sleep 20
done

# The CA is not pinned: the token alone authenticates the control plane. Acceptable on this
# private lab network only; a real cluster passes --discovery-token-ca-cert-hash.
for attempt in 1 2 3 4 5 6; do
  if kubeadm join "$CONTROL_PLANE_IP:6443" --node-name "$NODE_NAME" \
    --token "$BOOTSTRAP_TOKEN" --discovery-token-unsafe-skip-ca-verification; then
    log "joined"
    exit 0
  fi
  log "join attempt $attempt failed; resetting and retrying"
  kubeadm reset -f >/dev/null 2>&1 || true
  sleep 30
done
echo "kubeadm join failed 6 times" >&2
exit 1
