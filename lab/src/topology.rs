//! The lab's cluster shape: node names, underlay addresses and pod blocks (pure).
//!
//! The default three nodes are seed 000's cluster exactly, so the scenario's tables can name the
//! same addresses the article does.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Underlay subnet of the nodes (seed 000).
pub const UNDERLAY: &str = "10.102.123.0/24";
/// The underlay router's address on the node subnet (lives in the switch namespace).
pub const UNDERLAY_GW: Ipv4Addr = Ipv4Addr::new(10, 102, 123, 1);
/// Default pool (kubespray's, as in seed 000).
pub const POOL: &str = "10.233.64.0/18";
/// Service CIDR of the lab.
pub const SERVICE_CIDR: &str = "10.233.0.0/18";
/// Port of the API stand-in on the control-plane node.
pub const API_PORT: u16 = 6443;

/// Seed 000's nodes: (name, InternalIP, block).
const SEED_NODES: &[(&str, [u8; 4], [u8; 4])] = &[
    ("node1", [10, 102, 123, 117], [10, 233, 90, 0]),
    ("node2", [10, 102, 123, 104], [10, 233, 96, 0]),
    ("node3", [10, 102, 123, 143], [10, 233, 92, 0]),
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Node.spec.podCIDR as the controller-manager would allocate it.
    pub block: Ipv4Net,
}

impl NodeSpec {
    /// The node's network namespace.
    pub fn netns(&self) -> String {
        format!("{NETNS_PREFIX}{}", self.name)
    }
}

/// Every namespace, link and process the lab makes carries this prefix, so `down` can sweep
/// leftovers of a crashed lab without touching anything else.
pub const NETNS_PREFIX: &str = "wlab-";
/// The switch (underlay bridge + router) namespace.
pub const SWITCH_NETNS: &str = "wlab-switch";

/// `n` nodes: the seed's three first, then `node4…` on the next free addresses and blocks.
pub fn nodes(n: usize) -> Vec<NodeSpec> {
    let mut out: Vec<NodeSpec> = SEED_NODES
        .iter()
        .take(n)
        .map(|(name, ip, block)| NodeSpec {
            name: (*name).to_string(),
            ip: Ipv4Addr::from(*ip),
            block: Ipv4Net::new(Ipv4Addr::from(*block), 24).unwrap_or_default(),
        })
        .collect();
    let pool: Ipv4Net = POOL.parse().unwrap_or_default();
    let mut blocks = pool.subnets(24).into_iter().flatten();
    let mut host = 10u8;
    while out.len() < n {
        let i = out.len() + 1;
        let ip = loop {
            let candidate = Ipv4Addr::new(10, 102, 123, host);
            host = host.saturating_add(1);
            if !out.iter().any(|s| s.ip == candidate) {
                break candidate;
            }
        };
        let Some(block) = blocks.find(|b| !out.iter().any(|s| s.block == *b)) else {
            break;
        };
        out.push(NodeSpec {
            name: format!("node{i}"),
            ip,
            block,
        });
    }
    out
}

/// Outside host namespace name.
pub fn host_netns(name: &str) -> String {
    format!("{NETNS_PREFIX}h-{name}")
}

/// Pod namespace name: short and unique per (namespace, pod), like containerd's `cni-<id>`.
pub fn pod_netns(namespace: &str, pod: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("{namespace}/{pod}").as_bytes());
    let hex: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{NETNS_PREFIX}p-{hex}")
}

/// The /24 gateway an outside host uses: the .1 of its /24, added to the switch's bridge.
pub fn host_gateway(ip: Ipv4Addr) -> (Ipv4Addr, Ipv4Net) {
    let net = Ipv4Net::new(ip, 24).map(|n| n.trunc()).unwrap_or_default();
    let o = net.network().octets();
    let mut gw = Ipv4Addr::new(o[0], o[1], o[2], 1);
    if gw == ip {
        gw = Ipv4Addr::new(o[0], o[1], o[2], 254);
    }
    (gw, net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_default_to_the_seed_cluster() {
        let n = nodes(3);
        assert_eq!(n[0].ip.to_string(), "10.102.123.117");
        assert_eq!(n[1].block.to_string(), "10.233.96.0/24");
        assert_eq!(n[2].name, "node3");
    }

    #[test]
    fn should_extend_with_free_addresses_and_blocks() {
        let n = nodes(5);
        assert_eq!(n.len(), 5);
        let mut blocks: Vec<_> = n.iter().map(|s| s.block).collect();
        blocks.dedup();
        assert_eq!(blocks.len(), 5);
        assert!(n[3].block.to_string().starts_with("10.233.64."));
    }

    #[test]
    fn should_name_pod_namespaces_uniquely_and_briefly() {
        assert_ne!(pod_netns("a", "b"), pod_netns("b", "a"));
        assert!(pod_netns("tekton-pipelines", "tekton-dashboard-xyz").len() < 32);
    }

    #[test]
    fn should_pick_a_gateway_that_is_not_the_host() {
        assert_eq!(host_gateway(Ipv4Addr::new(10, 2, 3, 4)).0, Ipv4Addr::new(10, 2, 3, 1));
        assert_eq!(host_gateway(Ipv4Addr::new(10, 2, 3, 1)).0, Ipv4Addr::new(10, 2, 3, 254));
    }
}
