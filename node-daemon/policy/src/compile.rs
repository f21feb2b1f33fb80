//! The compiler: (model, this node's workloads) → warren's ipsets and filter-table chains.
//!
//! Layout (Calico's shape, warren's names):
//! - `FORWARD`/`INPUT`/`OUTPUT` each hold one jump to `WARREN-FORWARD`/`-INPUT`/`-OUTPUT`.
//! - `WARREN-FORWARD` clears the accept mark, dispatches `-i cali+` to `WARREN-FROM-WL-DISPATCH`
//!   and `-o cali+` to `WARREN-TO-WL-DISPATCH` (one goto per workload, then DROP: interfaces
//!   not programmed yet fail closed), and accepts what carries the accept mark afterwards.
//! - `WARREN-FW-<iface>` (egress of the pod) and `WARREN-TW-<iface>` (ingress): anti-spoofing and
//!   IPIP drop (FW only), conntrack, ICMP fragmentation-needed, then one jump to the policy group
//!   chain of the pod. Rules per pod are a constant, whatever the number of policies.
//! - `WARREN-GI-<hash>` / `WARREN-GE-<hash>`: one per distinct ordered set of policies selecting
//!   pods; jumps to each `WARREN-PI-<hash>` / `WARREN-PO-<hash>` and returns once accepted.
//! - Policy chains: one rule per (rule, peer, port), matching ipsets; rules per policy grow with
//!   that policy's rules only.
//! - `WARREN-INGRESS-BY-DST`: answers "does the ingress policy of the pod at this destination IP
//!   allow this packet?" on any node (sets the accept mark or not; not hooked by the compiler).
//!   Destination IPs are dispatched to group chains through one `hash:ip` set per group.
//! - `INPUT` from workloads: IPIP dropped, source must be the pod's own, otherwise allowed
//!   (pod → own node is always allowed). `OUTPUT` to workloads: allowed for programmed
//!   workloads (node → own pods, e.g. probes), dropped for unknown `cali*` interfaces.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use conf::dataplane::{DesiredDataplane, Hook, IpSetSpec, Table};
use conf::names::{CHAIN_PREFIX, IPSET_PREFIX};
use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use crate::model::{
    Direction, Labels, Model, Namespace, Peer, Pod, Policy, PolicyError, PolicyRef, PortSpec, Protocol, Selector,
};
use crate::rule::{Action, CtState, Match, Rule, SetDir};

/// Mark bit set by policy chains when a rule allowed the packet (Calico's accept bit).
pub const MARK_ACCEPT: u32 = 0x10000;

pub const CHAIN_FORWARD: &str = "WARREN-FORWARD";
pub const CHAIN_INPUT: &str = "WARREN-INPUT";
pub const CHAIN_OUTPUT: &str = "WARREN-OUTPUT";
pub const CHAIN_FROM_WL: &str = "WARREN-FROM-WL-DISPATCH";
pub const CHAIN_TO_WL: &str = "WARREN-TO-WL-DISPATCH";
pub const CHAIN_WL_TO_HOST: &str = "WARREN-WL-TO-HOST";
pub const CHAIN_HOST_TO_WL: &str = "WARREN-HOST-TO-WL";
pub const CHAIN_INGRESS_BY_DST: &str = "WARREN-INGRESS-BY-DST";
/// Service traffic this node forwards to a pod on another node, checked here (preserve-source).
pub const CHAIN_NODEPORT: &str = "WARREN-NODEPORT";
/// nat POSTROUTING: checked service traffic leaves with this node's NodePort source.
pub const CHAIN_NODEPORT_SNAT: &str = "WARREN-NODEPORT-SNAT";
/// Peers' NodePort sources: traffic from them through the tunnel was checked by the peer.
pub const SET_NODEPORT_PEERS: &str = "warren-np-peers";
/// Mark bit set on service traffic this node checked and will SNAT to its NodePort source.
pub const MARK_CHECKED: u32 = 0x20000;
/// kube-proxy's default masquerade mark (`--iptables-masquerade-bit=14`).
pub const KUBE_PROXY_MASQ_MARK: u32 = 0x4000;
/// Rules one workload adds to the node, whatever the number of policies: dispatch (2), host
/// (2), TW (9 when isolated), FW (9 when isolated).
pub const MAX_RULES_PER_WORKLOAD: usize = 22;
/// Longest chain name iptables accepts.
pub const MAX_CHAIN_LEN: usize = 28;
/// Longest ipset name the kernel accepts.
pub const MAX_IPSET_LEN: usize = 31;

/// ICMP destination-unreachable / fragmentation-needed (type 3, code 4): path MTU discovery.
const ICMP_FRAG_NEEDED: Match = Match::IcmpType { ty: 3, code: 4 };

/// A workload interface on this node, as the CNI plugin created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub pod: String,
    /// Host-side veth (`cali…`).
    pub iface: String,
    /// The address the CNI plugin assigned; the source every packet from the pod must carry.
    pub ip: Option<Ipv4Addr>,
}

/// What the compiler knows about the node it compiles for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCtx {
    pub node: String,
    /// Prefix of workload interfaces (`cali`); `<prefix>+` interfaces without a chain are dropped.
    pub veth_prefix: String,
    pub workloads: Vec<Workload>,
    /// `Some` when this node keeps NetworkPolicy's meaning for service traffic that kube-proxy
    /// forwards to other nodes with SNAT (issue 6's preserve-source; `None` is plain).
    pub nodeport: Option<NodePortCheck>,
}

/// Preserve-source: the node that receives service traffic (a NodePort, or an external client
/// of a ClusterIP) for a pod on another node checks that pod's ingress policy itself, against
/// the client's own address, before kube-proxy's masquerade hides it. What it lets through
/// leaves through the tunnel with `local_source` instead of tunl0's address; the peers trust
/// exactly those sources, arriving through the tunnel, as already checked. Sound because pods
/// cannot send with another address (anti-spoofing) and IPIP is accepted only from nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePortCheck {
    /// The tunnel device; only traffic through it is checked here or trusted there (routes
    /// that bypass the tunnel, in CrossSubnet/Never modes, keep the plain behaviour).
    pub tunnel_iface: String,
    /// This node's NodePort source: an address of its block that IPAM never hands out.
    pub local_source: Ipv4Addr,
    /// Every peer node's NodePort source.
    pub peer_sources: BTreeSet<Ipv4Addr>,
    /// The mark kube-proxy sets on connections it will masquerade.
    pub kube_masq_mark: u32,
}

