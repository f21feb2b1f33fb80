//! Random clusters: the compiled rules, run by the interpreter along real packet paths (same
//! node and across nodes, ingress and egress), must agree with the reference evaluator of the
//! Kubernetes semantics; the "ingress at any node" query must agree too, down to the deciding rule.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use policy::compile::{Compiler, NodePortCheck};
use policy::model::{
    Direction, Model, NamedPort, Namespace, Operator, Peer, Pod, Policy, PortMatch, PortSpec, Protocol, Requirement,
    Rule, Selector,
};
use policy::query::{ClusterSim, NodeView};
use policy::reference::{self, Endpoint, L4};
use policy::rule::CtState;
use policy::{compile, NodeCtx, Workload};
use proptest::prelude::*;

const NODES: [&str; 2] = ["n1", "n2"];
const EXTERNALS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(192, 168, 1, 5),
    Ipv4Addr::new(8, 8, 8, 8),
    Ipv4Addr::new(10, 1, 2, 3),
];
const NODE_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(172, 16, 0, 1), Ipv4Addr::new(172, 16, 0, 2)];

fn opt_label(key: &'static str, vals: &'static [&'static str]) -> impl Strategy<Value = Option<(String, String)>> {
    proptest::option::of(proptest::sample::select(vals).prop_map(move |v| (key.to_string(), v.to_string())))
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    (opt_label("app", &["a", "b", "c"]), opt_label("role", &["x", "y"]))
        .prop_map(|(a, b)| a.into_iter().chain(b).collect())
}

fn ns_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    (opt_label("team", &["a", "b"]), opt_label("env", &["prod"])).prop_map(|(a, b)| a.into_iter().chain(b).collect())
}

fn selector(keys: &'static [&'static str], vals: &'static [&'static str]) -> impl Strategy<Value = Selector> {
    let ml = proptest::collection::btree_map(
        proptest::sample::select(keys).prop_map(str::to_string),
        proptest::sample::select(vals).prop_map(str::to_string),
        0..2,
    );
    let op = prop_oneof![
        Just(Operator::In),
        Just(Operator::NotIn),
        Just(Operator::Exists),
        Just(Operator::DoesNotExist)
    ];
    let expr = proptest::option::of((
        proptest::sample::select(keys),
        op,
        proptest::sample::subsequence(vals, 1..3),
    ));
    (ml, expr).prop_map(|(match_labels, e)| Selector {
        match_labels,
        match_expressions: e
            .into_iter()
            .map(|(k, op, v)| Requirement {
                key: k.to_string(),
                operator: op,
                values: match op {
                    Operator::In | Operator::NotIn => v.into_iter().map(str::to_string).collect(),
                    _ => vec![],
                },
            })
            .collect(),
    })
}

fn pod_sel() -> impl Strategy<Value = Selector> {
    selector(&["app", "role"], &["a", "b", "x"])
}

fn ns_sel() -> impl Strategy<Value = Selector> {
    selector(&["team", "env"], &["a", "b", "prod"])
}

fn peer() -> impl Strategy<Value = Peer> {
    const CIDRS: [&str; 5] = [
        "10.1.0.0/16",
        "10.1.1.0/24",
        "0.0.0.0/0",
        "192.168.0.0/16",
        "10.1.2.3/32",
    ];
    const EXCEPTS: [&str; 4] = ["10.1.1.2/32", "10.1.2.0/25", "192.168.1.0/24", "10.1.0.0/16"];
    prop_oneof![
        (proptest::option::of(ns_sel()), proptest::option::of(pod_sel()))
            .prop_map(|(namespaces, pods)| Peer::Pods { namespaces, pods }),
        (
            proptest::sample::select(&CIDRS[..]),
            proptest::sample::subsequence(&EXCEPTS[..], 0..2)
        )
            .prop_map(|(c, e)| Peer::ip_block(c, &e)),
    ]
}

