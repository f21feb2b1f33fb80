#!/usr/bin/env bash
# Every node: kernel settings kubeadm and warren need, containerd, kubelet/kubeadm/kubectl from
# the Kubernetes package repositories, and the route to the seed's outside load balancer.
# Idempotent: `vagrant provision` may run it again.
set -euo pipefail

: "${NODE_IP:?}" "${K8S_VERSION:?}" "${LB_ADDRESS:?}" "${LB_UNDERLAY:?}"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[%s node-base] %s\n' "$(hostname)" "$*"; }

log "swap off (the kubelet refuses to start with swap by default)"
swapoff -a
sed -ri 's@^([^#].*\sswap\s.*)$@# \1@' /etc/fstab

log "kernel modules: bridge netfilter, IPVS for kube-proxy, ipip for warren's tunl0"
cat >/etc/modules-load.d/warren-k8s.conf <<'MODULES'
overlay
br_netfilter
ip_vs
ip_vs_rr
ip_vs_wrr
ip_vs_sh
nf_conntrack
ipip
MODULES
while read -r m; do modprobe "$m"; done </etc/modules-load.d/warren-k8s.conf
cat >/etc/sysctl.d/90-warren-k8s.conf <<'SYSCTL'
net.bridge.bridge-nf-call-iptables = 1
net.ipv4.ip_forward = 1
SYSCTL
sysctl --system >/dev/null

log "packages"
apt-get update -q
apt-get install -y -q ca-certificates curl gpg iptables ipset ipvsadm conntrack socat ebtables
install -d -m 0755 /etc/apt/keyrings

# containerd from Docker's repository: the distributions' containerd 1.x is older than what
# current Kubernetes releases support.
# shellcheck source=/dev/null
. /etc/os-release
if ! dpkg -s containerd.io >/dev/null 2>&1; then
  log "containerd.io from download.docker.com ($ID $VERSION_CODENAME)"
  curl -fsSL "https://download.docker.com/linux/$ID/gpg" | gpg --dearmor --yes -o /etc/apt/keyrings/docker.gpg
  echo "deb [signed-by=/etc/apt/keyrings/docker.gpg] https://download.docker.com/linux/$ID $VERSION_CODENAME stable" \
    >/etc/apt/sources.list.d/docker.list
  apt-get update -q
  apt-get install -y -q containerd.io
fi
# The kubelet uses the systemd cgroup driver (kubeadm's default); containerd must match.
containerd config default >/etc/containerd/config.toml
sed -i 's/SystemdCgroup = false/SystemdCgroup = true/' /etc/containerd/config.toml
if ! grep -q 'SystemdCgroup = true' /etc/containerd/config.toml; then
  echo "containerd's default config has no SystemdCgroup switch to turn on; check /etc/containerd/config.toml" >&2
  exit 1
fi
systemctl enable containerd >/dev/null
systemctl restart containerd
cat >/etc/crictl.yaml <<'CRICTL'
runtime-endpoint: unix:///run/containerd/containerd.sock
image-endpoint: unix:///run/containerd/containerd.sock
CRICTL

if ! dpkg -s kubeadm >/dev/null 2>&1; then
  log "kubelet, kubeadm, kubectl from pkgs.k8s.io ($K8S_VERSION)"
  curl -fsSL "https://pkgs.k8s.io/core:/stable:/$K8S_VERSION/deb/Release.key" \
    | gpg --dearmor --yes -o /etc/apt/keyrings/kubernetes-apt-keyring.gpg
  echo "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] https://pkgs.k8s.io/core:/stable:/$K8S_VERSION/deb/ /" \
    >/etc/apt/sources.list.d/kubernetes.list
  apt-get update -q
  # kubernetes-cni brings loopback and portmap (warren's conflist chains portmap).
  apt-get install -y -q kubelet kubeadm kubectl kubernetes-cni
  apt-mark hold kubelet kubeadm kubectl >/dev/null
fi
# Vagrant's first NIC is a NAT shared by every machine; the cluster lives on the private network.
echo "KUBELET_EXTRA_ARGS=--node-ip=$NODE_IP" >/etc/default/kubelet
systemctl enable kubelet >/dev/null

log "route to the outside load balancer $LB_ADDRESS via $LB_UNDERLAY"
cat >/etc/systemd/system/warren-lb-route.service <<UNIT
[Unit]
Description=Route to the scenario's outside load balancer ($LB_ADDRESS)
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ip route replace $LB_ADDRESS/32 via $LB_UNDERLAY
ExecStop=/usr/sbin/ip route del $LB_ADDRESS/32 via $LB_UNDERLAY

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now warren-lb-route.service >/dev/null
systemctl restart warren-lb-route.service
log "done"