impl NodeCtx {
    /// The node's workloads as the model sees them (pods scheduled on `node` that have an IP),
    /// with interface names from `conf::names::host_veth_name`.
    pub fn from_model(model: &Model, node: &str, veth_prefix: &str) -> Result<NodeCtx, conf::names::NameError> {
        let mut workloads = vec![];
        for p in model.pods.iter().filter(|p| p.node == node && p.ip.is_some()) {
            let key = conf::names::workload_key(Some(&p.namespace), Some(&p.name), "");
            workloads.push(Workload {
                namespace: p.namespace.clone(),
                pod: p.name.clone(),
                iface: conf::names::host_veth_name(veth_prefix, &key)?,
                ip: p.ip,
            });
        }
        Ok(NodeCtx {
            node: node.to_string(),
            veth_prefix: veth_prefix.to_string(),
            workloads,
            nodeport: None,
        })
    }

    pub fn with_nodeport(mut self, check: Option<NodePortCheck>) -> NodeCtx {
        self.nodeport = check;
        self
    }

    /// A context with no local workloads: enough for `WARREN-INGRESS-BY-DST` queries.
    pub fn empty(node: &str) -> NodeCtx {
        NodeCtx {
            node: node.to_string(),
            veth_prefix: conf::names::HOST_VETH_PREFIX.to_string(),
            workloads: vec![],
            nodeport: None,
        }
    }
}

/// Sizes for the scale table and for tests that check growth.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub chains: usize,
    pub rules: usize,
    /// Rules in chains that exist per local workload (dispatch, TW, FW, host rules).
    pub workload_rules: usize,
    /// The most rules any one local workload has; bounded by [`MAX_RULES_PER_WORKLOAD`].
    pub max_workload_rules: usize,
    pub policy_rules: usize,
    pub group_rules: usize,
    pub ipsets: usize,
    pub ipset_members: usize,
    pub local_workloads: usize,
}

/// The compiler's output.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    pub dataplane: DesiredDataplane,
    /// Policies reported and skipped; everything else is enforced.
    pub errors: Vec<PolicyError>,
    /// Policy chain name → the policy and direction it implements.
    pub policy_chains: BTreeMap<String, (PolicyRef, Direction)>,
    pub stats: Stats,
}

fn hex_hash(s: &str, n: usize) -> String {
    let d = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(64);
    for b in d {
        out.push_str(&format!("{b:02x}"));
    }
    out.truncate(n);
    out
}

/// `WARREN-<kind>-<hash>`, always ≤ 28 characters.
fn chain_name(kind: &str, identity: &str) -> String {
    let base = format!("{CHAIN_PREFIX}{kind}-");
    let h = hex_hash(identity, MAX_CHAIN_LEN.saturating_sub(base.len()).min(16));
    format!("{base}{h}")
}

/// `warren-<kind>-<hash>`, always ≤ 31 characters.
fn set_name(kind: &str, identity: &str) -> String {
    let base = format!("{IPSET_PREFIX}{kind}-");
    let h = hex_hash(identity, MAX_IPSET_LEN.saturating_sub(base.len()).min(20));
    format!("{base}{h}")
}

pub fn policy_chain_name(p: &PolicyRef, d: Direction) -> String {
    let kind = match d {
        Direction::Ingress => "PI",
        Direction::Egress => "PO",
    };
    chain_name(kind, &format!("{}/{}", p.namespace, p.name))
}

pub fn workload_chain_name(iface: &str, d: Direction) -> String {
    let kind = match d {
        Direction::Ingress => "TW",
        Direction::Egress => "FW",
    };
    let name = format!("{CHAIN_PREFIX}{kind}-{iface}");
    if name.len() <= MAX_CHAIN_LEN {
        name
    } else {
        chain_name(kind, iface)
    }
}

/// The comment a policy rule carries; [`parse_rule_comment`] reads it back.
pub fn rule_comment(p: &PolicyRef, d: Direction, index: usize) -> String {
    format!("{}/{} {} {index}", p.namespace, p.name, d.name())
}

/// (policy, direction, rule index) from a policy rule's comment.
pub fn parse_rule_comment(c: &str) -> Option<(PolicyRef, Direction, usize)> {
    let mut it = c.split(' ');
    let (ns, name) = it.next()?.split_once('/')?;
    let d = match it.next()? {
        "ingress" => Direction::Ingress,
        "egress" => Direction::Egress,
        _ => return None,
    };
    let i = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((
        PolicyRef {
            namespace: ns.to_string(),
            name: name.to_string(),
        },
        d,
        i,
    ))
}

fn host(ip: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::from(ip)
}

/// An ipset member in the form `ipset list` prints it back (bare address for /32).
fn net_member(n: &Ipv4Net) -> String {
    if n.prefix_len() == 32 {
        n.addr().to_string()
    } else {
        n.trunc().to_string()
    }
}

fn mark_is_accept() -> Match {
    Match::Mark {
        value: MARK_ACCEPT,
        mask: MARK_ACCEPT,
        negate: false,
    }
}

fn set_accept() -> Action {
    Action::SetMark {
        value: MARK_ACCEPT,
        mask: MARK_ACCEPT,
    }
}

fn clear_accept() -> Action {
    Action::SetMark {
        value: 0,
        mask: MARK_ACCEPT,
    }
}

/// What an ipset holds, as a function of the cluster (its name is a function of this alone).
#[derive(Debug, Clone, PartialEq, Eq)]
enum SetDef {
    /// Pods with an address that a `podSelector`/`namespaceSelector` peer covers.
    Pods {
        policy_ns: String,
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    /// An ipBlock: fixed members (`nomatch` entries for `except`).
    Block(BTreeSet<String>),
    /// Every pod's (address, protocol:number) for a port name.
    NamedPort { name: String, proto: Protocol },
    /// The addresses of the pods of one ingress group (`WARREN-INGRESS-BY-DST`).
    Destinations,
}

impl SetDef {
    fn kind(&self) -> &'static str {
        match self {
            SetDef::NamedPort { .. } => "hash:ip,port",
            SetDef::Destinations => "hash:ip",
            _ => "hash:net",
        }
    }

