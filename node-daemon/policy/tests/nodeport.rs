//! Preserve-source (issue 6): service traffic that kube-proxy forwards to a pod on another node is
//! checked against that pod's ingress policy by the node that received it, with the client's own
//! address, and the destination node trusts exactly its peers' NodePort sources through the
//! tunnel. Seed 000's cluster and its first policy, through the compiled rules of both nodes.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::net::Ipv4Addr;

use common::Cluster;
use policy::compile::{NodePortCheck, KUBE_PROXY_MASQ_MARK, MARK_CHECKED};
use policy::interp::{Interpreter, Packet, Trace, Verdict};
use policy::{compile, NodeCtx};

const DASHBOARD: &str = "10.233.96.32";
const BAR_NODE1: &str = "10.233.90.5";
const BAZ_NODE1: &str = "10.233.90.6";
const LB: &str = "10.2.3.4";

fn seed000() -> Cluster {
    Cluster::new()
        .ns("tekton-pipelines", &[])
        .ns("bar", &[("region", "bar")])
        .ns("baz", &[("region", "baz")])
        .pod(
            "tekton-pipelines/tekton-dashboard",
            &[("app", "dashboard")],
            DASHBOARD,
            "node2",
        )
        .pod("bar/client-node1", &[], BAR_NODE1, "node1")
        .pod("baz/client-node1", &[], BAZ_NODE1, "node1")
        .policy(include_str!("../../../tests/scenarios/tekton/policy-1-ipblock.yaml"))
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// NodePort source = second address of each node's block.
fn check(local: &str, peers: &[&str]) -> NodePortCheck {
    NodePortCheck {
        tunnel_iface: "tunl0".into(),
        local_source: ip(local),
        peer_sources: peers.iter().map(|p| ip(p)).collect(),
        kube_masq_mark: KUBE_PROXY_MASQ_MARK,
    }
}

struct Node {
    interp: Interpreter,
    ctx: NodeCtx,
    nat: Vec<String>,
}

fn node(c: &Cluster, name: &str, np: Option<NodePortCheck>) -> Node {
    let ctx = NodeCtx::from_model(&c.model, name, "cali").unwrap().with_nodeport(np);
    let compiled = compile(&c.model, &ctx);
    let nat = compiled
        .dataplane
        .chains
        .iter()
        .filter(|((t, _), _)| *t == conf::dataplane::Table::Nat)
        .flat_map(|(_, rules)| rules.iter().cloned())
        .collect();
    Node {
        interp: Interpreter::new(&compiled.dataplane).unwrap(),
        ctx,
        nat,
    }
}

impl Node {
    fn iface(&self, pod: &str) -> String {
        self.ctx.workloads.iter().find(|w| w.pod == pod).unwrap().iface.clone()
    }

    fn iface_in(&self, namespace: &str) -> String {
        let w = self.ctx.workloads.iter().find(|w| w.namespace == namespace);
        w.unwrap().iface.clone()
    }
}

fn node1(preserve: bool) -> Node {
    node(
        &seed000(),
        "node1",
        preserve.then(|| check("10.233.90.1", &["10.233.96.1", "10.233.92.1"])),
    )
}

fn node2() -> Node {
    node(
        &seed000(),
        "node2",
        Some(check("10.233.96.1", &["10.233.90.1", "10.233.92.1"])),
    )
}

/// A NodePort connection (kube-proxy DNATed it and marked it for masquerade) forwarded by the
/// receiving node into the tunnel; `from` is the interface it came in on.
fn nodeport(n: &Node, src: &str, from: &str) -> Trace {
    n.interp.run(
        &Packet::l4(ip(src), ip(DASHBOARD), 6, 9097)
            .via(Some(from), Some("tunl0"))
            .translated(KUBE_PROXY_MASQ_MARK),
    )
}

fn checked(t: &Trace) -> bool {
    t.verdict == Verdict::Accept && t.mark & MARK_CHECKED != 0
}

#[test]
fn should_let_the_load_balancer_in_through_a_node_without_the_pod_and_mark_it_for_the_nodeport_source() {
    let n1 = node1(true);
    assert!(
        checked(&nodeport(&n1, LB, "eth0")),
        "ipBlock 10.2.3.4/32 allows the client"
    );
    assert_eq!(
        n1.nat,
        vec!["-o tunl0 -m mark --mark 0x20000/0x20000 -j SNAT --to-source 10.233.90.1".to_string()]
    );
}

#[test]
fn should_drop_at_the_receiving_node_what_the_destination_pod_denies() {
    let n1 = node1(true);
    let other = nodeport(&n1, "10.9.9.9", "eth0");
    assert_eq!(other.verdict, Verdict::Drop, "an address the policy does not name");
    let bar = nodeport(&n1, BAR_NODE1, &n1.iface_in("bar"));
    assert_eq!(bar.verdict, Verdict::Drop, "namespace bar is excluded: {bar:?}");
    assert!(
        checked(&nodeport(&n1, BAZ_NODE1, &n1.iface_in("baz"))),
        "namespace baz is allowed"
    );
}

#[test]
fn should_check_ipvs_forwards_in_output_but_leave_host_traffic_alone() {
    let n1 = node1(true);
    let ipvs = |src: &str| {
        n1.interp.run(
            &Packet::l4(ip(src), ip(DASHBOARD), 6, 9097)
                .via(None, Some("tunl0"))
                .forwarded_by_ipvs()
                .translated(KUBE_PROXY_MASQ_MARK),
        )
    };
    // OUTPUT has no final accept of warren's: the built-in chain's policy goes on.
    let lb = ipvs(LB);
    assert!(lb.verdict == Verdict::Continue && lb.mark & MARK_CHECKED != 0, "{lb:?}");
    assert_eq!(ipvs(BAR_NODE1).verdict, Verdict::Drop);
    // The host's own connection to a ClusterIP keeps the plain behaviour (masqueraded to
    // tunl0's address, judged by the destination node).
    let host = n1.interp.run(
        &Packet::l4(ip("10.102.123.117"), ip(DASHBOARD), 6, 9097)
            .via(None, Some("tunl0"))
            .translated(KUBE_PROXY_MASQ_MARK),
    );
    assert_eq!(host.verdict, Verdict::Continue);
    assert_eq!(host.mark & MARK_CHECKED, 0);
}

#[test]
fn should_leave_unmasqueraded_service_traffic_to_the_destination_node() {
    // A pod's ClusterIP connection keeps its source (kube-proxy does not mark it): the
    // destination node judges it, with the namespace it comes from.
    let n1 = node1(true);
    let t = n1.interp.run(
        &Packet::l4(ip(BAR_NODE1), ip(DASHBOARD), 6, 9097)
            .via(Some(&n1.iface_in("bar")), Some("tunl0"))
            .translated(0),
    );
    assert_eq!(t.verdict, Verdict::Accept, "bar has no egress policy");
    assert_eq!(t.mark & MARK_CHECKED, 0);
}

#[test]
fn should_trust_peers_nodeport_sources_only_through_the_tunnel() {
    let n2 = node2();
    let dash = n2.iface("tekton-dashboard");
    let to_dash = |src: &str, from: &str| {
        n2.interp
            .run(&Packet::l4(ip(src), ip(DASHBOARD), 6, 9097).via(Some(from), Some(&dash)))
            .verdict
    };
    assert_eq!(
        to_dash("10.233.90.1", "tunl0"),
        Verdict::Accept,
        "node1's NodePort source"
    );
    assert_eq!(
        to_dash("10.233.92.1", "tunl0"),
        Verdict::Accept,
        "node3's NodePort source"
    );
    assert_eq!(
        to_dash("10.233.90.0", "tunl0"),
        Verdict::Drop,
        "node1's tunl0 address (plain SNAT)"
    );
    assert_eq!(to_dash("10.233.90.1", "eth0"), Verdict::Drop, "not through the tunnel");
    assert_eq!(to_dash(LB, "eth0"), Verdict::Accept, "the policy's own ipBlock");
}

#[test]
fn should_not_let_a_pod_borrow_a_nodeport_source() {
    let c = seed000().pod("bar/mallory", &[], "10.233.96.9", "node2");
    let n2 = node(&c, "node2", Some(check("10.233.96.1", &["10.233.90.1"])));
    let from = n2.iface("mallory");
    let dash = n2.iface("tekton-dashboard");
    let t = n2
        .interp
        .run(&Packet::l4(ip("10.233.90.1"), ip(DASHBOARD), 6, 9097).via(Some(&from), Some(&dash)));
    assert_eq!(t.verdict, Verdict::Drop, "anti-spoofing: {t:?}");
}

#[test]
fn should_police_ipvs_deliveries_to_local_pods_in_both_modes() {
    for preserve in [false, true] {
        let n2 = node(
            &seed000(),
            "node2",
            preserve.then(|| check("10.233.96.1", &["10.233.90.1"])),
        );
        let dash = n2.iface("tekton-dashboard");
        let ipvs = |src: &str| {
            n2.interp
                .run(
                    &Packet::l4(ip(src), ip(DASHBOARD), 6, 9097)
                        .via(None, Some(&dash))
                        .forwarded_by_ipvs()
                        .translated(KUBE_PROXY_MASQ_MARK),
                )
                .verdict
        };
        assert_ne!(ipvs(LB), Verdict::Drop);
        assert_eq!(ipvs(BAR_NODE1), Verdict::Drop);
        // The node itself (kubelet's probes) still reaches its pods.
        let probe = n2
            .interp
            .run(&Packet::l4(ip("10.102.123.104"), ip(DASHBOARD), 6, 9097).via(None, Some(&dash)));
        assert_ne!(probe.verdict, Verdict::Drop);
    }
}

#[test]
fn should_change_nothing_in_plain_mode() {
    let n1 = node1(false);
    let t = nodeport(&n1, LB, "eth0");
    assert_eq!(t.verdict, Verdict::Continue, "not warren's to decide: {t:?}");
    assert!(n1.nat.is_empty());
}
