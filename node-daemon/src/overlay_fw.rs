//! The overlay's part of the packet filter, as a [`DesiredDataplane`] fragment the writer merges
//! with the policy compiler's: IPIP accepted only from cluster nodes, and natOutgoing.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use conf::daemon::IpipMode;
use conf::dataplane::{DesiredDataplane, Hook, IpSetSpec, Table};
use conf::names::TUNNEL_IFACE;
use ipnet::Ipv4Net;

pub const ALL_HOSTS_SET: &str = "warren-all-hosts";
pub const ALL_CIDRS_SET: &str = "warren-all-cidrs";
pub const INPUT_CHAIN: &str = "WARREN-INPUT";
pub const POSTROUTING_CHAIN: &str = "WARREN-POSTROUTING";

/// Inputs of the overlay firewall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayFw {
    pub node_ips: BTreeSet<Ipv4Addr>,
    pub pool: Ipv4Net,
    /// Every node's block (podCIDRs may lie outside the pool).
    pub blocks: BTreeSet<Ipv4Net>,
    pub local_block: Option<Ipv4Net>,
    pub nat_outgoing: bool,
    pub mode: IpipMode,
}

pub fn overlay_dataplane(o: &OverlayFw) -> DesiredDataplane {
    let mut d = DesiredDataplane::default();
    d.ipsets.insert(
        ALL_HOSTS_SET.into(),
        Arc::new(IpSetSpec {
            kind: "hash:ip".into(),
            members: o.node_ips.iter().map(|ip| ip.to_string()).collect(),
        }),
    );
    let mut cidrs: BTreeSet<String> = o.blocks.iter().map(|b| b.to_string()).collect();
    cidrs.insert(o.pool.to_string());
    cidrs.extend(o.node_ips.iter().map(|ip| format!("{ip}/32")));
    d.ipsets.insert(
        ALL_CIDRS_SET.into(),
        Arc::new(IpSetSpec {
            kind: "hash:net".into(),
            members: cidrs,
        }),
    );
    d.chains.insert(
        (Table::Filter, INPUT_CHAIN.into()),
        Arc::new(vec![
            format!("-p 4 -m set --match-set {ALL_HOSTS_SET} src -j ACCEPT"),
            "-p 4 -j DROP".into(),
        ]),
    );
    d.hooks.insert(Hook {
        table: Table::Filter,
        chain: "INPUT".into(),
        rule: format!("-j {INPUT_CHAIN}"),
        first: true,
    });

    let mut nat = Vec::new();
    if o.nat_outgoing {
        let mut sources = vec![o.pool];
        if let Some(b) = o.local_block.filter(|b| !o.pool.contains(b)) {
            sources.push(b);
        }
        for s in sources {
            nat.push(format!("-s {s} -m set ! --match-set {ALL_CIDRS_SET} dst -j MASQUERADE"));
        }
    }
    if o.mode != IpipMode::Never {
        // Host-originated packets routed into the tunnel carry the underlay address; peers' reply
        // would come back outside the tunnel, so they leave with tunl0's address instead.
        nat.push(format!(
            "-o {TUNNEL_IFACE} -m addrtype ! --src-type LOCAL --limit-iface-out -m addrtype --src-type LOCAL -j MASQUERADE"
        ));
    }
    d.chains.insert((Table::Nat, POSTROUTING_CHAIN.into()), Arc::new(nat));
    d.hooks.insert(Hook {
        table: Table::Nat,
        chain: "POSTROUTING".into(),
        rule: format!("-j {POSTROUTING_CHAIN}"),
        first: true,
    });
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fw() -> OverlayFw {
        OverlayFw {
            node_ips: ["10.102.123.117".parse().unwrap(), "10.102.123.104".parse().unwrap()].into(),
            pool: "10.233.64.0/18".parse().unwrap(),
            blocks: ["10.233.90.0/24".parse().unwrap()].into(),
            local_block: Some("10.233.90.0/24".parse().unwrap()),
            nat_outgoing: true,
            mode: IpipMode::Always,
        }
    }

    #[test]
    fn should_accept_ipip_only_from_cluster_nodes() {
        let d = overlay_dataplane(&fw());
        assert_eq!(d.ipsets[ALL_HOSTS_SET].members.len(), 2);
        let input = &d.chains[&(Table::Filter, INPUT_CHAIN.to_string())];
        assert_eq!(input[0], "-p 4 -m set --match-set warren-all-hosts src -j ACCEPT");
        assert_eq!(input[1], "-p 4 -j DROP");
        assert!(d
            .hooks
            .iter()
            .any(|h| h.chain == "INPUT" && h.rule == "-j WARREN-INPUT"));
    }

    #[test]
    fn should_masquerade_pool_traffic_leaving_the_cluster_unless_disabled() {
        let d = overlay_dataplane(&fw());
        let nat = &d.chains[&(Table::Nat, POSTROUTING_CHAIN.to_string())];
        assert_eq!(
            nat[0],
            "-s 10.233.64.0/18 -m set ! --match-set warren-all-cidrs dst -j MASQUERADE"
        );
        let cidrs = &d.ipsets[ALL_CIDRS_SET].members;
        assert!(cidrs.contains("10.233.64.0/18") && cidrs.contains("10.102.123.104/32"));
        let mut off = fw();
        off.nat_outgoing = false;
        off.mode = IpipMode::Never;
        assert!(overlay_dataplane(&off).chains[&(Table::Nat, POSTROUTING_CHAIN.to_string())].is_empty());
    }
}
