//! Pure route computation: (this node, the Node list, the IPIP mode) → the routes warren owns.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use conf::daemon::IpipMode;
use ipnet::Ipv4Net;

/// What the daemon knows of a node from the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub internal_ip: Option<Ipv4Addr>,
    pub block: Option<Ipv4Net>,
}

/// A route warren wants in the main table, marked with `names::ROUTE_PROTO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DesiredRoute {
    pub dst: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Through tunl0 (`dev tunl0 onlink`) or directly over the underlay.
    pub tunnel: bool,
}

/// Peers' routes. `local_subnet` is the underlay subnet of this node's address (CrossSubnet uses
/// it to decide whether a peer is directly reachable). Peers without an address or a block, or
/// whose block overlaps ours, get no route; when two peers claim one block the first by name wins,
/// so every node decides the same way.
pub fn desired_routes(
    local: &str,
    local_block: Option<Ipv4Net>,
    local_subnet: Option<Ipv4Net>,
    nodes: &[NodeInfo],
    mode: IpipMode,
) -> BTreeMap<Ipv4Net, DesiredRoute> {
    let mut sorted: Vec<&NodeInfo> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out: BTreeMap<Ipv4Net, DesiredRoute> = BTreeMap::new();
    for n in sorted {
        if n.name == local {
            continue;
        }
        let (Some(ip), Some(block)) = (n.internal_ip, n.block) else {
            continue;
        };
        if local_block.is_some_and(|lb| lb.contains(&block) || block.contains(&lb)) {
            tracing::warn!(peer = %n.name, %block, "peer block overlaps this node's block; no route");
            continue;
        }
        if out.keys().any(|k| k.contains(&block) || block.contains(k)) {
            tracing::warn!(peer = %n.name, %block, "block already routed to another peer; no route");
            continue;
        }
        let tunnel = match mode {
            IpipMode::Always => true,
            IpipMode::Never => false,
            IpipMode::CrossSubnet => !local_subnet.is_some_and(|s| s.contains(&ip)),
        };
        out.insert(
            block,
            DesiredRoute {
                dst: block,
                gateway: ip,
                tunnel,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, block: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            internal_ip: Some(ip.parse().unwrap()),
            block: Some(block.parse().unwrap()),
        }
    }

    fn seed() -> Vec<NodeInfo> {
        vec![
            node("node1", "10.102.123.117", "10.233.90.0/24"),
            node("node2", "10.102.123.104", "10.233.96.0/24"),
            node("node3", "10.102.123.143", "10.233.92.0/24"),
        ]
    }

    #[test]
    fn should_route_every_peer_block_through_the_tunnel_in_always_mode() {
        let r = desired_routes(
            "node1",
            Some("10.233.90.0/24".parse().unwrap()),
            None,
            &seed(),
            IpipMode::Always,
        );
        assert_eq!(r.len(), 2);
        let n2 = r[&"10.233.96.0/24".parse().unwrap()];
        assert_eq!(n2.gateway, "10.102.123.104".parse::<Ipv4Addr>().unwrap());
        assert!(n2.tunnel);
        assert!(
            !r.contains_key(&"10.233.90.0/24".parse().unwrap()),
            "no route to our own block"
        );
    }

    #[test]
    fn should_route_directly_in_never_mode_and_by_subnet_in_cross_subnet() {
        let r = desired_routes("node1", None, None, &seed(), IpipMode::Never);
        assert!(r.values().all(|x| !x.tunnel));
        let mut nodes = seed();
        nodes.push(node("far", "192.168.7.9", "10.233.100.0/24"));
        let subnet = Some("10.102.123.0/24".parse().unwrap());
        let r = desired_routes("node1", None, subnet, &nodes, IpipMode::CrossSubnet);
        assert!(!r[&"10.233.96.0/24".parse().unwrap()].tunnel);
        assert!(r[&"10.233.100.0/24".parse().unwrap()].tunnel);
    }

    #[test]
    fn should_skip_incomplete_overlapping_and_duplicate_peers() {
        let mut nodes = seed();
        nodes.push(NodeInfo {
            name: "noip".into(),
            internal_ip: None,
            block: Some("10.233.70.0/24".parse().unwrap()),
        });
        nodes.push(node("aaa-dup", "10.0.0.9", "10.233.96.0/24"));
        nodes.push(node("mine", "10.0.0.8", "10.233.90.0/25"));
        let r = desired_routes(
            "node1",
            Some("10.233.90.0/24".parse().unwrap()),
            None,
            &nodes,
            IpipMode::Always,
        );
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[&"10.233.96.0/24".parse().unwrap()].gateway,
            "10.0.0.9".parse::<Ipv4Addr>().unwrap(),
            "first name wins a contested block"
        );
    }

    #[test]
    fn should_drop_the_route_of_a_removed_peer() {
        let mut nodes = seed();
        nodes.retain(|n| n.name != "node3");
        let r = desired_routes("node1", None, None, &nodes, IpipMode::Always);
        assert_eq!(
            r.keys().copied().collect::<Vec<_>>(),
            vec!["10.233.96.0/24".parse().unwrap()]
        );
    }
}