    /// The member `pod` contributes, if any; `ns_labels` are the labels of the pod's namespace.
    fn member(&self, pod: &Pod, ns_labels: &Labels) -> Option<String> {
        let ip = pod.ip?;
        match self {
            SetDef::Pods {
                policy_ns,
                namespaces,
                pods,
            } => {
                let ns_ok = match namespaces {
                    None => pod.namespace == *policy_ns,
                    Some(s) => s.matches(ns_labels),
                };
                (ns_ok && pods.as_ref().is_none_or(|s| s.matches(&pod.labels))).then(|| ip.to_string())
            }
            SetDef::Block(_) | SetDef::Destinations => None,
            SetDef::NamedPort { name, proto } => pod
                .named_port(name, *proto)
                .map(|port| format!("{ip},{}:{port}", proto.name())),
        }
    }

    fn depends_on_namespace_labels(&self) -> bool {
        matches!(
            self,
            SetDef::Pods {
                namespaces: Some(_),
                ..
            }
        )
    }
}

/// The set a peer of a policy in `policy_ns` matches against: its name and definition.
fn peer_set(policy_ns: &str, peer: &Peer) -> (String, SetDef) {
    match peer {
        Peer::Pods { namespaces, pods } => {
            let key = format!(
                "pods|{}|{}",
                match namespaces {
                    None => format!("ns={policy_ns}"),
                    Some(s) => format!("nsel={}", s.canonical()),
                },
                pods.as_ref().map(|s| s.canonical()).unwrap_or_else(|| "all".into())
            );
            // A namespaceSelector peer covers the same pods whatever the policy's namespace.
            let def = SetDef::Pods {
                policy_ns: if namespaces.is_some() {
                    String::new()
                } else {
                    policy_ns.to_string()
                },
                namespaces: namespaces.clone(),
                pods: pods.clone(),
            };
            (set_name("s", &key), def)
        }
        Peer::IpBlock { cidr, except } => {
            let mut e: Vec<String> = except.iter().map(|e| e.trunc().to_string()).collect();
            e.sort();
            e.dedup();
            let key = format!("net|{}|{}", cidr.trunc(), e.join(","));
            let mut members = BTreeSet::new();
            // hash:net cannot hold /0: two halves cover the same addresses.
            if cidr.prefix_len() == 0 {
                for half in ["0.0.0.0/1", "128.0.0.0/1"] {
                    members.insert(half.to_string());
                }
            } else {
                members.insert(net_member(cidr));
            }
            for e in except {
                members.insert(format!("{} nomatch", net_member(e)));
            }
            (set_name("b", &key), SetDef::Block(members))
        }
    }
}

/// `hash:ip,port` set of every pod's (IP, protocol:number) for a port name, cluster-wide:
/// matched with `dst,dst`, it resolves the name on whichever pod the packet goes to.
fn named_port_set(name: &str, proto: Protocol) -> (String, SetDef) {
    let key = format!("np|{}|{name}", proto.name());
    (
        set_name("n", &key),
        SetDef::NamedPort {
            name: name.to_string(),
            proto,
        },
    )
}

type PodKey = (String, String);

fn pod_key(p: &Pod) -> PodKey {
    (p.namespace.clone(), p.name.clone())
}

/// A group chain, with its line in `WARREN-INGRESS-BY-DST` (ingress groups).
#[derive(Debug)]
struct GroupChain {
    name: String,
    rules: Arc<Vec<String>>,
    dst_set: String,
    dst_rule: String,
}

/// A compiled policy chain.
#[derive(Debug)]
struct PolicyChain {
    name: String,
    rules: Arc<Vec<String>>,
    sets: Vec<(String, SetDef)>,
}

/// An ipset kept up to date by the pods that come, go and change.
#[derive(Debug)]
struct SetState {
    def: SetDef,
    /// Member → how many pods contribute it (two pods may share an address for a moment).
    members: BTreeMap<String, u32>,
    built: Option<Arc<IpSetSpec>>,
}

impl SetState {
    fn add(&mut self, m: String) {
        *self.members.entry(m).or_insert(0) += 1;
        self.built = None;
    }

    fn remove(&mut self, m: &str) {
        if let Some(n) = self.members.get_mut(m) {
            *n -= 1;
            if *n == 0 {
                self.members.remove(m);
            }
            self.built = None;
        }
    }

    fn spec(&mut self) -> Arc<IpSetSpec> {
        let kind = self.def.kind();
        let members = &self.members;
        self.built
            .get_or_insert_with(|| {
                let members = match &self.def {
                    SetDef::Block(fixed) => fixed.clone(),
                    _ => members.keys().cloned().collect(),
                };
                Arc::new(IpSetSpec {
                    kind: kind.into(),
                    members,
                })
            })
            .clone()
    }
}

/// A workload's inputs and its rendered TW and FW chains.
type WorkloadChains = (WorkloadInput, Arc<Vec<String>>, Arc<Vec<String>>);

/// A local workload: itself, whether its pod is in the model, its address, its groups.
type LocalWorkload<'a> = (&'a Workload, bool, Option<Ipv4Addr>, [Vec<PolicyRef>; 2]);

/// A local workload's chains, kept while what they are built from is unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WorkloadInput {
    workload: Workload,
    in_model: bool,
    ip: Option<Ipv4Addr>,
    groups: [Option<String>; 2],
    nodeport: Option<NodePortCheck>,
}

/// The incremental compiler: the same output as compiling from scratch, at the cost of what
/// changed since the previous call. It keeps which policies select each pod, each group's
/// members, each set's members (updated per pod that came, went or changed) and every rendered
/// chain; a part that did not change is handed out as the same `Arc`, which the writer skips by
/// pointer. A policy edit then costs that policy's pods and sets, a pod event that pod's
/// memberships, whatever the size of the cluster (issue 5: one change programmed in < 30 ms at
/// 10 000 pods). `compile()` is one call on a new compiler, so both paths are one code.
#[derive(Debug, Default)]
pub struct Compiler {
    namespaces: BTreeMap<String, Namespace>,
    /// The pods as last given, in the caller's order.
    last_pods: Vec<Pod>,
    pods: HashMap<PodKey, Pod>,
    pods_by_ns: HashMap<String, BTreeSet<PodKey>>,
    policies: BTreeMap<PolicyRef, Policy>,
    policies_by_ns: HashMap<String, BTreeSet<PolicyRef>>,
    /// Per pod, the valid policies that select it, per direction (ingress, egress).
    selecting: HashMap<PodKey, [BTreeSet<PolicyRef>; 2]>,
    /// Per pod with an address and ingress policies: its address and ingress group.
    dst_group: HashMap<PodKey, (Ipv4Addr, Vec<PolicyRef>)>,
    /// Ingress group → addresses of its pods (`WARREN-INGRESS-BY-DST`'s sets).
    dst_members: HashMap<Vec<PolicyRef>, SetState>,
    /// Per direction (ingress, egress): ordered policy list → its group chain.
    group_chains: [HashMap<Vec<PolicyRef>, GroupChain>; 2],
    /// Per direction: policy → its chain, while the policy is unchanged.
    policy_chains: [HashMap<PolicyRef, PolicyChain>; 2],
    sets: HashMap<String, SetState>,
    workloads: HashMap<String, WorkloadChains>,
    /// The previous output's small chains, reused when rendered the same.
    frame: HashMap<(Table, String), Arc<Vec<String>>>,
}

