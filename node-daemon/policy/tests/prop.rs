//! Random clusters: the compiled rules, run by the interpreter along real packet paths (same
//! node and across nodes, ingress and egress), must agree with the reference evaluator of the
//! Kubernetes semantics; the "ingress at any node" query must agree too, down to the deciding rule.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use policy::compile::{Compiler, NodePortCheck};
use policy::model::{
    Direction, Model, NamedPort, Namespace, Operator, Peer, Pod, Policy, PortMatch, PortSpec, Protocol, Requirement,
    Rule, Selector,
};
use policy::query::{ClusterSim, NodeView};
use policy::reference::{self, Endpoint, L4};
use policy::rule::CtState;
use policy::{compile, NodeCtx};
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
            proptest::sample::select(&[53u16, 80, 8080, 9000][..]),
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
        proptest::collection::vec(peer(), 0..3),
        proptest::collection::vec(port(), 0..3),
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
            labels,
            // 10.1.1.2 and 10.1.2.x fall inside the except blocks above.
            ip: has_ip.then(|| Ipv4Addr::new(10, 1, 1 + (i % 2) as u8, 2 + i as u8)),
            node: NODES[node].to_string(),
            ports,
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
        pods,
        policies,
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
            proptest::sample::select(&[53u16, 80, 85, 8080, 9000, 5353][..])
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
        reordered.pods.reverse();
        reordered.policies.reverse();
        let c = compile(&reordered, &ctx);
        prop_assert_eq!(&a.dataplane, &c.dataplane);
    }

    #[test]
    fn incremental_compile_equals_compile_from_scratch(
        m in model(),
        edits in proptest::collection::vec(edit(), 1..14),
        nodeport in any::<bool>(),
    ) {
        let mut m = m;
        let mut inc = Compiler::new();
        let check = |inc: &mut Compiler, m: &Model, step: usize| -> Result<(), TestCaseError> {
            let np = (nodeport && step % 3 != 2).then(|| NodePortCheck {
                tunnel_iface: "tunl0".into(),
                local_source: Ipv4Addr::new(10, 1, 1, 1),
                peer_sources: [Ipv4Addr::new(10, 1, 2, 1)].into(),
                kube_masq_mark: 0x4000,
            });
            let ctx = NodeCtx::from_model(m, "n1", "cali").unwrap().with_nodeport(np);
            let got = inc.compile(m, &ctx);
            let want = compile(m, &ctx);
            prop_assert_eq!(&got.dataplane, &want.dataplane, "after step {}", step);
            prop_assert_eq!(&got.errors, &want.errors);
            prop_assert_eq!(&got.policy_chains, &want.policy_chains);
            prop_assert_eq!(&got.stats, &want.stats);
            Ok(())
        };
        check(&mut inc, &m, 0)?;
        for (step, e) in edits.into_iter().enumerate() {
            apply_edit(&mut m, e);
            check(&mut inc, &m, step + 1)?;
        }
    }
}

/// One thing that happens to a cluster between two compiles.
#[derive(Debug, Clone)]
enum Edit {
    /// Pod `pod<i>` created, or changed (labels, address, ports, even namespace).
    Pod(usize, Pod),
    DropPod(usize),
    /// Pod `pod<i>` takes the address of `pod<j>` (an address reused before the old pod is gone).
    ReuseIp(usize, usize),
    Policy(usize, Policy),
    DropPolicy(usize),
    Namespace(usize, BTreeMap<String, String>),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (0..10usize).prop_flat_map(|i| pod(i).prop_map(move |p| Edit::Pod(i, p))),
        1 => (0..10usize).prop_map(Edit::DropPod),
        1 => (0..10usize, 0..10usize).prop_map(|(i, j)| Edit::ReuseIp(i, j)),
        3 => (0..6usize).prop_flat_map(|i| policy(i).prop_map(move |p| Edit::Policy(i, p))),
        1 => (0..6usize).prop_map(Edit::DropPolicy),
        1 => (0..3usize, ns_labels()).prop_map(|(i, l)| Edit::Namespace(i, l)),
    ]
}

fn apply_edit(m: &mut Model, e: Edit) {
    match e {
        Edit::Pod(i, p) => match m.pods.iter_mut().find(|x| x.name == format!("pod{i}")) {
            Some(x) => *x = p,
            None => m.pods.push(p),
        },
        Edit::DropPod(i) => m.pods.retain(|x| x.name != format!("pod{i}")),
        Edit::ReuseIp(i, j) => {
            let ip = m.pods.iter().find(|x| x.name == format!("pod{j}")).and_then(|x| x.ip);
            if let Some(x) = m.pods.iter_mut().find(|x| x.name == format!("pod{i}")) {
                x.ip = ip;
            }
        }
        Edit::Policy(i, p) => match m.policies.iter_mut().find(|x| x.name == format!("p{i}")) {
            Some(x) => *x = p,
            None => m.policies.push(p),
        },
        Edit::DropPolicy(i) => m.policies.retain(|x| x.name != format!("p{i}")),
        Edit::Namespace(i, labels) => {
            let name = format!("ns{i}");
            m.namespaces.insert(name.clone(), Namespace { name, labels });
        }
    }
}
