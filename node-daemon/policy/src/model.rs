//! The normalized cluster model the compiler and the reference evaluator read: what Kubernetes
//! says, with defaults applied, and nothing about the kernel.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

pub use crate::labels::{LabelLookup, PackedLabels};

pub type Labels = BTreeMap<String, String>;

/// L4 protocols a NetworkPolicy port may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// Lower-case name as iptables and ipset spell it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }
}

/// A `containerPort` with a name, the target of named ports in policies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// Labels and ports are shared (`Arc`): a model kept from one pass to the next holds the same
/// allocation for a pod that did not change, and the compiler recognises it by pointer instead
/// of comparing 10 000 pods' labels on every pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Arc<PackedLabels>,
    /// None until the pod has an address; such a pod is in no set and matches no peer.
    pub ip: Option<Ipv4Addr>,
    pub node: String,
    pub ports: Arc<[NamedPort]>,
}

impl Pod {
    /// The number a named port resolves to on this pod, if the pod declares it for `protocol`.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

/// A label selector; the empty selector selects everything.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    pub fn everything() -> Selector {
        Selector::default()
    }

    pub fn labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Selector {
        Selector {
            match_labels: pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            match_expressions: vec![],
        }
    }

    pub fn with_expr(mut self, key: &str, operator: Operator, values: &[&str]) -> Selector {
        self.match_expressions.push(Requirement {
            key: key.to_string(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        });
        self
    }

    pub fn matches<L: LabelLookup + ?Sized>(&self, labels: &L) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.label(k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| {
                let got = labels.label(&r.key);
                let listed = |g: &str| r.values.iter().any(|v| v == g);
                match r.operator {
                    Operator::In => got.is_some_and(listed),
                    // Kubernetes: NotIn also matches objects that lack the key.
                    Operator::NotIn => got.is_none_or(|g| !listed(g)),
                    Operator::Exists => got.is_some(),
                    Operator::DoesNotExist => got.is_none(),
                }
            })
    }

    /// A canonical text used for hashing: equal selectors give equal text whatever the order of
    /// their expressions or values.
    pub fn canonical(&self) -> String {
        let mut exprs: Vec<String> = self
            .match_expressions
            .iter()
            .map(|r| {
                let mut v = r.values.clone();
                v.sort();
                v.dedup();
                format!("{}:{:?}:{}", r.key, r.operator, v.join("\u{1}"))
            })
            .collect();
        exprs.sort();
        exprs.dedup();
        let labels: Vec<String> = self.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("L[{}]E[{}]", labels.join("\u{2}"), exprs.join("\u{2}"))
    }
}

/// Who a rule lets in (ingress) or out to (egress).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Pods: `namespace` None means the policy's own namespace; `pods` None means every pod.
    /// Both given is the AND form of a single `from`/`to` entry.
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    IpBlock {
        cidr: Ipv4Net,
        except: Vec<Ipv4Net>,
    },
}

