//! kube-proxy emulation (iptables mode).
