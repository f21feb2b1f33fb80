#!/usr/bin/env bash
# The seed's outside load balancer: a host that is neither node nor pod, connecting from
# $LB_ADDRESS to the nodes' NodePorts. Its address sits on the private interface; the nodes route
# it back here (node-base.sh).
set -euo pipefail

: "${LB_ADDRESS:?}" "${CONTROL_PLANE_IP:=10.102.123.117}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q curl >/dev/null

# The private interface is eth1 or enp0s8 depending on box and provider: ask the routing table.
cat >/usr/local/sbin/warren-lb-address <<SCRIPT
#!/bin/sh
set -eu
dev=\$(ip -o -4 route get $CONTROL_PLANE_IP | sed -n 's/.* dev \([^ ]*\).*/\1/p')
case "\${1:-up}" in
  up) ip addr replace $LB_ADDRESS/32 dev "\$dev" ;;
  down) ip addr del $LB_ADDRESS/32 dev "\$dev" 2>/dev/null || true ;;
esac
SCRIPT
chmod 0755 /usr/local/sbin/warren-lb-address

cat >/etc/systemd/system/warren-lb-address.service <<UNIT
[Unit]
Description=The scenario's load balancer address $LB_ADDRESS on the private network
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/warren-lb-address up
ExecStop=/usr/local/sbin/warren-lb-address down

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable warren-lb-address.service >/dev/null
systemctl restart warren-lb-address.service
ip -o -4 addr show | grep -F " $LB_ADDRESS/32"