fn selecting_of(
    pod: &Pod,
    policies: &BTreeMap<PolicyRef, Policy>,
    ids: Option<&BTreeSet<PolicyRef>>,
) -> [BTreeSet<PolicyRef>; 2] {
    let mut out: [BTreeSet<PolicyRef>; 2] = Default::default();
    for id in ids.into_iter().flatten() {
        if let Some(pol) = policies.get(id) {
            if pol.pod_selector.matches(&pod.labels) {
                if pol.ingress_type {
                    out[0].insert(id.clone());
                }
                if pol.egress_type {
                    out[1].insert(id.clone());
                }
            }
        }
    }
    out
}

impl Compiler {
    pub fn new() -> Compiler {
        Compiler::default()
    }

    fn ns_labels<'a>(namespaces: &'a BTreeMap<String, Namespace>, ns: &str) -> &'a Labels {
        static EMPTY: std::sync::OnceLock<Labels> = std::sync::OnceLock::new();
        namespaces
            .get(ns)
            .map(|n| &n.labels)
            .unwrap_or_else(|| EMPTY.get_or_init(Labels::new))
    }

    /// Compiles `model` for `node`: equal to [`compile`] of the same inputs.
    pub fn compile(&mut self, model: &Model, node: &NodeCtx) -> Compiled {
        let mut out = Compiled::default();

        // Valid policies only; a bad one is reported and the rest still compile.
        let mut valid: BTreeMap<PolicyRef, &Policy> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for p in &model.policies {
            let id = p.id();
            if !seen.insert(id.clone()) {
                out.errors.push(PolicyError {
                    policy: id,
                    reason: "defined twice; the first definition is enforced".into(),
                });
                continue;
            }
            match p.validate() {
                Ok(()) => {
                    valid.insert(id, p);
                }
                Err(e) => out.errors.push(e),
            }
        }

        // What changed since the previous call.
        let changed_ns: BTreeSet<String> = self
            .namespaces
            .keys()
            .chain(model.namespaces.keys())
            .filter(|n| self.namespaces.get(*n).map(|x| &x.labels) != model.namespaces.get(*n).map(|x| &x.labels))
            .cloned()
            .collect();
        // Most events change no pod (policy edits, namespaces, node heartbeats): one pass over
        // the list in the caller's order settles that without hashing 10 000 keys.
        let mut new_pods: HashMap<PodKey, &Pod> = HashMap::new();
        let mut changed_pods: Vec<(PodKey, Option<Pod>)> = vec![];
        if model.pods != self.last_pods {
            new_pods = model.pods.iter().map(|p| (pod_key(p), p)).collect();
            for (k, p) in &new_pods {
                if self.pods.get(k) != Some(*p) {
                    changed_pods.push((k.clone(), self.pods.get(k).cloned()));
                }
            }
            for (k, p) in &self.pods {
                if !new_pods.contains_key(k) {
                    changed_pods.push((k.clone(), Some(p.clone())));
                }
            }
            self.last_pods = model.pods.clone();
        }
        let mut changed_pols: Vec<PolicyRef> = vec![];
        for (id, p) in &valid {
            if self.policies.get(id) != Some(*p) {
                changed_pols.push(id.clone());
            }
        }
        for id in self.policies.keys() {
            if !valid.contains_key(id) {
                changed_pols.push(id.clone());
            }
        }

        // Inputs → state.
        for id in &changed_pols {
            match valid.get(id) {
                Some(p) => {
                    self.policies.insert(id.clone(), (*p).clone());
                    self.policies_by_ns
                        .entry(id.namespace.clone())
                        .or_default()
                        .insert(id.clone());
                }
                None => {
                    self.policies.remove(id);
                    if let Some(s) = self.policies_by_ns.get_mut(&id.namespace) {
                        s.remove(id);
                    }
                }
            }
        }
        for (k, _) in &changed_pods {
            match new_pods.get(k) {
                Some(p) => {
                    self.pods.insert(k.clone(), (*p).clone());
                    self.pods_by_ns.entry(k.0.clone()).or_default().insert(k.clone());
                }
                None => {
                    self.pods.remove(k);
                    if let Some(s) = self.pods_by_ns.get_mut(&k.0) {
                        s.remove(k);
                    }
                }
            }
        }
        let old_namespaces = std::mem::replace(&mut self.namespaces, model.namespaces.clone());

        // Which policies select which pods: changed pods from scratch, then every pod of a
        // changed policy's namespace for that policy.
        let mut touched: BTreeSet<PodKey> = BTreeSet::new();
        for (k, _) in &changed_pods {
            touched.insert(k.clone());
            match self.pods.get(k) {
                Some(p) => {
                    let sel = selecting_of(p, &self.policies, self.policies_by_ns.get(&k.0));
                    self.selecting.insert(k.clone(), sel);
                }
                None => {
                    self.selecting.remove(k);
                }
            }
        }
        let changed_pod_keys: BTreeSet<&PodKey> = changed_pods.iter().map(|(k, _)| k).collect();
        for id in &changed_pols {
            let pol = self.policies.get(id);
            for k in self.pods_by_ns.get(&id.namespace).into_iter().flatten() {
                if changed_pod_keys.contains(k) {
                    continue;
                }
                let Some(p) = self.pods.get(k) else { continue };
                let sel = self.selecting.entry(k.clone()).or_default();
                let before = sel.clone();
                sel[0].remove(id);
                sel[1].remove(id);
                if let Some(pol) = pol.filter(|pol| pol.pod_selector.matches(&p.labels)) {
                    if pol.ingress_type {
                        sel[0].insert(id.clone());
                    }
                    if pol.egress_type {
                        sel[1].insert(id.clone());
                    }
                }
                if *sel != before {
                    touched.insert(k.clone());
                }
            }
        }

        // Ingress groups by destination address, for every pod in the cluster.
        for k in &touched {
            let now = match (self.pods.get(k), self.selecting.get(k)) {
                (Some(p), Some(sel)) if !sel[0].is_empty() => {
                    p.ip.map(|ip| (ip, sel[0].iter().cloned().collect::<Vec<_>>()))
                }
                _ => None,
            };
            if self.dst_group.get(k) == now.as_ref() {
                continue;
            }
            if let Some((ip, g)) = self.dst_group.remove(k) {
                if let Some(s) = self.dst_members.get_mut(&g) {
                    s.remove(&ip.to_string());
                    if s.members.is_empty() {
                        self.dst_members.remove(&g);
                    }
                }
            }
            if let Some((ip, g)) = now {
                self.dst_members
                    .entry(g.clone())
                    .or_insert_with(|| SetState {
                        def: SetDef::Destinations,
                        members: BTreeMap::new(),
                        built: None,
                    })
                    .add(ip.to_string());
                self.dst_group.insert(k.clone(), (ip, g));
            }
        }

        // Local workloads and their groups.
        let mut workloads: Vec<&Workload> = node.workloads.iter().collect();
        workloads.sort_by(|a, b| a.iface.cmp(&b.iface));
        workloads.dedup_by(|a, b| a.iface == b.iface);
        let mut local: Vec<LocalWorkload> = vec![];
        for w in &workloads {
            let k = (w.namespace.clone(), w.pod.clone());
            let pod = self.pods.get(&k);
            let groups = match self.selecting.get(&k) {
                Some(sel) if pod.is_some() => [
                    sel[0].iter().cloned().collect::<Vec<_>>(),
                    sel[1].iter().cloned().collect::<Vec<_>>(),
                ],
                _ => Default::default(),
            };
            local.push((w, pod.is_some(), w.ip.or(pod.and_then(|p| p.ip)), groups));
        }

        // Groups in use → their chains → the policy chains they jump to → the sets those use.
        // Borrowed, not cloned: at 10 000 pods this runs over ~1 000 groups on every event.
        let mut used_groups: [HashSet<&[PolicyRef]>; 2] = Default::default();
        used_groups[0].extend(self.dst_members.keys().map(Vec::as_slice));
        for (_, in_model, _, groups) in &local {
            if !in_model {
                continue;
            }
            for (i, g) in groups.iter().enumerate() {
                if !g.is_empty() {
                    used_groups[i].insert(g.as_slice());
                }
            }
        }
        let mut used_policies: [HashSet<&PolicyRef>; 2] = Default::default();
        for (i, d) in [(0, Direction::Ingress), (1, Direction::Egress)] {
            self.group_chains[i].retain(|g, _| used_groups[i].contains(g.as_slice()));
            for g in &used_groups[i] {
                if !self.group_chains[i].contains_key(*g) {
                    let (name, rules) = group_chain(d, g);
                    let dst_set = set_name("gd", &name);
                    let dst_rule = Rule::new(
                        vec![Match::Set {
                            name: dst_set.clone(),
                            dir: SetDir::Dst,
                            negate: false,
                        }],
                        Action::Goto(name.clone()),
                    )
                    .render();
                    self.group_chains[i].insert(
                        g.to_vec(),
                        GroupChain {
                            name,
                            rules: Arc::new(rules.iter().map(Rule::render).collect()),
                            dst_set,
                            dst_rule,
                        },
                    );
                }
                used_policies[i].extend(g.iter());
            }
        }
        let changed_pol_set: HashSet<&PolicyRef> = changed_pols.iter().collect();
        let mut used_sets: HashMap<&str, &SetDef> = HashMap::new();
        for (i, d) in [(0, Direction::Ingress), (1, Direction::Egress)] {
            self.policy_chains[i].retain(|id, _| used_policies[i].contains(id) && !changed_pol_set.contains(id));
            for id in &used_policies[i] {
                if self.policy_chains[i].contains_key(*id) {
                    continue;
                }
                let Some(pol) = self.policies.get(*id) else { continue };
                let mut sets = vec![];
                let rules = policy_rules(pol, d, &mut |name, def| sets.push((name, def)));
                self.policy_chains[i].insert(
                    (*id).clone(),
                    PolicyChain {
                        name: policy_chain_name(id, d),
                        rules: Arc::new(rules.iter().map(Rule::render).collect()),
                        sets,
                    },
                );
            }
        }
        for pc in self.policy_chains.iter().flat_map(|m| m.values()) {
            for (name, def) in &pc.sets {
                used_sets.insert(name, def);
            }
        }

        // Sets: new ones filled from scratch, kept ones updated by the pods that changed (all
        // of a namespace-selector set when namespace labels changed). A set's name is a hash of
        // its definition, so the name alone tells whether a kept set is still wanted.
        self.sets.retain(|name, _| used_sets.contains_key(name.as_str()));
        for (name, def) in used_sets {
            let fresh = !self.sets.contains_key(name) || (!changed_ns.is_empty() && def.depends_on_namespace_labels());
            if fresh {
                let mut st = SetState {
                    def: def.clone(),
                    members: BTreeMap::new(),
                    built: None,
                };
                // Only the namespaces the set can cover are walked.
                let namespaces: Vec<&String> = match &st.def {
                    SetDef::Block(_) | SetDef::Destinations => vec![],
                    SetDef::Pods {
                        namespaces: None,
                        policy_ns,
                        ..
                    } => self
                        .pods_by_ns
                        .get_key_value(policy_ns)
                        .map(|(k, _)| k)
                        .into_iter()
                        .collect(),
                    SetDef::Pods {
                        namespaces: Some(sel), ..
                    } => self
                        .pods_by_ns
                        .keys()
                        .filter(|ns| sel.matches(Self::ns_labels(&self.namespaces, ns)))
                        .collect(),
                    SetDef::NamedPort { .. } => self.pods_by_ns.keys().collect(),
                };
                for ns in namespaces {
                    let labels = Self::ns_labels(&self.namespaces, ns);
                    for k in self.pods_by_ns.get(ns).into_iter().flatten() {
                        if let Some(m) = self.pods.get(k).and_then(|p| st.def.member(p, labels)) {
                            st.add(m);
                        }
                    }
                }
                self.sets.insert(name.to_string(), st);
                continue;
            }
            let Some(st) = self.sets.get_mut(name) else { continue };
            if matches!(st.def, SetDef::Block(_)) {
                continue;
            }
            for (k, old) in &changed_pods {
                if let Some(m) = old
                    .as_ref()
                    .and_then(|p| st.def.member(p, Self::ns_labels(&old_namespaces, &p.namespace)))
                {
                    st.remove(&m);
                }
                if let Some(m) = self
                    .pods
                    .get(k)
                    .and_then(|p| st.def.member(p, Self::ns_labels(&self.namespaces, &p.namespace)))
                {
                    st.add(m);
                }
            }
        }

        // Output.
        let mut chains: BTreeMap<String, Arc<Vec<String>>> = BTreeMap::new();
        for (i, d) in [(0, Direction::Ingress), (1, Direction::Egress)] {
            for (id, pc) in &self.policy_chains[i] {
                out.stats.policy_rules += pc.rules.len();
                chains.insert(pc.name.clone(), pc.rules.clone());
                out.policy_chains.insert(pc.name.clone(), (id.clone(), d));
            }
            for gc in self.group_chains[i].values() {
                out.stats.group_rules += gc.rules.len();
                chains.insert(gc.name.clone(), gc.rules.clone());
            }
        }
        let mut sets: BTreeMap<String, Arc<IpSetSpec>> = BTreeMap::new();
        for (name, st) in &mut self.sets {
            sets.insert(name.clone(), st.spec());
        }

        // Ingress by destination IP: one set and one goto per ingress group.
        let mut targets: Vec<(&str, &str)> = vec![];
        for (g, st) in &mut self.dst_members {
            if let Some(gc) = self.group_chains[0].get(g) {
                sets.insert(gc.dst_set.clone(), st.spec());
                targets.push((&gc.name, &gc.dst_rule));
            }
        }
        targets.sort_unstable();
        let mut by_dst = vec![Rule::new(vec![], clear_accept()).render()];
        by_dst.extend(targets.into_iter().map(|(_, r)| r.to_string()));
        by_dst.push(
            Rule::new(vec![], set_accept())
                .commented("destination not isolated for ingress")
                .render(),
        );
        let mut frame: BTreeMap<String, Vec<Rule>> = BTreeMap::new();

        // Per-workload chains.
        let wild = format!("{}+", node.veth_prefix);
        let mut from_dispatch = vec![];
        let mut to_dispatch = vec![];
        let mut wl_to_host = vec![Rule::new(vec![Match::Proto(4)], Action::Drop).commented("IPIP from workloads")];
        let mut host_to_wl = vec![];
        let mut workload_rules = 0;
        let mut seen_ifaces = BTreeSet::new();
        for (w, in_model, ip, groups) in &local {
            let tw = workload_chain_name(&w.iface, Direction::Ingress);
            let fw = workload_chain_name(&w.iface, Direction::Egress);
            from_dispatch.push(Rule::new(
                vec![Match::InIface {
                    name: w.iface.clone(),
                    negate: false,
                }],
                Action::Goto(fw.clone()),
            ));
            to_dispatch.push(Rule::new(
                vec![Match::OutIface {
                    name: w.iface.clone(),
                    negate: false,
                }],
                Action::Goto(tw.clone()),
            ));
            if let Some(ip) = ip {
                wl_to_host.push(Rule::new(
                    vec![
                        Match::InIface {
                            name: w.iface.clone(),
                            negate: false,
                        },
                        Match::Src {
                            net: host(*ip),
                            negate: false,
                        },
                    ],
                    Action::Return,
                ));
            }
            host_to_wl.push(Rule::new(
                vec![Match::OutIface {
                    name: w.iface.clone(),
                    negate: false,
                }],
                Action::Return,
            ));
            let group_name = |d: Direction, g: &Vec<PolicyRef>| {
                (!g.is_empty())
                    .then(|| {
                        self.group_chains[usize::from(d == Direction::Egress)]
                            .get(g)
                            .map(|gc| gc.name.clone())
                    })
                    .flatten()
            };
            let input = WorkloadInput {
                workload: (*w).clone(),
                in_model: *in_model,
                ip: *ip,
                groups: [
                    group_name(Direction::Ingress, &groups[0]),
                    group_name(Direction::Egress, &groups[1]),
                ],
                nodeport: node.nodeport.clone(),
            };
            let reuse = self.workloads.get(&w.iface).filter(|(i, _, _)| *i == input);
            let (tw_rules, fw_rules) = match reuse {
                Some((_, t, f)) => (t.clone(), f.clone()),
                None => {
                    let (t, f) = workload_rules_of(&input);
                    let t = Arc::new(t.iter().map(Rule::render).collect::<Vec<_>>());
                    let f = Arc::new(f.iter().map(Rule::render).collect::<Vec<_>>());
                    self.workloads.insert(w.iface.clone(), (input, t.clone(), f.clone()));
                    (t, f)
                }
            };
            // + one rule each in the two dispatch chains, WL-TO-HOST and HOST-TO-WL.
            let this = tw_rules.len() + fw_rules.len() + 4;
            workload_rules += this;
            out.stats.max_workload_rules = out.stats.max_workload_rules.max(this);
            chains.insert(tw, tw_rules);
            chains.insert(fw, fw_rules);
            seen_ifaces.insert(w.iface.clone());
            out.stats.local_workloads += 1;
        }
        self.workloads.retain(|iface, _| seen_ifaces.contains(iface));
        let unknown = |what: &str| Rule::new(vec![], Action::Drop).commented(format!("unknown {what}"));
        from_dispatch.push(unknown("workload interface"));
        to_dispatch.push(unknown("workload interface"));
        wl_to_host.push(unknown("workload interface or spoofed source"));
        host_to_wl.push(unknown("workload interface"));
        out.stats.workload_rules = workload_rules;
        frame.insert(CHAIN_FROM_WL.into(), from_dispatch);
        frame.insert(CHAIN_TO_WL.into(), to_dispatch);
        frame.insert(CHAIN_WL_TO_HOST.into(), wl_to_host);
        frame.insert(CHAIN_HOST_TO_WL.into(), host_to_wl);

        let mut nat: BTreeMap<String, Vec<String>> = BTreeMap::new();
        frame_chains(node, &wild, &mut frame, &mut sets, &mut nat, &mut out.dataplane.hooks);

        let mut kept = HashMap::new();
        let mut keep = |table: Table, name: String, rendered: Vec<String>| -> Arc<Vec<String>> {
            let key = (table, name);
            let arc = match self.frame.get(&key) {
                Some(prev) if **prev == rendered => prev.clone(),
                _ => Arc::new(rendered),
            };
            kept.insert(key, arc.clone());
            arc
        };
        for (name, rules) in frame {
            let rendered = rules.iter().map(Rule::render).collect();
            let arc = keep(Table::Filter, name.clone(), rendered);
            chains.insert(name, arc);
        }
        let arc = keep(Table::Filter, CHAIN_INGRESS_BY_DST.into(), by_dst);
        chains.insert(CHAIN_INGRESS_BY_DST.into(), arc);
        for (name, rules) in nat {
            let arc = keep(Table::Nat, name.clone(), rules);
            out.dataplane.chains.insert((Table::Nat, name), arc);
        }
        self.frame = kept;

        out.stats.chains = chains.len();
        for (name, rules) in chains {
            out.stats.rules += rules.len();
            out.dataplane.chains.insert((Table::Filter, name), rules);
        }
        out.stats.ipsets = sets.len();
        out.stats.ipset_members = sets.values().map(|s| s.members.len()).sum();
        out.dataplane.ipsets = sets;
        out
    }
}

