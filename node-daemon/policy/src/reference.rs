//! The Kubernetes semantics written down directly, with no chains and no sets: the oracle the
//! compiled rules are checked against.

use std::net::Ipv4Addr;

use crate::model::{Direction, Model, Peer, Pod, Policy, PolicyRef, PortSpec, Protocol, Rule};

/// The L4 part of a packet: a port-carrying protocol and destination port, or None for anything
/// else (ICMP echo…), which only port-less rules allow.
pub type L4 = Option<(Protocol, u16)>;

/// One end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Index into `model.pods`.
    Pod(usize),
    /// A node's own network namespace (kubelet, host-network processes).
    Host { node: String, ip: Ipv4Addr },
    /// Anything outside the cluster.
    External(Ipv4Addr),
}

impl Endpoint {
    pub fn ip(&self, model: &Model) -> Option<Ipv4Addr> {
        match self {
            Endpoint::Pod(i) => model.pods.get(*i).and_then(|p| p.ip),
            Endpoint::Host { ip, .. } | Endpoint::External(ip) => Some(*ip),
        }
    }
}

/// Which rule decided, for answers and explanations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: PolicyRef,
    pub direction: Direction,
    pub index: usize,
}

/// The verdict of one direction for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirDecision {
    pub allowed: bool,
    /// The first allowing rule (policies in namespace/name order); None when not isolated or denied.
    pub by: Option<RuleRef>,
    /// Policies of this direction selecting the pod; empty = not isolated.
    pub isolated_by: Vec<PolicyRef>,
}

fn valid_policies(model: &Model) -> Vec<&Policy> {
    let mut seen = std::collections::BTreeSet::new();
    let mut v: Vec<&Policy> = model
        .policies
        .iter()
        .map(|p| &**p)
        .filter(|p| seen.insert(p.id()))
        .filter(|p| p.validate().is_ok())
        .collect();
    // "The first allowing rule" is counted over policies in (namespace, name) order.
    v.sort_by_key(|p| p.id());
    v
}

fn peer_matches(model: &Model, policy_ns: &str, peer: &Peer, ip: Ipv4Addr) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip)),
        Peer::Pods { .. } => model
            .pods
            .iter()
            .any(|p| p.ip == Some(ip) && model.peer_selects_pod(policy_ns, peer, p)),
    }
}

/// `target` is the pod the packet goes to (named ports resolve on it), if any.
fn rule_matches(model: &Model, policy_ns: &str, rule: &Rule, peer_ip: Ipv4Addr, target: Option<&Pod>, l4: L4) -> bool {
    let peers_ok = rule.peers.is_empty() || rule.peers.iter().any(|p| peer_matches(model, policy_ns, p, peer_ip));
    let ports_ok = rule.ports.is_empty()
        || rule.ports.iter().any(|pm| match l4 {
            None => false,
            Some((proto, port)) => {
                pm.protocol == proto
                    && match &pm.port {
                        None => true,
                        Some(PortSpec::Number { port: lo, end }) => (*lo..=end.unwrap_or(*lo)).contains(&port),
                        Some(PortSpec::Named(n)) => target.and_then(|t| t.named_port(n, proto)) == Some(port),
                    }
            }
        });
    peers_ok && ports_ok
}

/// Does the `d`-direction policy of `pod` allow traffic with `peer_ip` at the other end?
pub fn direction_allows(model: &Model, pod: &Pod, d: Direction, peer_ip: Ipv4Addr, l4: L4) -> DirDecision {
    let mut out = DirDecision {
        allowed: true,
        by: None,
        isolated_by: vec![],
    };
    // Named ports resolve on the destination: the pod itself for ingress, the peer for egress.
    let target = match d {
        Direction::Ingress => Some(pod),
        Direction::Egress => model.pod_by_ip(peer_ip),
    };
    for pol in valid_policies(model) {
        if pol.namespace != pod.namespace || !pol.has_type(d) || !pol.pod_selector.matches(&pod.labels) {
            continue;
        }
        out.isolated_by.push(pol.id());
        if out.by.is_some() {
            continue;
        }
        for (i, r) in pol.rules(d).iter().enumerate() {
            if rule_matches(model, &pol.namespace, r, peer_ip, target, l4) {
                out.by = Some(RuleRef {
                    policy: pol.id(),
                    direction: d,
                    index: i,
                });
                break;
            }
        }
    }
    out.allowed = out.isolated_by.is_empty() || out.by.is_some();
    out
}

/// Whether a new connection from `src` to `dst` is allowed: the source's egress and the
/// destination's ingress must both allow it; a pod and its own node always reach each other.
pub fn allowed(model: &Model, src: &Endpoint, dst: &Endpoint, l4: L4) -> bool {
    let node_of = |e: &Endpoint| match e {
        Endpoint::Pod(i) => model.pods.get(*i).map(|p| p.node.clone()),
        _ => None,
    };
    let (Some(src_ip), Some(dst_ip)) = (src.ip(model), dst.ip(model)) else {
        return false;
    };
    match (src, dst) {
        (Endpoint::Host { node, .. }, d @ Endpoint::Pod(_)) if node_of(d).as_deref() == Some(node) => return true,
        (s @ Endpoint::Pod(_), Endpoint::Host { node, .. }) if node_of(s).as_deref() == Some(node) => return true,
        _ => {}
    }
    let egress = match src {
        Endpoint::Pod(i) => direction_allows(model, &model.pods[*i], Direction::Egress, dst_ip, l4).allowed,
        _ => true,
    };
    let ingress = match dst {
        Endpoint::Pod(i) => direction_allows(model, &model.pods[*i], Direction::Ingress, src_ip, l4).allowed,
        _ => true,
    };
    egress && ingress
}
