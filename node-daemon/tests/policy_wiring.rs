//! The policy wiring end to end against the in-memory kernel: API objects → compile → reconcile →
//! the chains and sets the fake kernel holds.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use conf::daemon::IpipMode;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use node_daemon::metrics::Metrics;
use node_daemon::netlink::FakeNet;
use node_daemon::policy_sync::{build, PolicyTracker};
use node_daemon::reconcile::{LocalNode, Reconciler};
use node_daemon::routes::NodeInfo;
use node_daemon::writer::fake::FakeKernel;
use node_daemon::writer::{Backend, Writer};
use policy::compile::policy_chain_name;
use policy::model::{Direction, PolicyRef};
use serde_json::json;

const NODE: &str = "node1";

fn reconciler() -> Reconciler<FakeNet, FakeKernel> {
    Reconciler::new(
        FakeNet::default(),
        Writer::new(FakeKernel::new(), Backend::nft()),
        LocalNode {
            name: NODE.into(),
            block: "10.233.90.0/24".parse().unwrap(),
            ip: Some("10.102.123.117".parse().unwrap()),
            underlay_subnet: None,
            mtu: 1480,
            mode: IpipMode::Always,
            pool: "10.233.64.0/18".parse().unwrap(),
            nat_outgoing: true,
        },
        Arc::new(Metrics::default()),
    )
}

fn nodes() -> Vec<NodeInfo> {
    vec![
        NodeInfo {
            name: NODE.into(),
            internal_ip: Some("10.102.123.117".parse().unwrap()),
            block: Some("10.233.90.0/24".parse().unwrap()),
        },
        NodeInfo {
            name: "node2".into(),
            internal_ip: Some("10.102.123.104".parse().unwrap()),
            block: Some("10.233.96.0/24".parse().unwrap()),
        },
    ]
}

fn ns(name: &str, labels: serde_json::Value) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, app: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "labels": {"app": app},
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
            {"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip}
    }))
    .unwrap()
}

fn deny_all_but_from(ns: &str, name: &str, from_ns_label: &str) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": {"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"team": from_ns_label}}}]}]}
    }))
    .unwrap()
}

fn egress_block(ns: &str, name: &str, cidr: &str) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name},
        "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": cidr}}]}]}
    }))
    .unwrap()
}

fn chain_of(ns: &str, name: &str, d: Direction) -> String {
    policy_chain_name(
        &PolicyRef {
            namespace: ns.into(),
            name: name.into(),
        },
        d,
    )
}

struct Cluster {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    policies: Vec<NetworkPolicy>,
}

impl Cluster {
    fn new() -> Self {
        Cluster {
            namespaces: vec![ns("prod", json!({"team": "prod"})), ns("dev", json!({"team": "dev"}))],
            pods: vec![
                pod("prod", "a", NODE, "10.233.90.2", "a"),
                pod("prod", "b", "node2", "10.233.96.2", "b"),
                pod("dev", "c", NODE, "10.233.90.3", "c"),
            ],
            policies: vec![],
        }
    }

    async fn sync(
        &self,
        r: &mut Reconciler<FakeNet, FakeKernel>,
        t: &mut PolicyTracker,
    ) -> (node_daemon::policy_sync::PolicyBuild, Vec<policy::PolicyError>) {
        let b = build(&self.namespaces, &self.pods, &self.policies, NODE, "cali").unwrap();
        let new_errors = t.compiled(&b, &r.metrics);
        r.reconcile(&nodes(), Some(b.dataplane.clone()), true).await.unwrap();
        t.applied(&b, &r.metrics);
        (b, new_errors)
    }
}