/// Compiles the model for one node. Pure: same input, same output, no I/O.
pub fn compile(model: &Model, node: &NodeCtx) -> Compiled {
    Compiler::new().compile(model, node)
}

/// The group chain for an ordered list of policies: its name and body.
fn group_chain(d: Direction, ids: &[PolicyRef]) -> (String, Vec<Rule>) {
    let text: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    let name = chain_name(
        match d {
            Direction::Ingress => "GI",
            Direction::Egress => "GE",
        },
        &format!("group\n{}", text.join("\n")),
    );
    let mut body = vec![];
    for id in ids {
        body.push(Rule::new(vec![], Action::Jump(policy_chain_name(id, d))));
        body.push(Rule::new(vec![mark_is_accept()], Action::Return));
    }
    (name, body)
}

/// A local workload's TW (ingress) and FW (egress) chains.
fn workload_rules_of(input: &WorkloadInput) -> (Vec<Rule>, Vec<Rule>) {
    let conntrack = [
        Rule::new(
            vec![Match::CtState(vec![CtState::Related, CtState::Established])],
            Action::Accept,
        ),
        Rule::new(vec![Match::CtState(vec![CtState::Invalid])], Action::Drop),
        Rule::new(vec![Match::Proto(1), ICMP_FRAG_NEEDED], Action::Accept).commented("path MTU discovery"),
        Rule::new(vec![], clear_accept()),
    ];
    let mut fw_body = vec![match input.ip {
        Some(ip) => Rule::new(
            vec![Match::Src {
                net: host(ip),
                negate: true,
            }],
            Action::Drop,
        )
        .commented("anti-spoofing"),
        None => Rule::new(vec![], Action::Drop).commented("workload has no address yet"),
    }];
    fw_body.push(Rule::new(vec![Match::Proto(4)], Action::Drop).commented("IPIP from workloads"));
    let mut tw_body = vec![];
    if !input.in_model {
        let r = Rule::new(vec![], Action::Drop).commented("workload not in the cluster model yet");
        fw_body.push(r.clone());
        tw_body.push(r);
        return (tw_body, fw_body);
    }
    for (d, body) in [(Direction::Ingress, &mut tw_body), (Direction::Egress, &mut fw_body)] {
        body.extend(conntrack.iter().cloned());
        let group = &input.groups[if d == Direction::Ingress { 0 } else { 1 }];
        match group {
            None => body.push(Rule::new(vec![], set_accept()).commented(format!("no {} policy", d.name()))),
            Some(g) => {
                if let (Direction::Ingress, Some(np)) = (d, &input.nodeport) {
                    body.push(
                        Rule::new(
                            vec![
                                Match::InIface {
                                    name: np.tunnel_iface.clone(),
                                    negate: false,
                                },
                                Match::Set {
                                    name: SET_NODEPORT_PEERS.into(),
                                    dir: SetDir::Src,
                                    negate: false,
                                },
                            ],
                            set_accept(),
                        )
                        .commented("service traffic checked by the node that received it"),
                    );
                    body.push(Rule::new(vec![mark_is_accept()], Action::Return));
                }
                body.push(Rule::new(vec![], Action::Jump(g.clone())));
                body.push(Rule::new(vec![mark_is_accept()], Action::Return));
                body.push(Rule::new(vec![], Action::Drop).commented(format!("no {} policy allowed", d.name())));
            }
        }
    }
    (tw_body, fw_body)
}

