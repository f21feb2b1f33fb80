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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use conf::dataplane::{DesiredDataplane, Hook, IpSetSpec, Table};
use conf::names::{CHAIN_PREFIX, IPSET_PREFIX};
use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use crate::model::{Direction, Model, Peer, Pod, PolicyError, PolicyRef, PortSpec, Protocol};
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

struct Ctx<'m> {
    model: &'m Model,
    /// Namespace → pods with an IP, indices into model.pods.
    pods_by_ns: BTreeMap<&'m str, Vec<usize>>,
    /// Every namespace name, known or only referenced by pods.
    ns_names: BTreeSet<&'m str>,
    sets: BTreeMap<String, IpSetSpec>,
    /// Canonical peer identity → set name (cache: the same peer in many policies is one set).
    set_by_key: HashMap<String, String>,
}

impl<'m> Ctx<'m> {
    fn peer_set(&mut self, policy_ns: &str, peer: &Peer) -> String {
        let key = match peer {
            Peer::Pods { namespaces, pods } => format!(
                "pods|{}|{}",
                match namespaces {
                    None => format!("ns={policy_ns}"),
                    Some(s) => format!("nsel={}", s.canonical()),
                },
                pods.as_ref().map(|s| s.canonical()).unwrap_or_else(|| "all".into())
            ),
            Peer::IpBlock { cidr, except } => {
                let mut e: Vec<String> = except.iter().map(|e| e.trunc().to_string()).collect();
                e.sort();
                e.dedup();
                format!("net|{}|{}", cidr.trunc(), e.join(","))
            }
        };
        if let Some(n) = self.set_by_key.get(&key) {
            return n.clone();
        }
        let (kind, spec) = match peer {
            Peer::Pods { namespaces, pods } => {
                let mut members = BTreeSet::new();
                let candidate_ns: Vec<&str> = match namespaces {
                    None => vec![policy_ns],
                    Some(s) => self
                        .ns_names
                        .iter()
                        .copied()
                        .filter(|ns| s.matches(&self.model.ns_labels(ns)))
                        .collect(),
                };
                for ns in candidate_ns {
                    for &i in self.pods_by_ns.get(ns).map(Vec::as_slice).unwrap_or(&[]) {
                        let p = &self.model.pods[i];
                        if let (Some(ip), true) = (p.ip, pods.as_ref().is_none_or(|s| s.matches(&p.labels))) {
                            members.insert(ip.to_string());
                        }
                    }
                }
                (
                    "s",
                    IpSetSpec {
                        kind: "hash:net".into(),
                        members,
                    },
                )
            }
            Peer::IpBlock { cidr, except } => {
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
                (
                    "b",
                    IpSetSpec {
                        kind: "hash:net".into(),
                        members,
                    },
                )
            }
        };
        let name = set_name(kind, &key);
        self.sets.insert(name.clone(), spec);
        self.set_by_key.insert(key, name.clone());
        name
    }

    /// `hash:ip,port` set of every pod's (IP, protocol:number) for a port name, cluster-wide:
    /// matched with `dst,dst`, it resolves the name on whichever pod the packet goes to.
    fn named_port_set(&mut self, name: &str, proto: Protocol) -> String {
        let key = format!("np|{}|{name}", proto.name());
        if let Some(n) = self.set_by_key.get(&key) {
            return n.clone();
        }
        let mut members = BTreeSet::new();
        for p in &self.model.pods {
            if let (Some(ip), Some(port)) = (p.ip, p.named_port(name, proto)) {
                members.insert(format!("{ip},{}:{port}", proto.name()));
            }
        }
        let set = set_name("n", &key);
        self.sets.insert(
            set.clone(),
            IpSetSpec {
                kind: "hash:ip,port".into(),
                members,
            },
        );
        self.set_by_key.insert(key, set.clone());
        set
    }
}