fn port() -> impl Strategy<Value = PortMatch> {
    let proto = prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp), Just(Protocol::Sctp)];
    let spec = prop_oneof![
        Just(None),
        (
            // 85 falls in 80:90 and 91 touches it: one rule's ports merge into fewer ranges.
            proptest::sample::select(&[53u16, 80, 85, 91, 8080, 9000][..]),
            proptest::option::of(Just(10u16))
        )
            .prop_map(|(p, e)| Some(PortSpec::Number {
                port: p,
                end: e.map(|e| p + e)
            })),
        proptest::sample::select(&["http", "dns", "sc"][..]).prop_map(|n| Some(PortSpec::Named(n.to_string()))),
    ];
    (proto, spec).prop_map(|(protocol, port)| PortMatch { protocol, port })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        proptest::collection::vec(peer(), 0..4),
        proptest::collection::vec(port(), 0..4),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn policy(i: usize) -> impl Strategy<Value = Policy> {
    (
        0..3usize,
        pod_sel(),
        proptest::option::of((any::<bool>(), any::<bool>())),
        proptest::collection::vec(rule(), 0..3),
        proptest::collection::vec(rule(), 0..3),
    )
        .prop_map(move |(ns, sel, types, ingress, egress)| {
            let (ingress_type, egress_type) = types.unwrap_or(Policy::default_types(egress.len()));
            Policy {
                namespace: format!("ns{ns}"),
                name: format!("p{i}"),
                pod_selector: sel,
                ingress_type,
                egress_type,
                ingress,
                egress,
            }
        })
}

fn pod(i: usize) -> impl Strategy<Value = Pod> {
    let ports = (
        proptest::option::of(proptest::sample::select(&[80u16, 8080][..])),
        proptest::option::of(proptest::sample::select(&[53u16, 5353][..])),
        any::<bool>(),
    )
        .prop_map(|(http, dns, sc)| {
            let mut v = vec![];
            if let Some(p) = http {
                v.push(NamedPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: p,
                });
            }
            if let Some(p) = dns {
                v.push(NamedPort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: p,
                });
            }
            if sc {
                v.push(NamedPort {
                    name: "sc".into(),
                    protocol: Protocol::Sctp,
                    port: 9000,
                });
            }
            v
        });
    (0..3usize, labels(), 0..2usize, ports, proptest::bool::weighted(0.9)).prop_map(
        move |(ns, labels, node, ports, has_ip)| Pod {
            namespace: format!("ns{ns}"),
            name: format!("pod{i}"),
            labels: std::sync::Arc::new(labels.into()),
            // 10.1.1.2 and 10.1.2.x fall inside the except blocks above.
            ip: has_ip.then(|| Ipv4Addr::new(10, 1, 1 + (i % 2) as u8, 2 + i as u8)),
            node: NODES[node].to_string(),
            ports: ports.into(),
        },
    )
}

fn model() -> impl Strategy<Value = Model> {
    let pods = (1..8usize).prop_flat_map(|n| (0..n).map(pod).collect::<Vec<_>>());
    let policies = (0..5usize).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>());
    let nss = proptest::collection::vec(ns_labels(), 3);
    (nss, pods, policies).prop_map(|(nss, pods, policies)| Model {
        namespaces: nss
            .into_iter()
            .enumerate()
            .map(|(i, labels)| {
                let name = format!("ns{i}");
                (name.clone(), Namespace { name, labels })
            })
            .collect(),
        pods: Arc::new(pods),
        policies: policies.into_iter().map(Arc::new).collect(),
    })
}

fn endpoint(npods: usize) -> impl Strategy<Value = Endpoint> {
    prop_oneof![
        4 => (0..npods).prop_map(Endpoint::Pod),
        1 => (0..2usize).prop_map(|n| Endpoint::Host { node: NODES[n].into(), ip: NODE_IPS[n] }),
        1 => proptest::sample::select(&EXTERNALS[..])
            .prop_map(Endpoint::External),
    ]
}

fn l4() -> impl Strategy<Value = L4> {
    prop_oneof![
        1 => Just(None),
        6 => (
            prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp), Just(Protocol::Sctp)],
            proptest::sample::select(&[53u16, 80, 85, 91, 92, 101, 8080, 9000, 5353][..])
        )
            .prop_map(Some),
    ]
}