/// The chains every node has whatever its workloads (FORWARD/INPUT/OUTPUT entry chains, the
/// NodePort check), the nat chain and set of preserve-source, and the hooks.
fn frame_chains(
    node: &NodeCtx,
    wild: &str,
    chains: &mut BTreeMap<String, Vec<Rule>>,
    sets: &mut BTreeMap<String, Arc<IpSetSpec>>,
    nat: &mut BTreeMap<String, Vec<String>>,
    hooks: &mut BTreeSet<Hook>,
) {
    let iface = |name: &str, out_dir: bool| {
        if out_dir {
            Match::OutIface {
                name: name.to_string(),
                negate: false,
            }
        } else {
            Match::InIface {
                name: name.to_string(),
                negate: false,
            }
        }
    };
    let mut forward = vec![
        Rule::new(vec![], clear_accept()),
        Rule::new(vec![iface(wild, false)], Action::Jump(CHAIN_FROM_WL.into())),
        Rule::new(vec![iface(wild, true)], Action::Jump(CHAIN_TO_WL.into())),
    ];
    let mut output = vec![
        // IPVS sends the service connections it forwards to local pods out through OUTPUT, with
        // the client's address: they get the pod's ingress policy as forwarded traffic does.
        Rule::new(
            vec![iface(wild, true), Match::SrcLocal { negate: true }],
            Action::Jump(CHAIN_TO_WL.into()),
        ),
        Rule::new(vec![iface(wild, true)], Action::Jump(CHAIN_HOST_TO_WL.into())),
    ];
    if let Some(np) = &node.nodeport {
        let service = |extra: Match| {
            vec![
                iface(&np.tunnel_iface, true),
                Match::Mark {
                    value: np.kube_masq_mark,
                    mask: np.kube_masq_mark,
                    negate: false,
                },
                extra,
            ]
        };
        forward.push(
            Rule::new(
                service(Match::CtState(vec![CtState::Dnat])),
                Action::Jump(CHAIN_NODEPORT.into()),
            )
            .commented("service traffic kube-proxy will masquerade"),
        );
        output.insert(
            0,
            Rule::new(
                service(Match::SrcLocal { negate: true }),
                Action::Jump(CHAIN_NODEPORT.into()),
            )
            .commented("service traffic IPVS forwards and kube-proxy will masquerade"),
        );
        chains.insert(
            CHAIN_NODEPORT.into(),
            vec![
                Rule::new(vec![], Action::Jump(CHAIN_INGRESS_BY_DST.into())),
                Rule::new(
                    vec![mark_is_accept()],
                    Action::SetMark {
                        value: MARK_CHECKED,
                        mask: MARK_CHECKED,
                    },
                )
                .commented("checked here: leaves with this node's NodePort source"),
                Rule::new(vec![mark_is_accept()], Action::Return),
                Rule::new(vec![], Action::Drop).commented("the destination pod's ingress policy denies the client"),
            ],
        );
        sets.insert(
            SET_NODEPORT_PEERS.into(),
            Arc::new(IpSetSpec {
                kind: "hash:ip".into(),
                members: np.peer_sources.iter().map(|ip| ip.to_string()).collect(),
            }),
        );
        nat.insert(
            CHAIN_NODEPORT_SNAT.into(),
            vec![format!(
                "-o {} -m mark --mark {MARK_CHECKED:#x}/{MARK_CHECKED:#x} -j SNAT --to-source {}",
                np.tunnel_iface, np.local_source
            )],
        );
        hooks.insert(Hook {
            table: Table::Nat,
            chain: "POSTROUTING".into(),
            rule: format!("-j {CHAIN_NODEPORT_SNAT}"),
            first: true,
        });
    }
    forward.push(Rule::new(vec![mark_is_accept()], Action::Accept).commented("allowed by policy"));
    chains.insert(CHAIN_FORWARD.into(), forward);
    chains.insert(
        CHAIN_INPUT.into(),
        vec![Rule::new(
            vec![iface(wild, false)],
            Action::Jump(CHAIN_WL_TO_HOST.into()),
        )],
    );
    chains.insert(CHAIN_OUTPUT.into(), output);

    for (builtin, ours) in [
        ("FORWARD", CHAIN_FORWARD),
        ("INPUT", CHAIN_INPUT),
        ("OUTPUT", CHAIN_OUTPUT),
    ] {
        hooks.insert(Hook {
            table: Table::Filter,
            chain: builtin.into(),
            rule: format!("-j {ours}"),
            first: true,
        });
    }
}