#[tokio::test]
async fn should_program_a_created_policy_and_sweep_it_once_deleted() {
    let mut r = reconciler();
    let mut t = PolicyTracker::default();
    let mut c = Cluster::new();
    c.sync(&mut r, &mut t).await;
    let chain = chain_of("prod", "allow-prod", Direction::Ingress);
    let k = r.writer.runner();
    assert_eq!(k.rules("filter", &chain), None, "no policy yet, no policy chain");
    let input = k.rules("filter", "WARREN-INPUT").unwrap();
    assert!(
        input.iter().any(|x| x.contains("WARREN-WL-TO-HOST")) && input.iter().any(|x| x.contains("-p 4 -j DROP")),
        "WARREN-INPUT holds both the workload checks and the overlay's IPIP rules: {input:?}"
    );

    c.policies.push(deny_all_but_from("prod", "allow-prod", "prod"));
    let (b, _) = c.sync(&mut r, &mut t).await;
    assert!(b.errors.is_empty());
    let rules = r
        .writer
        .runner()
        .rules("filter", &chain)
        .expect("policy chain programmed");
    assert!(rules.iter().any(|x| x.contains("--match-set")), "{rules:?}");
    let in_metrics = r.metrics.render();
    assert!(in_metrics.contains(&format!("warren_policy_rules {}\n", b.stats.rules)));
    assert!(b.stats.rules > 0);

    c.policies.clear();
    c.sync(&mut r, &mut t).await;
    assert_eq!(
        r.writer.runner().rules("filter", &chain),
        None,
        "deleted policy's chain swept"
    );
}

#[tokio::test]
async fn should_report_a_malformed_policy_once_and_keep_enforcing_the_others() {
    let mut r = reconciler();
    let mut t = PolicyTracker::default();
    let mut c = Cluster::new();
    c.policies.push(egress_block("prod", "bad-cidr", "10.2.3.4/40"));
    c.policies.push(deny_all_but_from("prod", "allow-prod", "prod"));
    let (b, new) = c.sync(&mut r, &mut t).await;
    assert_eq!(b.errors.len(), 1, "{:?}", b.errors);
    assert_eq!(new.len(), 1);
    assert_eq!(
        (new[0].policy.namespace.as_str(), new[0].policy.name.as_str()),
        ("prod", "bad-cidr")
    );
    assert!(r.metrics.render().contains("\nwarren_policy_errors 1\n"));
    let good = chain_of("prod", "allow-prod", Direction::Ingress);
    assert!(
        r.writer.runner().rules("filter", &good).is_some(),
        "the good policy is enforced"
    );
    assert_eq!(
        r.writer
            .runner()
            .rules("filter", &chain_of("prod", "bad-cidr", Direction::Egress)),
        None
    );

    let (_, new) = c.sync(&mut r, &mut t).await;
    assert!(new.is_empty(), "an unchanged error is not reported again");

    c.policies[0] = egress_block("prod", "bad-cidr", "10.2.3.4/32");
    let (b, _) = c.sync(&mut r, &mut t).await;
    assert!(b.errors.is_empty());
    assert!(r.metrics.render().contains("\nwarren_policy_errors 0\n"));
    assert!(r
        .writer
        .runner()
        .rules("filter", &chain_of("prod", "bad-cidr", Direction::Egress))
        .is_some());
}

#[tokio::test]
async fn should_program_new_local_pods_and_count_them_once() {
    let mut r = reconciler();
    let mut t = PolicyTracker::default();
    let mut c = Cluster::new();
    c.sync(&mut r, &mut t).await;
    assert!(
        r.metrics.render().contains("\nwarren_pod_programmed 2\n"),
        "two local pods"
    );
    assert!(r.metrics.render().contains("\nwarren_policy_local_workloads 2\n"));

    c.pods.push(pod("dev", "d", NODE, "10.233.90.4", "d"));
    let (b, _) = c.sync(&mut r, &mut t).await;
    assert_eq!(b.workloads.len(), 3);
    let key = conf::names::workload_key(Some("dev"), Some("d"), "");
    let iface = conf::names::host_veth_name("cali", &key).unwrap();
    let programmed = |r: &Reconciler<FakeNet, FakeKernel>| {
        r.writer
            .runner()
            .set_members(policy::compile::SET_WORKLOADS)
            .unwrap_or_default()
            .contains(&format!("10.233.90.4,{iface}"))
    };
    assert!(programmed(&r), "the new pod's address and interface are known");
    let text = r.metrics.render();
    assert!(text.contains("\nwarren_pod_programmed 3\n"), "{text}");
    c.sync(&mut r, &mut t).await;
    assert!(
        r.metrics.render().contains("\nwarren_pod_programmed 3\n"),
        "counted once"
    );

    c.pods.retain(|p| p.metadata.name.as_deref() != Some("d"));
    c.sync(&mut r, &mut t).await;
    assert!(!programmed(&r), "gone with its pod");
}