/// Compiles the model for one node. Pure: same input, same output, no I/O.
pub fn compile(model: &Model, node: &NodeCtx) -> Compiled {
    let mut out = Compiled::default();

    // Valid policies only; a bad one is reported and the rest still compile.
    let mut seen = BTreeSet::new();
    let mut valid = vec![];
    for p in &model.policies {
        if !seen.insert(p.id()) {
            out.errors.push(PolicyError {
                policy: p.id(),
                reason: "defined twice; the first definition is enforced".into(),
            });
            continue;
        }
        match p.validate() {
            Ok(()) => valid.push(p),
            Err(e) => out.errors.push(e),
        }
    }
    // Policies apply as a union, so their order carries no meaning; sorting by identity keeps
    // the output independent of the order the API server listed them in (no churn on restart).
    valid.sort_by_key(|p| p.id());

    let mut ctx = Ctx {
        model,
        pods_by_ns: BTreeMap::new(),
        ns_names: model.namespaces.keys().map(String::as_str).collect(),
        sets: BTreeMap::new(),
        set_by_key: HashMap::new(),
    };
    for (i, p) in model.pods.iter().enumerate() {
        ctx.ns_names.insert(&p.namespace);
        if p.ip.is_some() {
            ctx.pods_by_ns.entry(p.namespace.as_str()).or_default().push(i);
        }
    }

    // Which valid policies select each pod, per direction (in model order, so stable).
    let mut all_by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in model.pods.iter().enumerate() {
        all_by_ns.entry(p.namespace.as_str()).or_default().push(i);
    }
    let mut selecting: Vec<[Vec<usize>; 2]> = vec![[vec![], vec![]]; model.pods.len()];
    for (k, pol) in valid.iter().enumerate() {
        for &i in all_by_ns.get(pol.namespace.as_str()).map(Vec::as_slice).unwrap_or(&[]) {
            if pol.pod_selector.matches(&model.pods[i].labels) {
                if pol.ingress_type {
                    selecting[i][0].push(k);
                }
                if pol.egress_type {
                    selecting[i][1].push(k);
                }
            }
        }
    }

    let mut chains: BTreeMap<String, Vec<Rule>> = BTreeMap::new();
    let mut group_names: HashMap<(Direction, Vec<usize>), String> = HashMap::new();

    // Builds (once) the group chain for a policy set and the policy chains it jumps to.
    let mut ensure_group = |d: Direction,
                            pols: &[usize],
                            ctx: &mut Ctx,
                            chains: &mut BTreeMap<String, Vec<Rule>>,
                            out: &mut Compiled|
     -> String {
        if let Some(n) = group_names.get(&(d, pols.to_vec())) {
            return n.clone();
        }
        let ids: Vec<String> = pols.iter().map(|&k| valid[k].id().to_string()).collect();
        let gname = chain_name(
            match d {
                Direction::Ingress => "GI",
                Direction::Egress => "GE",
            },
            &format!("group\n{}", ids.join("\n")),
        );
        let mut body = vec![];
        for &k in pols {
            let pol = valid[k];
            let pchain = policy_chain_name(&pol.id(), d);
            if !chains.contains_key(&pchain) {
                let rules = policy_rules(ctx, pol, d);
                out.stats.policy_rules += rules.len();
                chains.insert(pchain.clone(), rules);
                out.policy_chains.insert(pchain.clone(), (pol.id(), d));
            }
            body.push(Rule::new(vec![], Action::Jump(pchain)));
            body.push(Rule::new(vec![mark_is_accept()], Action::Return));
        }
        out.stats.group_rules += body.len();
        chains.insert(gname.clone(), body);
        group_names.insert((d, pols.to_vec()), gname.clone());
        gname
    };

    // Ingress by destination IP, for every pod in the cluster with an IP.
    let mut by_dst_groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, p) in model.pods.iter().enumerate() {
        if let (Some(ip), false) = (p.ip, selecting[i][0].is_empty()) {
            let g = ensure_group(Direction::Ingress, &selecting[i][0], &mut ctx, &mut chains, &mut out);
            by_dst_groups.entry(g).or_default().insert(ip.to_string());
        }
    }
    let mut by_dst = vec![Rule::new(vec![], clear_accept())];
    for (g, members) in by_dst_groups {
        let set = set_name("gd", &g);
        ctx.sets.insert(
            set.clone(),
            IpSetSpec {
                kind: "hash:ip".into(),
                members,
            },
        );
        by_dst.push(Rule::new(
            vec![Match::Set {
                name: set,
                dir: SetDir::Dst,
                negate: false,
            }],
            Action::Goto(g),
        ));
    }
    by_dst.push(Rule::new(vec![], set_accept()).commented("destination not isolated for ingress"));
    chains.insert(CHAIN_INGRESS_BY_DST.into(), by_dst);

    // Per-workload chains.
    let pod_index: HashMap<(&str, &str), usize> = model
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| ((p.namespace.as_str(), p.name.as_str()), i))
        .collect();
    let wild = format!("{}+", node.veth_prefix);
    let mut from_dispatch = vec![];
    let mut to_dispatch = vec![];
    let mut wl_to_host = vec![Rule::new(vec![Match::Proto(4)], Action::Drop).commented("IPIP from workloads")];
    let mut host_to_wl = vec![];
    let mut workload_rules = 0;
    let mut workloads: Vec<&Workload> = node.workloads.iter().collect();
    workloads.sort_by(|a, b| a.iface.cmp(&b.iface));
    workloads.dedup_by(|a, b| a.iface == b.iface);
    for w in workloads {
        let idx = pod_index.get(&(w.namespace.as_str(), w.pod.as_str())).copied();
        let pod: Option<&Pod> = idx.map(|i| &model.pods[i]);
        let ip = w.ip.or(pod.and_then(|p| p.ip));
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
                        net: host(ip),
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

        let conntrack = [
            Rule::new(
                vec![Match::CtState(vec![CtState::Related, CtState::Established])],
                Action::Accept,
            ),
            Rule::new(vec![Match::CtState(vec![CtState::Invalid])], Action::Drop),
            Rule::new(vec![Match::Proto(1), ICMP_FRAG_NEEDED], Action::Accept).commented("path MTU discovery"),
            Rule::new(vec![], clear_accept()),
        ];
        let mut fw_body = vec![match ip {
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
        match idx {
            None => {
                let r = Rule::new(vec![], Action::Drop).commented("workload not in the cluster model yet");
                fw_body.push(r.clone());
                tw_body.push(r);
            }
            Some(i) => {
                for (d, body) in [(Direction::Ingress, &mut tw_body), (Direction::Egress, &mut fw_body)] {
                    body.extend(conntrack.iter().cloned());
                    let pols = &selecting[i][if d == Direction::Ingress { 0 } else { 1 }];
                    if pols.is_empty() {
                        body.push(Rule::new(vec![], set_accept()).commented(format!("no {} policy", d.name())));
                    } else {
                        if let (Direction::Ingress, Some(np)) = (d, &node.nodeport) {
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
                        let g = ensure_group(d, pols, &mut ctx, &mut chains, &mut out);
                        body.push(Rule::new(vec![], Action::Jump(g)));
                        body.push(Rule::new(vec![mark_is_accept()], Action::Return));
                        body.push(Rule::new(vec![], Action::Drop).commented(format!("no {} policy allowed", d.name())));
                    }
                }
            }
        }
        // + one rule each in the two dispatch chains, WL-TO-HOST and HOST-TO-WL.
        let this = tw_body.len() + fw_body.len() + 4;
        workload_rules += this;
        out.stats.max_workload_rules = out.stats.max_workload_rules.max(this);
        chains.insert(tw, tw_body);
        chains.insert(fw, fw_body);
        out.stats.local_workloads += 1;
    }
    let unknown = |what: &str| Rule::new(vec![], Action::Drop).commented(format!("unknown {what}"));
    from_dispatch.push(unknown("workload interface"));
    to_dispatch.push(unknown("workload interface"));
    wl_to_host.push(unknown("workload interface or spoofed source"));
    host_to_wl.push(unknown("workload interface"));
    out.stats.workload_rules = workload_rules;
    chains.insert(CHAIN_FROM_WL.into(), from_dispatch);
    chains.insert(CHAIN_TO_WL.into(), to_dispatch);
    chains.insert(CHAIN_WL_TO_HOST.into(), wl_to_host);
    chains.insert(CHAIN_HOST_TO_WL.into(), host_to_wl);

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
        Rule::new(vec![iface(&wild, false)], Action::Jump(CHAIN_FROM_WL.into())),
        Rule::new(vec![iface(&wild, true)], Action::Jump(CHAIN_TO_WL.into())),
    ];
    let mut output = vec![
        // IPVS sends the service connections it forwards to local pods out through OUTPUT, with
        // the client's address: they get the pod's ingress policy as forwarded traffic does.
        Rule::new(
            vec![iface(&wild, true), Match::SrcLocal { negate: true }],
            Action::Jump(CHAIN_TO_WL.into()),
        ),
        Rule::new(vec![iface(&wild, true)], Action::Jump(CHAIN_HOST_TO_WL.into())),
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
        ctx.sets.insert(
            SET_NODEPORT_PEERS.into(),
            IpSetSpec {
                kind: "hash:ip".into(),
                members: np.peer_sources.iter().map(|ip| ip.to_string()).collect(),
            },
        );
        out.dataplane.chains.insert(
            (Table::Nat, CHAIN_NODEPORT_SNAT.into()),
            Arc::new(vec![format!(
                "-o {} -m mark --mark {MARK_CHECKED:#x}/{MARK_CHECKED:#x} -j SNAT --to-source {}",
                np.tunnel_iface, np.local_source
            )]),
        );
        out.dataplane.hooks.insert(Hook {
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
            vec![iface(&wild, false)],
            Action::Jump(CHAIN_WL_TO_HOST.into()),
        )],
    );
    chains.insert(CHAIN_OUTPUT.into(), output);

    for (builtin, ours) in [
        ("FORWARD", CHAIN_FORWARD),
        ("INPUT", CHAIN_INPUT),
        ("OUTPUT", CHAIN_OUTPUT),
    ] {
        out.dataplane.hooks.insert(Hook {
            table: Table::Filter,
            chain: builtin.into(),
            rule: format!("-j {ours}"),
            first: true,
        });
    }
    out.stats.chains = chains.len();
    for (name, rules) in chains {
        out.stats.rules += rules.len();
        out.dataplane
            .chains
            .insert((Table::Filter, name), Arc::new(rules.iter().map(Rule::render).collect()));
    }
    out.stats.ipsets = ctx.sets.len();
    out.stats.ipset_members = ctx.sets.values().map(|s| s.members.len()).sum();
    out.dataplane.ipsets = ctx.sets.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
    out
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
/// accept mark, then a return once marked (so the first allowing rule is the one named).
fn policy_rules(ctx: &mut Ctx, pol: &crate::model::Policy, d: Direction) -> Vec<Rule> {
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
                    vec![Match::Set {
                        name: ctx.peer_set(&pol.namespace, p),
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
                        Some(PortSpec::Named(n)) => m.push(Match::Set {
                            name: ctx.named_port_set(n, pm.protocol),
                            dir: SetDir::DstDst,
                            negate: false,
                        }),
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
