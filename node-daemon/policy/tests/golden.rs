//! Golden files of the rendered output (`ipset restore` lines + `iptables-restore` payload) for
//! small inputs. Each file starts with a header naming its input. Regenerate after an intended
//! change with `UPDATE_GOLDEN=1 cargo test -p policy --test golden` and review the diff.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::Cluster;
use policy::compile::render_text;
use policy::{compile, NodeCtx};

fn check(file: &str, header: &str, c: &Cluster, node: &str) {
    let ctx = NodeCtx::from_model(&c.model, node, "cali").unwrap();
    let compiled = compile(&c.model, &ctx);
    assert!(compiled.errors.is_empty(), "{:?}", compiled.errors);
    let mut text = String::new();
    for l in header.trim().lines() {
        text.push_str(&format!("# {}\n", l.trim()));
    }
    text.push_str(&render_text(&compiled.dataplane));
    let path = format!("{}/tests/golden/{file}", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (run with UPDATE_GOLDEN=1)"));
    assert_eq!(
        text, want,
        "{file} differs; if intended, regenerate with UPDATE_GOLDEN=1"
    );
}

#[test]
fn golden_no_policy() {
    let c = Cluster::new().pod("default/a", &[("app", "a")], "10.233.90.2", "node1");
    check(
        "no-policy.txt",
        "Input: node node1, veth prefix cali; one pod default/a (app=a, 10.233.90.2) on node1; no NetworkPolicy.",
        &c,
        "node1",
    );
}

#[test]
fn golden_seed003_drop_inter_namespace() {
    let c = Cluster::new()
        .ns("kube-system", &[("name", "kube-system")])
        .ns("ingress", &[])
        .pod(
            "ingress/kuard-vnode-ingress-7b6868dd49-drldk",
            &[("app", "kuard-vnode-ingress")],
            "10.13.76.19",
            "node1",
        )
        .pod("kube-system/nginx", &[], "10.13.76.17", "node1")
        .policy(
            "
metadata: {name: drop-inter-namespace, namespace: ingress}
spec:
  podSelector: {matchLabels: {app: kuard-vnode-ingress}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {name: kube-system}}}]
    ports: [{protocol: TCP, port: 8080}]
",
        );
    check(
        "seed003.txt",
        "Input: node node1, veth prefix cali; namespaces kube-system (name=kube-system), ingress;
         pods ingress/kuard-vnode-ingress-7b6868dd49-drldk (app=kuard-vnode-ingress, 10.13.76.19) and
         kube-system/nginx (10.13.76.17), both on node1; seed 003's policy drop-inter-namespace:
         ingress from namespaceSelector name=kube-system on TCP 8080.",
        &c,
        "node1",
    );
}

#[test]
fn golden_egress_ip_block_except_and_named_ports() {
    let c = Cluster::new()
        .pod_with_ports(
            "a/web",
            &[("app", "web")],
            "10.233.90.2",
            "node1",
            &[("http", policy::Protocol::Tcp, 8080)],
        )
        .pod_with_ports(
            "a/api",
            &[("app", "api")],
            "10.233.96.2",
            "node2",
            &[("http", policy::Protocol::Tcp, 9090)],
        )
        .policy(
            "
metadata: {name: web, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
  ingress:
  - ports: [{port: http}, {protocol: SCTP, port: 7000, endPort: 7010}]
  egress:
  - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
  - to: [{podSelector: {matchLabels: {app: api}}}, {ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}, {ipBlock: {cidr: 172.16.0.0/12}}]
    ports: [{port: http}, {port: 8443}]
",
        );
    check(
        "egress-ipblock-named-ports.txt",
        "Input: node node1, veth prefix cali; namespace a; pods a/web (app=web, 10.233.90.2, node1,
         containerPort http=TCP/8080) and a/api (app=api, 10.233.96.2, node2, http=TCP/9090);
         policy a/web: ingress on named port http and SCTP 7000-7010 from anywhere; egress to
         0.0.0.0/0 except 10.0.0.0/8, and to app=api pods, 192.168.0.0/16 except
         192.168.1.0/24 or 172.16.0.0/12 (three peers: one list:set) on named port http and
         on 8443.",
        &c,
        "node1",
    );
}

/// A rule's list:set is named after the rule, not its peers: changing only the peers keeps
/// every iptables rule and changes the list's members (an ipset update, no iptables write);
/// changing its ports, or outgrowing the list's size class, names another list.
#[test]
fn list_of_a_rule_keeps_its_name_while_only_its_peers_change() {
    let yaml = |peers: &[&str], port: u16| {
        let from: Vec<String> = peers
            .iter()
            .map(|p| format!("{{podSelector: {{matchLabels: {{app: {p}}}}}}}"))
            .collect();
        format!(
            "metadata: {{name: web, namespace: a}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  \
             ingress:\n  - from: [{}]\n    ports: [{{protocol: TCP, port: {port}}}]\n",
            from.join(", ")
        )
    };
    let compiled = |peers: &[&str], port: u16| {
        let c = Cluster::new()
            .pod("a/web", &[("app", "web")], "10.233.90.2", "node1")
            .policy(&yaml(peers, port));
        let ctx = NodeCtx::from_model(&c.model, "node1", "cali").unwrap();
        let out = compile(&c.model, &ctx);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        out.dataplane
    };
    let lists = |dp: &conf::dataplane::DesiredDataplane| -> Vec<(String, usize)> {
        dp.ipsets
            .iter()
            .filter(|(_, s)| s.kind == "list:set")
            .map(|(n, s)| (n.clone(), s.members.len()))
            .collect()
    };
    let three = compiled(&["a", "b", "c"], 80);
    let four = compiled(&["a", "b", "d", "e"], 80);
    assert_eq!(three.chains, four.chains, "same rules, other peers");
    let (l3, l4) = (lists(&three), lists(&four));
    assert_eq!((l3.len(), l3[0].0 == l4[0].0), (1, true), "{l3:?} {l4:?}");
    assert_eq!((l3[0].1, l4[0].1), (3, 4));
    // Other ports: another list, so the old rules never see the new ports' peers.
    let other_port = compiled(&["a", "b", "c"], 81);
    assert_ne!(lists(&other_port)[0].0, l3[0].0);
    // Up to 8 members one size class; the ninth peer names a list created larger.
    let nine: Vec<String> = (0..9).map(|i| format!("p{i}")).collect();
    let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
    assert_eq!(lists(&compiled(&nine[..8], 80))[0].0, l3[0].0);
    assert_ne!(lists(&compiled(&nine, 80))[0].0, l3[0].0);
}