impl Peer {
    pub fn pods(sel: Selector) -> Peer {
        Peer::Pods {
            namespaces: None,
            pods: Some(sel),
        }
    }
    pub fn namespaces(sel: Selector) -> Peer {
        Peer::Pods {
            namespaces: Some(sel),
            pods: None,
        }
    }
    pub fn ip_block(cidr: &str, except: &[&str]) -> Peer {
        #[allow(clippy::unwrap_used)] // constructor for literals in tests and examples
        Peer::IpBlock {
            cidr: cidr.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortSpec {
    /// `port` alone, or `port..=end` with `endPort`.
    Number { port: u16, end: Option<u16> },
    /// A `containerPort` name, resolved on the destination pod.
    Named(String),
}

/// One entry of `ports`: protocol (TCP when omitted) and optional port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: Option<PortSpec>,
}

impl PortMatch {
    pub fn tcp(port: u16) -> PortMatch {
        PortMatch {
            protocol: Protocol::Tcp,
            port: Some(PortSpec::Number { port, end: None }),
        }
    }
}

/// One ingress or egress rule. Empty `peers` = every peer, empty `ports` = every port and
/// protocol (`from: []` and an absent `from` mean the same thing).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortMatch>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// `policyTypes` after the API's defaulting (see [`Policy::default_types`]).
    pub ingress_type: bool,
    pub egress_type: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl Policy {
    /// The API's default for an absent `policyTypes`: Ingress always, Egress when egress rules
    /// exist.
    pub fn default_types(egress_rules: usize) -> (bool, bool) {
        (true, egress_rules > 0)
    }

    pub fn id(&self) -> PolicyRef {
        PolicyRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    pub fn has_type(&self, d: Direction) -> bool {
        match d {
            Direction::Ingress => self.ingress_type,
            Direction::Egress => self.egress_type,
        }
    }

    pub fn rules(&self, d: Direction) -> &[Rule] {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Checks what the API server would refuse or warren cannot enforce. Policies built by
    /// [`crate::convert`] have passed this already; the compiler checks again for hand-built
    /// models.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |reason: String| PolicyError {
            policy: self.id(),
            reason,
        };
        for d in [Direction::Ingress, Direction::Egress] {
            for (i, r) in self.rules(d).iter().enumerate() {
                for p in &r.peers {
                    if let Peer::IpBlock { cidr, except } = p {
                        for e in except {
                            if !(cidr.contains(e) && e.prefix_len() > cidr.prefix_len()) {
                                return Err(bad(format!(
                                    "{} rule {i}: except {e} is not a strict subset of {cidr}",
                                    d.name()
                                )));
                            }
                        }
                    }
                }
                for pm in &r.ports {
                    match &pm.port {
                        Some(PortSpec::Number { port, end }) => {
                            if *port == 0 {
                                return Err(bad(format!("{} rule {i}: port 0", d.name())));
                            }
                            if let Some(e) = end {
                                if e < port {
                                    return Err(bad(format!("{} rule {i}: endPort {e} < port {port}", d.name())));
                                }
                            }
                        }
                        Some(PortSpec::Named(n)) if n.is_empty() || n.len() > 15 => {
                            return Err(bad(format!("{} rule {i}: bad port name {n:?}", d.name())));
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}

/// A policy's identity: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A policy that is reported and skipped; the others still compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NetworkPolicy {policy}: {reason}")]
pub struct PolicyError {
    pub policy: PolicyRef,
    pub reason: String,
}

/// The whole cluster as the policy compiler needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Model {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Shared so that a pass whose pods did not change hands the compiler the same allocation:
    /// it then skips its walk over every pod. Change it through `Arc::make_mut`, which never
    /// edits in place an allocation the compiler has seen.
    pub pods: Arc<Vec<Pod>>,
    /// Shared for the same reason as a pod's labels: an unchanged policy is the same allocation.
    pub policies: Vec<Arc<Policy>>,
}

impl Model {
    pub fn ns_labels(&self, ns: &str) -> Labels {
        self.namespaces.get(ns).map(|n| n.labels.clone()).unwrap_or_default()
    }

    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&Pod> {
        self.pods.iter().find(|p| p.ip == Some(ip))
    }

    /// Whether `peer`, written in a policy of namespace `policy_ns`, covers the pod.
    pub fn peer_selects_pod(&self, policy_ns: &str, peer: &Peer, pod: &Pod) -> bool {
        match peer {
            Peer::Pods { namespaces, pods } => {
                let ns_ok = match namespaces {
                    None => pod.namespace == policy_ns,
                    Some(s) => s.matches(&self.ns_labels(&pod.namespace)),
                };
                ns_ok && pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
            }
            Peer::IpBlock { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `s` selects `pairs`, asked of a namespace's map and of a pod's packed labels.
    fn m(s: &Selector, pairs: &[(&str, &str)]) -> bool {
        let map: Labels = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let packed = PackedLabels::new(pairs.iter().copied());
        assert_eq!(s.matches(&map), s.matches(&packed), "{s:?} on {pairs:?}");
        s.matches(&packed)
    }

    #[test]
    fn should_match_labels_and_expressions_as_kubernetes_does() {
        let any = Selector::everything();
        assert!(m(&any, &[]));
        let s = Selector::labels([("app", "web")]);
        assert!(m(&s, &[("app", "web"), ("x", "y")]));
        assert!(!m(&s, &[("app", "db")]));
        assert!(!m(&s, &[]));
        let inn = Selector::everything().with_expr("env", Operator::In, &["a", "b"]);
        assert!(m(&inn, &[("env", "b")]));
        assert!(!m(&inn, &[("env", "c")]));
        assert!(!m(&inn, &[]));
        let notin = Selector::everything().with_expr("env", Operator::NotIn, &["a"]);
        assert!(m(&notin, &[("env", "b")]));
        assert!(!m(&notin, &[("env", "a")]));
        assert!(m(&notin, &[]), "NotIn matches a missing key");
        let exists = Selector::everything().with_expr("env", Operator::Exists, &[]);
        assert!(m(&exists, &[("env", "")]));
        assert!(!m(&exists, &[]));
        let dne = Selector::everything().with_expr("env", Operator::DoesNotExist, &[]);
        assert!(m(&dne, &[]));
        assert!(!m(&dne, &[("env", "x")]));
        let both = Selector::labels([("app", "web")]).with_expr("env", Operator::In, &["a"]);
        assert!(m(&both, &[("app", "web"), ("env", "a")]));
        assert!(!m(&both, &[("app", "web")]));
    }

    #[test]
    fn should_give_equal_selectors_equal_canonical_text() {
        let a = Selector::everything()
            .with_expr("a", Operator::In, &["x", "y"])
            .with_expr("b", Operator::Exists, &[]);
        let b = Selector::everything()
            .with_expr("b", Operator::Exists, &[])
            .with_expr("a", Operator::In, &["y", "x"]);
        assert_eq!(a.canonical(), b.canonical());
        assert_ne!(a.canonical(), Selector::everything().canonical());
    }
}
