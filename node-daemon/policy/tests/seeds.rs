//! The seeds' examples: seed 002's example policies and its tester's case table (where
//! kube-router failed same-node isolation — every row runs same-node AND cross-node) and seed
//! 001's examples, from the data files under tests/scenarios/policy/seeds/ (shared with the lab
//! test); seed 003's policy and seed 000's scenario policy inline.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

#[path = "common/seeddata.rs"]
mod seeddata;

use common::{tcp, Cluster};
use policy::model::Protocol;
use policy::reference::L4;
use seeddata::SeedFile;

/// The pure half of the seed cases: each file's cluster, step by step, through the compiled rules
/// of every node (a packet sent along its real path) and the reference evaluator, which must agree
/// with each other and with the file. The same files drive lab/tests/policy_seeds.rs.
#[test]
fn seed_files_hold_under_the_compiled_rules_and_the_reference() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for path in seeddata::all_files() {
        let f = SeedFile::load(&path);
        let base = cluster_of(&f);
        // Baseline: with no policy every cell connects, so each later "blocked" is a policy's doing.
        for cell in f.baseline_cells() {
            checked += 1;
            if !base.allows(&ep(&f, &cell.from), &ep(&f, &cell.to), l4(&cell)) {
                failures.push(format!("{}: no policy: {cell} blocked", f.title));
            }
        }
        for (i, step) in f.steps.iter().enumerate() {
            let mut c = base.clone();
            for manifest in f.policies_after(i).values() {
                c = c.policy(manifest);
            }
            for (cell, want) in f.step_cells(i) {
                checked += 1;
                let got = c.allows(&ep(&f, &cell.from), &ep(&f, &cell.to), l4(&cell));
                if got != want {
                    failures.push(format!("{}: {}: {cell}: want {want}, got {got}", f.title, step.name));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} cells wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        checked > 500,
        "only {checked} cells: the data files lost their matrices?"
    );
}

#[test]
fn seed_data_rejects_a_vacuous_blocked_cell() {
    // A destination that does not serve the port would read "blocked" for the wrong reason.
    let text = "title: t\ncluster:\n  namespaces: {a: {}}\n  pod_ports: [80/TCP]\n  pods:\n    a/x: {node: node1}\n    a/y: {node: node2}\nsteps:\n- name: s\n  expect: [a/x -> a/y 81/TCP blocked]\n";
    let dir = std::env::temp_dir().join(format!("seeddata-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bad.yaml");
    std::fs::write(&p, text).unwrap();
    let res = std::panic::catch_unwind(|| SeedFile::load(&p));
    std::fs::remove_dir_all(&dir).unwrap();
    let err = res.expect_err("a cell to an unserved port must be rejected");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("does not serve 81/TCP"), "{msg}");
}

#[test]
fn seed_data_matrix_patterns() {
    let text = "title: t\ncluster:\n  namespaces: {a: {}, b: {}}\n  pod_ports: [80/TCP]\n  pods:\n    a/x: {node: node1}\n    a/y: {node: node2}\n    b/z: {node: node1}\nsteps:\n- name: s\n  matrix: [{port: 80/TCP, blocked: ['!a/* -> a/*', 'a/x -> *'], allowed: ['a/x -> b/z']}]\n";
    let f: SeedFile = serde_yaml::from_str(text).unwrap();
    let cells = f.step_cells(0);
    let blocked: Vec<String> = cells.iter().filter(|(_, w)| !**w).map(|(c, _)| c.to_string()).collect();
    assert_eq!(
        blocked,
        ["a/x -> a/y 80/TCP", "b/z -> a/x 80/TCP", "b/z -> a/y 80/TCP"],
        "self cells are left out, `allowed` wins over `blocked`"
    );
    assert_eq!(cells.len(), 6);
}

/// Pod addresses from each node's block, in the files' pod order (the lab's IPAM hands out
/// others; no file's ipBlock comes near the pool).
fn cluster_of(f: &SeedFile) -> Cluster {
    let mut c = Cluster::new();
    for (ns, labels) in &f.cluster.namespaces {
        let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        c = c.ns(ns, &l);
    }
    let mut next: std::collections::BTreeMap<&str, u8> = Default::default();
    for (at, p) in &f.cluster.pods {
        let third = match p.node.as_str() {
            "node1" => 90,
            "node2" => 96,
            _ => 92,
        };
        let n = next.entry(p.node.as_str()).or_insert(2);
        let ip = format!("10.233.{third}.{n}");
        *n += 1;
        let l: Vec<(&str, &str)> = p.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        c = c.pod(at, &l, &ip, &p.node);
    }
    c
}

/// The lab's `host:NAME` (an outside host) as the test cluster names it.
fn ep(f: &SeedFile, who: &str) -> String {
    match who.strip_prefix("host:") {
        Some(h) => format!("ext:{}", f.cluster.hosts[h].ip),
        None => who.to_string(),
    }
}

fn l4(c: &seeddata::Cell) -> L4 {
    let p = match c.proto {
        seeddata::Proto::Tcp => Protocol::Tcp,
        seeddata::Proto::Udp => Protocol::Udp,
        seeddata::Proto::Sctp => Protocol::Sctp,
    };
    Some((p, c.port))
}

#[test]
fn seed003_drop_inter_namespace() {
    let c = Cluster::new()
        .ns("kube-system", &[("name", "kube-system")])
        .ns("ingress", &[])
        .ns("default", &[])
        .pod(
            "ingress/kuard-vnode-ingress-7b6868dd49-drldk",
            &[("app", "kuard-vnode-ingress")],
            "10.13.76.19",
            "node1",
        )
        .pod("kube-system/nginx-ingress", &[], "10.13.76.17", "node1")
        .pod("default/kuard-vnode-bd88cbf77-n8dzg", &[], "10.13.76.36", "node2")
        .policy(
            "
metadata: {name: drop-inter-namespace, namespace: ingress}
spec:
  podSelector: {matchLabels: {app: kuard-vnode-ingress}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {name: kube-system}}
    ports:
    - {protocol: TCP, port: 8080}
",
        );
    assert!(!c.allows(
        "default/kuard-vnode-bd88cbf77-n8dzg",
        "ingress/kuard-vnode-ingress-7b6868dd49-drldk",
        tcp(8080)
    ));
    assert!(c.allows(
        "kube-system/nginx-ingress",
        "ingress/kuard-vnode-ingress-7b6868dd49-drldk",
        tcp(8080)
    ));
    // The seed's veth name, known to node1 with the pod's address and nowhere else.
    let sim = c.sim();
    let pod = match c.endpoint("ingress/kuard-vnode-ingress-7b6868dd49-drldk") {
        policy::Endpoint::Pod(i) => i,
        _ => unreachable!(),
    };
    assert_eq!(sim.iface_of(pod), Some("calid3b581beed8"));
    let workloads = |node: &str| {
        sim.nodes[node].compiled.dataplane.ipsets[policy::compile::SET_WORKLOADS]
            .members
            .clone()
    };
    assert!(workloads("node1").contains("10.13.76.19,calid3b581beed8"));
    assert!(!workloads("node2").iter().any(|m| m.ends_with(",calid3b581beed8")));
}

#[test]
fn seed000_scenario_policy_answers_at_every_node() {
    let c = Cluster::new()
        .ns("tekton-pipelines", &[])
        .ns("bar", &[("region", "bar")])
        .ns("foo", &[("region", "foo")])
        .pod(
            "tekton-pipelines/tekton-dashboard-75c65d785b-xbgk6",
            &[("app", "tekton-dashboard")],
            "10.233.96.32",
            "node2",
        )
        .pod("bar/b", &[], "10.233.90.40", "node1")
        .pod("foo/f", &[], "10.233.92.40", "node3")
        .policy(
            "
metadata: {name: dashboard, namespace: tekton-pipelines}
spec:
  podSelector: {matchLabels: {app: tekton-dashboard}}
  ingress:
  - from:
    - ipBlock: {cidr: 10.2.3.4/32}
    - namespaceSelector:
        matchExpressions: [{key: region, operator: NotIn, values: [bar]}]
",
        );
    assert!(c.allows(
        "ext:10.2.3.4",
        "tekton-pipelines/tekton-dashboard-75c65d785b-xbgk6",
        tcp(9097)
    ));
    assert!(!c.allows("bar/b", "tekton-pipelines/tekton-dashboard-75c65d785b-xbgk6", tcp(9097)));
    assert!(c.allows("foo/f", "tekton-pipelines/tekton-dashboard-75c65d785b-xbgk6", tcp(9097)));
    // Every node, even those without the dashboard, answers the same from WARREN-INGRESS-BY-DST.
    let sim = c.sim();
    let dash = "10.233.96.32".parse().unwrap();
    for (node, view) in &sim.nodes {
        let lb = view.ingress_allows(dash, "10.2.3.4".parse().unwrap(), tcp(9097));
        assert!(lb.allowed, "{node}");
        let bar = view.ingress_allows(dash, "10.233.90.40".parse().unwrap(), tcp(9097));
        assert!(!bar.allowed, "{node}: {bar}");
        let tunl = view.ingress_allows(dash, "10.233.90.0".parse().unwrap(), tcp(9097));
        assert!(!tunl.allowed, "{node}: a SNATed source is not the load balancer");
    }
}