/// The desired state as text: `ipset restore` lines, then an `iptables-restore` payload per
/// table (hooks as `-I`/`-A` into the built-in chains). For golden files, logs and debugging; the
/// writer works from the structured value.
pub fn render_text(dp: &DesiredDataplane) -> String {
    let mut out = String::new();
    for (name, set) in &dp.ipsets {
        out.push_str(&format!("create {name} {}\n", set.kind));
        for m in &set.members {
            out.push_str(&format!("add {name} {m}\n"));
        }
    }
    let tables: BTreeSet<Table> = dp
        .chains
        .keys()
        .map(|(t, _)| *t)
        .chain(dp.hooks.iter().map(|h| h.table))
        .collect();
    for t in tables {
        out.push_str(&format!("*{}\n", t.name()));
        for (_, name) in dp.chains.keys().filter(|(tt, _)| *tt == t) {
            out.push_str(&format!(":{name} - [0:0]\n"));
        }
        for h in dp.hooks.iter().filter(|h| h.table == t) {
            let op = if h.first { "-I" } else { "-A" };
            out.push_str(&format!("{op} {} {}\n", h.chain, h.rule));
        }
        for ((_, name), rules) in dp.chains.iter().filter(|((tt, _), _)| *tt == t) {
            for r in rules.iter() {
                out.push_str(&format!("-A {name} {r}\n"));
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The rules of one policy chain: per rule, one iptables rule per (port, peer) that sets the
/// accept mark, then a return once marked (so the first allowing rule is the one named). Every
/// set a rule matches is reported to `uses` (name, definition).
fn policy_rules(pol: &Policy, d: Direction, uses: &mut dyn FnMut(String, SetDef)) -> Vec<Rule> {
    let mut rules = vec![];
    let dir = match d {
        Direction::Ingress => SetDir::Src,
        Direction::Egress => SetDir::Dst,
    };
    for (i, r) in pol.rules(d).iter().enumerate() {
        let comment = rule_comment(&pol.id(), d, i);
        let peers: Vec<Vec<Match>> = if r.peers.is_empty() {
            vec![vec![]]
        } else {
            r.peers
                .iter()
                .map(|p| {
                    let (name, def) = peer_set(&pol.namespace, p);
                    uses(name.clone(), def);
                    vec![Match::Set {
                        name,
                        dir,
                        negate: false,
                    }]
                })
                .collect()
        };
        let ports: Vec<Vec<Match>> = if r.ports.is_empty() {
            vec![vec![]]
        } else {
            r.ports
                .iter()
                .map(|pm| {
                    let mut m = vec![Match::Proto(pm.protocol.number())];
                    match &pm.port {
                        None => {}
                        Some(PortSpec::Number { port, end }) => m.push(Match::DPort {
                            lo: *port,
                            hi: end.unwrap_or(*port),
                        }),
                        Some(PortSpec::Named(n)) => {
                            let (name, def) = named_port_set(n, pm.protocol);
                            uses(name.clone(), def);
                            m.push(Match::Set {
                                name,
                                dir: SetDir::DstDst,
                                negate: false,
                            })
                        }
                    }
                    m
                })
                .collect()
        };
        for port in &ports {
            for peer in &peers {
                let mut m = port.clone();
                m.extend(peer.iter().cloned());
                rules.push(Rule::new(m, set_accept()).commented(comment.clone()));
            }
        }
        rules.push(Rule::new(vec![mark_is_accept()], Action::Return));
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_bound_names() {
        let long = PolicyRef {
            namespace: "n".repeat(63),
            name: "p".repeat(253),
        };
        assert!(policy_chain_name(&long, Direction::Ingress).len() <= MAX_CHAIN_LEN);
        assert!(set_name("gd", "x").len() <= MAX_IPSET_LEN);
        assert_eq!(
            workload_chain_name("cali73daeaf4b12", Direction::Egress),
            "WARREN-FW-cali73daeaf4b12"
        );
        assert!(workload_chain_name("averyveryverylongname", Direction::Egress).len() <= MAX_CHAIN_LEN);
    }

    #[test]
    fn should_read_back_rule_comments() {
        let p = PolicyRef {
            namespace: "a".into(),
            name: "b".into(),
        };
        assert_eq!(
            parse_rule_comment(&rule_comment(&p, Direction::Egress, 3)),
            Some((p, Direction::Egress, 3))
        );
        assert_eq!(parse_rule_comment("anti-spoofing"), None);
    }
}