fn case() -> impl Strategy<Value = (Model, Vec<(Endpoint, Endpoint, L4)>)> {
    model().prop_flat_map(|m| {
        let n = m.pods.len();
        (
            Just(m),
            proptest::collection::vec((endpoint(n), endpoint(n), l4()), 1..24),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_rules_agree_with_kubernetes_semantics((m, packets) in case()) {
        let sim = ClusterSim::new(&m, &NODES, "cali").unwrap();
        for (src, dst, l4) in &packets {
            let want = reference::allowed(&m, src, dst, *l4);
            let got = sim.allowed(src, dst, *l4);
            prop_assert_eq!(got, want, "src {:?} dst {:?} l4 {:?}", src, dst, l4);
            if got && src.ip(&m).is_some() && dst.ip(&m).is_some() {
                // The reply of an allowed connection flows back (conntrack).
                prop_assert!(sim.send(dst, src, *l4, CtState::Established), "reply of {:?} -> {:?}", src, dst);
            }
        }
    }

    #[test]
    fn ingress_query_at_any_node_agrees_with_semantics((m, packets) in case()) {
        let view = NodeView::new(compile(&m, &NodeCtx::empty("elsewhere"))).unwrap();
        for (src, dst, l4) in &packets {
            let (Endpoint::Pod(d), Some(src_ip)) = (dst, src.ip(&m)) else { continue };
            let Some(dst_ip) = m.pods[*d].ip else { continue };
            let want = reference::direction_allows(&m, &m.pods[*d], Direction::Ingress, src_ip, *l4);
            let got = view.ingress_allows(dst_ip, src_ip, *l4);
            prop_assert_eq!(got.allowed, want.allowed);
            prop_assert_eq!(got.by, want.by);
        }
    }

    #[test]
    fn compile_depends_on_the_model_not_on_object_order(m in model()) {
        let ctx = NodeCtx::from_model(&m, "n1", "cali").unwrap();
        let a = compile(&m, &ctx);
        let mut shuffled = ctx.clone();
        shuffled.workloads.reverse();
        let b = compile(&m, &shuffled);
        prop_assert_eq!(&a.dataplane, &b.dataplane);
        // Object order does not matter either (the API lists objects in no fixed order).
        let mut reordered = m.clone();
        Arc::make_mut(&mut reordered.pods).reverse();
        reordered.policies.reverse();
        let c = compile(&reordered, &ctx);
        prop_assert_eq!(&a.dataplane, &c.dataplane);
    }
}

proptest! {
    // Each case is up to 24 compiles on each side; 2000 cases take about 3 s in --release.
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn incremental_compile_equals_compile_from_scratch(
        m in model(),
        edits in proptest::collection::vec(edit(), 1..24),
        nodeport in any::<bool>(),
    ) {
        let mut m = m;
        let mut node = NodeState {
            iface_prefix: "cali",
            veth_prefix: "cali",
            nodeport: nodeport_check(u8::from(nodeport)),
            missing: BTreeSet::new(),
            ghosts: vec![],
        };
        let mut inc = Compiler::new();
        let check = |inc: &mut Compiler, m: &Model, node: &NodeState, step: usize| -> Result<(), TestCaseError> {
            let ctx = node.ctx(m);
            let got = inc.compile(m, &ctx);
            let want = compile(m, &ctx);
            prop_assert_eq!(&got.dataplane, &want.dataplane, "after step {}", step);
            prop_assert_eq!(&got.errors, &want.errors, "after step {}", step);
            prop_assert_eq!(&got.policy_chains, &want.policy_chains, "after step {}", step);
            prop_assert_eq!(&got.stats, &want.stats, "after step {}", step);
            // Both paths could agree on the wrong copy of a repeated object; this pins which one.
            if let Some((once, dropped)) = without_repeats(m) {
                let plain = compile(&once, &ctx);
                prop_assert_eq!(&want.dataplane, &plain.dataplane, "repeats, after step {}", step);
                prop_assert_eq!(&want.policy_chains, &plain.policy_chains);
                let (twice, rest): (Vec<_>, Vec<_>) =
                    want.errors.iter().cloned().partition(|e| e.reason.contains("defined twice"));
                prop_assert_eq!(&rest, &plain.errors);
                prop_assert_eq!(twice.len(), dropped);
            }
            Ok(())
        };
        check(&mut inc, &m, &node, 0)?;
        for (step, e) in edits.into_iter().enumerate() {
            apply_edit(&mut m, &mut node, e);
            check(&mut inc, &m, &node, step + 1)?;
        }
    }
}

/// The model with every pod and policy listed once, as `compile` reads repeats: a pod's later
/// listing wins (as in a map built from the list), a policy's first definition is enforced.
/// `None` when nothing is repeated; else also how many policy definitions were dropped.
fn without_repeats(m: &Model) -> Option<(Model, usize)> {
    let mut pods: BTreeMap<(&str, &str), &Pod> = BTreeMap::new();
    for p in m.pods.iter() {
        pods.insert((&p.namespace, &p.name), p);
    }
    let mut seen = BTreeSet::new();
    let policies: Vec<Arc<Policy>> = m
        .policies
        .iter()
        .filter(|p| seen.insert((&p.namespace, &p.name)))
        .cloned()
        .collect();
    if pods.len() == m.pods.len() && policies.len() == m.policies.len() {
        return None;
    }
    let dropped = m.policies.len() - policies.len();
    let once = Model {
        namespaces: m.namespaces.clone(),
        pods: Arc::new(pods.into_values().cloned().collect()),
        policies,
    };
    Some((once, dropped))
}

/// Preserve-source off (0), on (1), and on with one more peer node (2).
fn nodeport_check(variant: u8) -> Option<NodePortCheck> {
    let mut peer_sources: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(10, 1, 2, 1)].into();
    match variant {
        0 => return None,
        2 => {
            peer_sources.insert(Ipv4Addr::new(10, 1, 3, 1));
        }
        _ => {}
    }
    Some(NodePortCheck {
        tunnel_iface: "tunl0".into(),
        local_source: Ipv4Addr::new(10, 1, 1, 1),
        peer_sources,
        kube_masq_mark: 0x4000,
    })
}

/// What the node reports about itself: the CNI plugin's interfaces and the daemon's settings
/// are not in step with the API server, so the workloads can disagree with the model.
#[derive(Debug, Clone)]
struct NodeState {
    /// Prefix of the interfaces the CNI plugin created.
    iface_prefix: &'static str,
    /// The setting; it can differ from the interfaces' prefix while old interfaces remain.
    veth_prefix: &'static str,
    nodeport: Option<NodePortCheck>,
    /// Pods on this node whose interface is not there (not yet created, or already deleted).
    missing: BTreeSet<String>,
    /// Interfaces of pods the model does not place here: deleted, not yet listed, or listed on
    /// another node.
    ghosts: Vec<(String, String, Option<Ipv4Addr>)>,
}

impl NodeState {
    fn ctx(&self, m: &Model) -> NodeCtx {
        let mut ctx = NodeCtx::from_model(m, "n1", self.iface_prefix)
            .unwrap()
            .with_nodeport(self.nodeport.clone());
        ctx.veth_prefix = self.veth_prefix.to_string();
        ctx.workloads.retain(|w| !self.missing.contains(&w.pod));
        for (namespace, name, ip) in &self.ghosts {
            // `from_model` names the interface as the CNI plugin would; it skips pods without
            // an address, so the ghost gets one here and its own (or none) afterwards.
            let pod = Pod {
                namespace: namespace.clone(),
                name: name.clone(),
                labels: Default::default(),
                ip: Some(Ipv4Addr::UNSPECIFIED),
                node: "n1".into(),
                ports: vec![].into(),
            };
            let one = Model {
                namespaces: BTreeMap::new(),
                pods: Arc::new(vec![pod]),
                policies: vec![],
            };
            let w = NodeCtx::from_model(&one, "n1", self.iface_prefix)
                .unwrap()
                .workloads
                .remove(0);
            ctx.workloads.push(Workload { ip: *ip, ..w });
        }
        ctx
    }
}

/// One thing that happens to a cluster, or to the node, between two compiles.
#[derive(Debug, Clone)]
enum Edit {
    /// Pod `pod<i>` created, or changed (labels, address, ports, even namespace).
    Pod(usize, Pod),
    DropPod(usize),
    /// Pod `pod<i>` takes the address of `pod<j>` (an address reused before the old pod is gone).
    ReuseIp(usize, usize),
    Policy(usize, Policy),
    /// The peers of one rule of policy `p<i>` change, nothing else (a rule with three peers or
    /// more keeps its list and the list's members change).
    PolicyPeers {
        i: usize,
        egress: bool,
        rule: usize,
        peers: Vec<Peer>,
    },
    DropPolicy(usize),
    Namespace(usize, BTreeMap<String, String>),
    /// The API lists objects in no fixed order: every pod and policy moves to another place.
    ReversePods,
    ReversePolicies,
    RotatePods(usize),
    /// Pod `pod<i>` listed a second time at index `at` (modulo), as itself or changed (`Some`).
    DupPod {
        i: usize,
        changed: Option<Pod>,
        at: usize,
    },
    /// Policy `p<i>` defined a second time at index `at` (modulo), as itself or changed.
    DupPolicy {
        i: usize,
        changed: Option<Policy>,
        at: usize,
    },
    /// The interface of pod `pod<i>` disappears, or comes back.
    ToggleMissing(usize),
    /// An interface appears for a pod the model does not place here.
    Ghost(String, String, Option<Ipv4Addr>),
    DropGhost(usize),
    VethPrefix {
        iface: &'static str,
        setting: &'static str,
    },
    NodePort(u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    const PREFIXES: [&str; 2] = ["cali", "wrn"];
    let ghost_name = prop_oneof![
        (0..10usize).prop_map(|i| format!("pod{i}")),
        (0..2usize).prop_map(|i| format!("ghost{i}")),
    ];
    let ghost_ip = proptest::option::of(prop_oneof![
        (0..10u8).prop_map(|i| Ipv4Addr::new(10, 1, 1 + (i % 2), 2 + i)),
        Just(Ipv4Addr::new(10, 1, 9, 9)),
    ]);
    prop_oneof![
        3 => (0..10usize).prop_flat_map(|i| pod(i).prop_map(move |p| Edit::Pod(i, p))),
        1 => (0..10usize).prop_map(Edit::DropPod),
        1 => (0..10usize, 0..10usize).prop_map(|(i, j)| Edit::ReuseIp(i, j)),
        3 => (0..6usize).prop_flat_map(|i| policy(i).prop_map(move |p| Edit::Policy(i, p))),
        2 => (0..6usize, any::<bool>(), 0..3usize, proptest::collection::vec(peer(), 0..6))
            .prop_map(|(i, egress, rule, peers)| Edit::PolicyPeers { i, egress, rule, peers }),
        1 => (0..6usize).prop_map(Edit::DropPolicy),
        1 => (0..3usize, ns_labels()).prop_map(|(i, l)| Edit::Namespace(i, l)),
        1 => Just(Edit::ReversePods),
        1 => Just(Edit::ReversePolicies),
        1 => (1..8usize).prop_map(Edit::RotatePods),
        1 => (0..10usize, 0..10usize)
            .prop_flat_map(|(i, at)| proptest::option::of(pod(i)).prop_map(move |changed| Edit::DupPod { i, changed, at })),
        1 => (0..6usize, 0..6usize).prop_flat_map(|(i, at)| {
            proptest::option::of(policy(i)).prop_map(move |changed| Edit::DupPolicy { i, changed, at })
        }),
        1 => (0..10usize).prop_map(Edit::ToggleMissing),
        1 => (0..3usize, ghost_name, ghost_ip).prop_map(|(ns, name, ip)| Edit::Ghost(format!("ns{ns}"), name, ip)),
        1 => (0..4usize).prop_map(Edit::DropGhost),
        1 => (proptest::sample::select(&PREFIXES[..]), proptest::sample::select(&PREFIXES[..]))
            .prop_map(|(iface, setting)| Edit::VethPrefix { iface, setting }),
        1 => (0..3u8).prop_map(Edit::NodePort),
    ]
}

fn apply_edit(m: &mut Model, node: &mut NodeState, e: Edit) {
    match e {
        Edit::Pod(i, p) => match Arc::make_mut(&mut m.pods)
            .iter_mut()
            .find(|x| x.name == format!("pod{i}"))
        {
            Some(x) => *x = p,
            None => Arc::make_mut(&mut m.pods).push(p),
        },
        Edit::DropPod(i) => Arc::make_mut(&mut m.pods).retain(|x| x.name != format!("pod{i}")),
        Edit::ReuseIp(i, j) => {
            let ip = m.pods.iter().find(|x| x.name == format!("pod{j}")).and_then(|x| x.ip);
            if let Some(x) = Arc::make_mut(&mut m.pods)
                .iter_mut()
                .find(|x| x.name == format!("pod{i}"))
            {
                x.ip = ip;
            }
        }
        Edit::Policy(i, p) => match m.policies.iter_mut().find(|x| x.name == format!("p{i}")) {
            Some(x) => *x = Arc::new(p),
            None => m.policies.push(Arc::new(p)),
        },
        Edit::PolicyPeers { i, egress, rule, peers } => {
            if let Some(x) = m.policies.iter_mut().find(|x| x.name == format!("p{i}")) {
                let p = Arc::make_mut(x);
                let rules = if egress { &mut p.egress } else { &mut p.ingress };
                if let Some(r) = rules.get_mut(rule) {
                    r.peers = peers;
                }
            }
        }
        Edit::DropPolicy(i) => m.policies.retain(|x| x.name != format!("p{i}")),
        Edit::Namespace(i, labels) => {
            let name = format!("ns{i}");
            m.namespaces.insert(name.clone(), Namespace { name, labels });
        }
        Edit::ReversePods => Arc::make_mut(&mut m.pods).reverse(),
        Edit::ReversePolicies => m.policies.reverse(),
        Edit::RotatePods(k) => {
            if !m.pods.is_empty() {
                let k = k % m.pods.len();
                Arc::make_mut(&mut m.pods).rotate_left(k);
            }
        }
        Edit::DupPod { i, changed, at } => {
            let Some(orig) = m.pods.iter().find(|x| x.name == format!("pod{i}")) else {
                return;
            };
            // The duplicate must name the same pod, or it is just another pod.
            let dup = match changed {
                Some(p) => Pod {
                    namespace: orig.namespace.clone(),
                    ..p
                },
                None => orig.clone(),
            };
            let at = at % (m.pods.len() + 1);
            Arc::make_mut(&mut m.pods).insert(at, dup);
        }
        Edit::DupPolicy { i, changed, at } => {
            let Some(orig) = m.policies.iter().find(|x| x.name == format!("p{i}")) else {
                return;
            };
            let dup = match changed {
                Some(p) => Arc::new(Policy {
                    namespace: orig.namespace.clone(),
                    ..p
                }),
                None => orig.clone(),
            };
            let at = at % (m.policies.len() + 1);
            m.policies.insert(at, dup);
        }
        Edit::ToggleMissing(i) => {
            let name = format!("pod{i}");
            if !node.missing.remove(&name) {
                node.missing.insert(name);
            }
        }
        Edit::Ghost(ns, name, ip) => node.ghosts.push((ns, name, ip)),
        Edit::DropGhost(k) => {
            if !node.ghosts.is_empty() {
                let k = k % node.ghosts.len();
                node.ghosts.remove(k);
            }
        }
        Edit::VethPrefix { iface, setting } => {
            node.iface_prefix = iface;
            node.veth_prefix = setting;
        }
        Edit::NodePort(v) => node.nodeport = nodeport_check(v),
    }
}
