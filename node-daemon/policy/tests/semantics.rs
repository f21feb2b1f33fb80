//! One test (or a few) per bullet of issue 5's "Semantics" and "Security defaults", each
//! checked through the compiled rules on the packet's real path and against the reference.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::{sctp, tcp, udp, Cluster};
use policy::interp::{Interpreter, Packet, Verdict};
use policy::model::Protocol;
use policy::reference::Endpoint;
use policy::rule::CtState;
use policy::{compile, ingress_allows, NodeCtx};

fn base() -> Cluster {
    Cluster::new()
        .ns("a", &[("team", "a")])
        .ns("b", &[("team", "b")])
        .pod("a/web", &[("app", "web")], "10.233.90.10", "node1")
        .pod("a/db", &[("app", "db")], "10.233.90.11", "node1")
        .pod("a/client", &[("app", "client")], "10.233.96.10", "node2")
        .pod("b/client", &[("app", "client")], "10.233.96.11", "node2")
        .pod("b/other", &[("app", "other")], "10.233.90.12", "node1")
}

const DENY_ALL_A: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: a}
spec:
  podSelector: {}
"#;

// --- isolation -------------------------------------------------------------------------------

#[test]
fn unselected_pods_accept_everything() {
    let c = base();
    for src in ["a/client", "b/client", "b/other", "ext:8.8.8.8", "host:node3"] {
        assert!(c.allows(src, "a/web", tcp(80)), "{src}");
    }
}

#[test]
fn a_selecting_policy_isolates_same_node_and_cross_node() {
    let c = base().policy(DENY_ALL_A);
    assert!(!c.allows("a/db", "a/web", tcp(80)), "same node");
    assert!(!c.allows("b/other", "a/web", tcp(80)), "same node, other namespace");
    assert!(!c.allows("a/client", "a/web", tcp(80)), "cross node");
    assert!(!c.allows("ext:8.8.8.8", "a/web", tcp(80)));
    assert!(c.allows("b/client", "b/other", tcp(80)), "namespace b not selected");
}

#[test]
fn policy_types_default_as_the_api_defines_them() {
    // No policyTypes and only egress rules: Ingress and Egress both apply.
    let c = base().policy(
        r#"
metadata: {name: eg, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
"#,
    );
    let p = &c.model.policies[0];
    assert!(p.ingress_type && p.egress_type);
    assert!(!c.allows("a/client", "a/web", tcp(80)), "ingress isolated by default");
    assert!(c.allows("a/web", "a/db", tcp(5432)));
    assert!(!c.allows("a/web", "b/other", tcp(5432)));

    // policyTypes [Egress] only: ingress stays open.
    let c = base().policy(
        r#"
metadata: {name: eg, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
"#,
    );
    assert!(c.allows("a/client", "a/web", tcp(80)));
    assert!(!c.allows("a/web", "a/db", tcp(5432)));
    assert!(!c.allows("a/web", "ext:8.8.8.8", udp(53)));
}

#[test]
fn policies_are_additive_and_both_ends_must_allow() {
    let c = base()
        .policy(DENY_ALL_A)
        .policy(
            r#"
metadata: {name: allow-client, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]
"#,
        )
        .policy(
            r#"
metadata: {name: allow-db, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: db}}}]}]
"#,
        );
    assert!(c.allows("a/client", "a/web", tcp(80)));
    assert!(c.allows("a/db", "a/web", tcp(80)));
    assert!(!c.allows("b/client", "a/web", tcp(80)));
    // Source egress denies what the destination's ingress allows.
    let c = c.policy(
        r#"
metadata: {name: client-no-egress, namespace: a}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
"#,
    );
    assert!(!c.allows("a/client", "a/web", tcp(80)));
}

// --- peers -----------------------------------------------------------------------------------

#[test]
fn pod_selector_peers_are_in_the_policy_namespace_only() {
    let c = base().policy(
        r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]
"#,
    );
    assert!(c.allows("a/client", "a/web", tcp(80)));
    assert!(!c.allows("b/client", "a/web", tcp(80)), "same labels, other namespace");
}

#[test]
fn namespace_and_pod_selector_together_mean_and_separately_mean_or() {
    let and = base().policy(
        r#"
metadata: {name: and, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
      podSelector: {matchLabels: {app: client}}
"#,
    );
    assert!(and.allows("b/client", "a/web", tcp(80)));
    assert!(!and.allows("b/other", "a/web", tcp(80)));
    assert!(!and.allows("a/client", "a/web", tcp(80)));

    let or = base().policy(
        r#"
metadata: {name: or, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
    - podSelector: {matchLabels: {app: client}}
"#,
    );
    assert!(or.allows("b/client", "a/web", tcp(80)));
    assert!(or.allows("b/other", "a/web", tcp(80)));
    assert!(or.allows("a/client", "a/web", tcp(80)));
    assert!(!or.allows("a/db", "a/web", tcp(80)));
}

#[test]
fn empty_selectors_select_everything_in_their_scope() {
    let same_ns = base().policy(
        r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {}
  ingress: [{from: [{podSelector: {}}]}]
"#,
    );
    assert!(same_ns.allows("a/client", "a/web", tcp(80)));
    assert!(!same_ns.allows("b/client", "a/web", tcp(80)));
    let all_ns = base().policy(
        r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {}}]}]
"#,
    );
    assert!(all_ns.allows("b/client", "a/web", tcp(80)));
    assert!(
        !all_ns.allows("ext:8.8.8.8", "a/web", tcp(80)),
        "namespaceSelector {{}} is pods only"
    );
}

#[test]
fn absent_or_empty_from_means_all_sources() {
    for from in ["", "  - from: []\n", "  - {}\n"] {
        let yaml = format!(
            "metadata: {{name: p, namespace: a}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n{}",
            if from.is_empty() { "  - ports: []\n" } else { from }
        );
        let c = base().policy(&yaml);
        assert!(c.allows("b/client", "a/web", tcp(80)), "{yaml}");
        assert!(c.allows("ext:8.8.8.8", "a/web", udp(53)), "{yaml}");
    }
    // `ingress: []` (no rules) allows nothing.
    let c = base().policy("metadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress: []\n");
    assert!(!c.allows("b/client", "a/web", tcp(80)));
}

#[test]
fn match_expressions_in_notin_exists_doesnotexist() {
    let c = base().pod("a/nolabel", &[], "10.233.92.20", "node3").policy(
        r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions: [{key: team, operator: NotIn, values: [b]}]
      podSelector:
        matchExpressions: [{key: app, operator: In, values: [client, db]}]
  - from:
    - podSelector:
        matchExpressions: [{key: app, operator: DoesNotExist}]
"#,
    );
    assert!(c.allows("a/client", "a/web", tcp(80)));
    assert!(c.allows("a/db", "a/web", tcp(80)));
    assert!(!c.allows("b/client", "a/web", tcp(80)), "team NotIn [b]");
    assert!(c.allows("a/nolabel", "a/web", tcp(80)), "DoesNotExist");
    let c = base().policy(
        r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchExpressions: [{key: app, operator: Exists}]}
  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: team, operator: Exists}]}}]}]
"#,
    );
    assert!(c.allows("b/client", "a/web", tcp(80)));
    assert!(!c.allows("ext:1.2.3.4", "a/web", tcp(80)));
}

#[test]
fn not_in_matches_namespaces_without_the_label() {
    // Seed 000: "namespaces whose region NotIn [bar]" must include unlabelled namespaces.
    let c = base().ns("c", &[]).pod("c/x", &[], "10.233.92.30", "node3").policy(
        r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: team, operator: NotIn, values: [b]}]}}]}]
"#,
    );
    assert!(c.allows("c/x", "a/web", tcp(80)));
    assert!(!c.allows("b/client", "a/web", tcp(80)));
}

#[test]
fn ip_block_with_except() {
    let c = base().policy(
        r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}}]
  egress:
  - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.168.1.1/32]}}]
"#,
    );
    assert!(c.allows("ext:172.17.0.5", "a/web", tcp(80)));
    assert!(!c.allows("ext:172.17.1.5", "a/web", tcp(80)));
    assert!(!c.allows("ext:172.18.0.1", "a/web", tcp(80)));
    assert!(c.allows("a/web", "ext:8.8.8.8", udp(53)));
    assert!(c.allows("a/web", "ext:192.168.1.2", udp(53)));
    assert!(!c.allows("a/web", "ext:192.168.1.1", udp(53)));
    assert!(!c.allows("a/web", "a/db", tcp(5432)), "pod IPs are in 10/8");
    // hash:net cannot hold /0: the set holds both halves.
    let compiled = compile(&c.model, &NodeCtx::from_model(&c.model, "node1", "cali").unwrap());
    assert!(compiled
        .dataplane
        .ipsets
        .values()
        .any(|s| s.members.contains("0.0.0.0/1") && s.members.contains("128.0.0.0/1")));
}

// --- ports -----------------------------------------------------------------------------------

#[test]
fn numeric_ports_end_port_ranges_and_protocols() {
    let c = base().policy(
        r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - ports:
    - {port: 80}
    - {protocol: UDP, port: 53}
    - {protocol: SCTP, port: 9000, endPort: 9010}
    - {protocol: TCP, port: 30000, endPort: 30100}
"#,
    );
    assert!(c.allows("b/client", "a/web", tcp(80)));
    assert!(!c.allows("b/client", "a/web", udp(80)), "TCP is the default protocol");
    assert!(c.allows("b/client", "a/web", udp(53)));
    assert!(!c.allows("b/client", "a/web", tcp(53)));
    assert!(c.allows("b/client", "a/web", sctp(9005)));
    assert!(c.allows("b/client", "a/web", sctp(9010)));
    assert!(!c.allows("b/client", "a/web", sctp(9011)));
    assert!(c.allows("ext:1.1.1.1", "a/web", tcp(30050)));
    assert!(!c.allows("ext:1.1.1.1", "a/web", tcp(29999)));
    assert!(!c.allows("b/client", "a/web", None), "ICMP echo is not in a ports list");
}

/// The lines of policy `name`'s ingress chain, as node1 compiles them.
fn ingress_lines(c: &Cluster, name: &str) -> Vec<String> {
    let out = compile(&c.model, &NodeCtx::from_model(&c.model, "node1", "cali").unwrap());
    let (chain, _) = out
        .policy_chains
        .iter()
        .find(|(_, (p, d))| p.name == name && *d == policy::model::Direction::Ingress)
        .unwrap();
    out.dataplane.chains[&(conf::dataplane::Table::Filter, chain.clone())].to_vec()
}

#[test]
fn many_ports_of_one_protocol_share_lines_and_overlapping_rules_share_them_too() {
    // Sixteen TCP ports, two of them inside a range: more than one multiport match holds.
    let ports: Vec<String> = [
        22, 80, 443, 8443, 9090, 9100, 9200, 9300, 9400, 9500, 9600, 9700, 9800, 9900,
    ]
    .iter()
    .map(|p| format!("    - {{port: {p}}}"))
    .chain([
        "    - {port: 30000, endPort: 30100}".to_string(),
        "    - {port: 30050}".to_string(),
        "    - {port: 30101}".to_string(),
        "    - {protocol: UDP, port: 53}".to_string(),
        "    - {protocol: UDP, port: 5353}".to_string(),
    ])
    .collect();
    let yaml = format!(
        r#"
metadata: {{name: many, namespace: a}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - ports:
{}
  - from: [{{namespaceSelector: {{matchLabels: {{team: b}}}}}}]
    ports:
    - {{port: 443}}
  - from: [{{namespaceSelector: {{matchLabels: {{team: b}}}}}}]
    ports:
    - {{port: 443}}
"#,
        ports.join("\n")
    );
    let c = base().policy(&yaml);
    for p in [22, 80, 443, 9900, 30000, 30050, 30100, 30101] {
        assert!(c.allows("b/client", "a/web", tcp(p)), "tcp {p}");
    }
    for p in [21, 81, 444, 9901, 29999, 30102] {
        assert!(!c.allows("b/client", "a/web", tcp(p)), "tcp {p}");
    }
    assert!(c.allows("a/client", "a/web", udp(5353)));
    assert!(!c.allows("a/client", "a/web", udp(80)));
    assert!(!c.allows("a/client", "a/web", tcp(53)));

    // What the kernel is given: 14 single ports and one range (30000:30101 after merging) take
    // 16 slots, one more than a multiport match holds, so two TCP lines; one UDP line; and the
    // rules allowing team b on 443 add nothing, as the first rule allows 443 from everyone.
    let rules = ingress_lines(&c, "many");
    assert_eq!(rules.len(), 3, "{rules:#?}");
    assert!(
        rules[0].contains("-m multiport --dports 22,80,443,8443,9090,9100,9200,9300,9400,9500,9600,9700,9800,9900 ")
    );
    assert!(rules[1].contains("-m tcp --dport 30000:30101 "), "{}", rules[1]);
    assert!(rules[2].contains("-m multiport --dports 53,5353 "), "{}", rules[2]);
}

#[test]
fn a_rule_whose_ports_an_earlier_rule_covers_only_in_part_still_allows_the_rest() {
    let c = base().policy(
        r#"
metadata: {name: partly, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: b}}}]
    ports: [{port: 80}]
  - from: [{namespaceSelector: {matchLabels: {team: b}}}]
    ports: [{port: 80}, {port: 443}]
  - from: [{namespaceSelector: {matchLabels: {team: b}}}]
    ports: [{port: 80}, {port: 443}]
"#,
    );
    assert!(c.allows("b/client", "a/web", tcp(80)));
    assert!(
        c.allows("b/client", "a/web", tcp(443)),
        "443 comes from the second rule only"
    );
    assert!(!c.allows("b/client", "a/web", tcp(8080)));
    // The third rule repeats the second: two lines, not three.
    let rules = ingress_lines(&c, "partly");
    assert_eq!(rules.len(), 2, "{rules:#?}");
}

#[test]
fn named_ports_resolve_per_destination_pod() {
    let c = Cluster::new()
        .pod_with_ports(
            "a/web1",
            &[("app", "web")],
            "10.233.90.10",
            "node1",
            &[("http", Protocol::Tcp, 8080)],
        )
        .pod_with_ports(
            "a/web2",
            &[("app", "web")],
            "10.233.96.10",
            "node2",
            &[("http", Protocol::Tcp, 9090)],
        )
        .pod("a/web3", &[("app", "web")], "10.233.92.10", "node3")
        .pod_with_ports(
            "a/client",
            &[("app", "client")],
            "10.233.90.20",
            "node1",
            &[("http", Protocol::Tcp, 7070)],
        )
        .policy(
            r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: http}]}]
"#,
        );
    assert!(c.allows("a/client", "a/web1", tcp(8080)));
    assert!(!c.allows("a/client", "a/web1", tcp(9090)));
    assert!(c.allows("a/client", "a/web2", tcp(9090)));
    assert!(!c.allows("a/client", "a/web2", tcp(8080)));
    assert!(
        !c.allows("a/client", "a/web3", tcp(8080)),
        "web3 has no port named http"
    );
    assert!(
        !c.allows("a/client", "a/web1", tcp(7070)),
        "the source's own http port is irrelevant"
    );
    // Egress named ports resolve on the destination pod too.
    let c = c.policy(
        r#"
metadata: {name: e, namespace: a}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {}}], ports: [{port: http}]}]
"#,
    );
    assert!(c.allows("a/client", "a/web1", tcp(8080)));
    assert!(c.allows("a/client", "a/web2", tcp(9090)));
    assert!(!c.allows("a/client", "a/web2", tcp(8080)));
    assert!(!c.allows("a/client", "ext:8.8.8.8", tcp(8080)));
}

#[test]
fn rules_with_ports_and_no_peers_and_the_reverse() {
    let c = base().policy(
        r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - ports: [{port: 443}]
  - from: [{podSelector: {matchLabels: {app: db}}}]
"#,
    );
    assert!(c.allows("ext:9.9.9.9", "a/web", tcp(443)));
    assert!(!c.allows("ext:9.9.9.9", "a/web", tcp(80)));
    assert!(c.allows("a/db", "a/web", udp(5000)));
    assert!(c.allows("a/db", "a/web", None));
}

// --- conntrack and the node ------------------------------------------------------------------

#[test]
fn replies_of_allowed_connections_flow_back() {
    let c = base().policy(DENY_ALL_A).policy(
        r#"
metadata: {name: out, namespace: a}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{to: [{namespaceSelector: {matchLabels: {team: b}}}]}]
"#,
    );
    assert!(c.allows("a/web", "b/other", tcp(80)));
    let sim = c.sim();
    let (web, other) = (c.endpoint("a/web"), c.endpoint("b/other"));
    assert!(sim.send(&other, &web, tcp(80), CtState::Established), "reply");
    assert!(
        !sim.send(&other, &web, tcp(80), CtState::New),
        "a new connection the other way is denied"
    );
    assert!(
        !sim.send(&other, &web, tcp(80), CtState::Invalid),
        "invalid packets are dropped"
    );
}

#[test]
fn a_pod_and_its_own_node_always_reach_each_other() {
    let c = base().policy(DENY_ALL_A).policy(
        r#"
metadata: {name: no-egress, namespace: a}
spec:
  podSelector: {}
  policyTypes: [Egress]
"#,
    );
    assert!(c.allows("host:node1", "a/web", tcp(8080)), "kubelet probe");
    assert!(c.allows("a/web", "host:node1", tcp(10250)));
    assert!(
        !c.allows("host:node2", "a/web", tcp(8080)),
        "other nodes are not exempt"
    );
    assert!(!c.allows("a/web", "host:node2", tcp(10250)));
}

// --- changes ---------------------------------------------------------------------------------

#[test]
fn changes_take_effect_relabel_namespace_relabel_ip_reuse_update_delete() {
    let allow_clients = r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {app: client}}}]}]
"#;
    let c = base().policy(allow_clients);
    assert!(c.allows("b/client", "a/web", tcp(80)));
    assert!(!c.allows("b/other", "a/web", tcp(80)));

    // Pod relabel.
    let mut r = c.clone();
    std::sync::Arc::make_mut(&mut r.model.pods)
        .iter_mut()
        .find(|p| p.name == "other")
        .unwrap()
        .labels = std::sync::Arc::new(policy::PackedLabels::new([("app", "client")]));
    assert!(r.allows("b/other", "a/web", tcp(80)));

    // Namespace relabel.
    let mut r = c.clone();
    r.model
        .namespaces
        .get_mut("b")
        .unwrap()
        .labels
        .insert("team".into(), "z".into());
    assert!(!r.allows("b/client", "a/web", tcp(80)));

    // IP reuse: b/client is deleted and its IP goes to a new pod with other labels.
    let mut r = c.clone();
    std::sync::Arc::make_mut(&mut r.model.pods).retain(|p| !(p.namespace == "b" && p.name == "client"));
    let r = r.pod("b/newcomer", &[("app", "x")], "10.233.96.11", "node2");
    assert!(!r.allows("b/newcomer", "a/web", tcp(80)));

    // Policy update, then delete.
    let r = c
        .clone()
        .without_policy("p")
        .policy(&allow_clients.replace("app: client", "app: other"));
    assert!(r.allows("b/other", "a/web", tcp(80)));
    assert!(!r.allows("b/client", "a/web", tcp(80)));
    let r = r.without_policy("p");
    assert!(r.allows("b/client", "a/web", tcp(80)));
}

// --- security defaults -----------------------------------------------------------------------

fn node1(c: &Cluster) -> (Interpreter, NodeCtx) {
    let ctx = NodeCtx::from_model(&c.model, "node1", "cali").unwrap();
    let compiled = compile(&c.model, &ctx);
    (Interpreter::new(&compiled.dataplane).unwrap(), ctx)
}

fn iface(ctx: &NodeCtx, pod: &str) -> String {
    ctx.workloads.iter().find(|w| w.pod == pod).unwrap().iface.clone()
}

#[test]
fn pods_cannot_spoof_their_source_address() {
    let c = base();
    let (i, ctx) = node1(&c);
    let web = iface(&ctx, "web");
    let ok = Packet::l4("10.233.90.10".parse().unwrap(), "8.8.8.8".parse().unwrap(), 6, 80);
    assert_eq!(
        i.run(&ok.clone().via(Some(&web), Some("eth0"))).verdict,
        Verdict::Accept
    );
    let mut spoofed = ok.clone();
    spoofed.src = "10.233.90.11".parse().unwrap();
    assert_eq!(
        i.run(&spoofed.clone().via(Some(&web), Some("eth0"))).verdict,
        Verdict::Drop
    );
    assert_eq!(
        i.run(&spoofed.clone().via(Some(&web), None)).verdict,
        Verdict::Drop,
        "to the host"
    );
    // Not even as a reply: conntrack must not let a spoofed packet ride another flow.
    spoofed.ct = CtState::Established;
    assert_eq!(i.run(&spoofed.via(Some(&web), Some("eth0"))).verdict, Verdict::Drop);
}

#[test]
fn ipip_from_pods_is_dropped() {
    let c = base();
    let (i, ctx) = node1(&c);
    let web = iface(&ctx, "web");
    let mut p = Packet::l4("10.233.90.10".parse().unwrap(), "10.102.123.104".parse().unwrap(), 4, 0);
    p.dport = None;
    assert_eq!(i.run(&p.clone().via(Some(&web), Some("eth0"))).verdict, Verdict::Drop);
    assert_eq!(i.run(&p.via(Some(&web), None)).verdict, Verdict::Drop);
}

#[test]
fn unknown_workload_interfaces_fail_closed() {
    let c = base();
    let (i, _) = node1(&c);
    let p = Packet::l4("10.233.90.99".parse().unwrap(), "10.233.90.10".parse().unwrap(), 6, 80);
    for (inn, out) in [
        (Some("cali0000000000"), Some("eth0")),
        (Some("eth0"), Some("cali0000000000")),
        (Some("cali0000000000"), None),
        (None, Some("cali0000000000")),
    ] {
        assert_eq!(
            i.run(&p.clone().via(inn, out)).verdict,
            Verdict::Drop,
            "{inn:?} -> {out:?}"
        );
    }
    // Traffic not touching workloads is left to the host's own rules.
    assert_eq!(
        i.run(&p.clone().via(Some("eth0"), Some("eth1"))).verdict,
        Verdict::Continue
    );
    assert_eq!(i.run(&p.via(Some("eth0"), None)).verdict, Verdict::Continue);
}

#[test]
fn a_workload_the_model_does_not_know_yet_is_closed() {
    let c = base();
    let mut ctx = NodeCtx::from_model(&c.model, "node1", "cali").unwrap();
    ctx.workloads.push(policy::Workload {
        namespace: "a".into(),
        pod: "brand-new".into(),
        iface: "caliaaaaaaaaaaa".into(),
        ip: Some("10.233.90.50".parse().unwrap()),
    });
    let i = Interpreter::new(&compile(&c.model, &ctx).dataplane).unwrap();
    let p = Packet::l4("8.8.8.8".parse().unwrap(), "10.233.90.50".parse().unwrap(), 6, 80);
    assert_eq!(
        i.run(&p.via(Some("eth0"), Some("caliaaaaaaaaaaa"))).verdict,
        Verdict::Drop
    );
}

/// Many workloads on one node, all dispatched by set: every guarantee must hold for each:
/// policy (compiled vs reference), anti-spoofing to other hosts and to the node (with a made-up
/// address and with a neighbour's), fail-closed for unknown interfaces, and the node reaching
/// its pods.
#[test]
fn many_workloads_on_a_node_keep_every_guarantee() {
    let mut c = base().policy(
        r#"
metadata: {name: web-from-client, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
"#,
    );
    for k in 0..60 {
        let app = if k % 2 == 0 { "web" } else { "client" };
        c = c.pod(
            &format!("a/w{k}"),
            &[("app", app)],
            &format!("10.233.90.{}", 100 + k),
            "node1",
        );
    }
    let ctx = NodeCtx::from_model(&c.model, "node1", "cali").unwrap();
    let dp = compile(&c.model, &ctx).dataplane;
    // Workloads are set members: no chain and no rule names one.
    for ((_, name), rules) in &dp.chains {
        for w in &ctx.workloads {
            assert!(
                !name.contains(&w.iface) && !rules.iter().any(|r| r.contains(&w.iface)),
                "{name} names {}",
                w.iface
            );
        }
    }
    assert_eq!(
        dp.ipsets[policy::compile::SET_WORKLOADS].members.len(),
        ctx.workloads.len()
    );

    // Policy on the same node, both ways; `allows` checks the reference too.
    assert!(c.allows("a/w1", "a/w0", tcp(80)), "client -> web");
    assert!(!c.allows("a/w2", "a/w0", tcp(80)), "web -> web");
    assert!(c.allows("a/w0", "a/w1", tcp(80)), "client is not isolated");
    assert!(c.allows("a/client", "a/w4", tcp(80)), "cross node, a client");
    assert!(
        !c.allows("b/client", "a/w4", tcp(80)),
        "cross node, a client of another namespace"
    );

    let i = Interpreter::new(&dp).unwrap();
    for w in &ctx.workloads {
        let ip = w.ip.unwrap();
        let out = Packet::l4(ip, "8.8.8.8".parse().unwrap(), 6, 80);
        assert_eq!(
            i.run(&out.clone().via(Some(&w.iface), Some("eth0"))).verdict,
            Verdict::Accept,
            "{}",
            w.pod
        );
        assert_ne!(
            i.run(&out.clone().via(Some(&w.iface), None)).verdict,
            Verdict::Drop,
            "{} to its node",
            w.pod
        );
        let mut spoofed = out;
        spoofed.src = "10.233.90.250".parse().unwrap();
        assert_eq!(
            i.run(&spoofed.clone().via(Some(&w.iface), Some("eth0"))).verdict,
            Verdict::Drop,
            "{}",
            w.pod
        );
        assert_eq!(
            i.run(&spoofed.via(Some(&w.iface), None)).verdict,
            Verdict::Drop,
            "{} to its node",
            w.pod
        );
        let probe = Packet::l4(common::node_ip("node1"), ip, 6, 8080);
        assert_ne!(
            i.run(&probe.via(None, Some(&w.iface))).verdict,
            Verdict::Drop,
            "node -> {}",
            w.pod
        );
    }
    // A workload sending with its neighbour's address.
    let (a, b) = (&ctx.workloads[0], &ctx.workloads[1]);
    let stolen = Packet::l4(b.ip.unwrap(), "8.8.8.8".parse().unwrap(), 6, 80);
    for out in [Some("eth0"), None, Some(b.iface.as_str())] {
        assert_eq!(
            i.run(&stolen.clone().via(Some(&a.iface), out)).verdict,
            Verdict::Drop,
            "{} with {}'s address to {out:?}",
            a.pod,
            b.pod
        );
    }
    // The node sending to a workload's interface for another workload's address.
    let wrong = Packet::l4(common::node_ip("node1"), b.ip.unwrap(), 6, 8080);
    assert_eq!(i.run(&wrong.via(None, Some(&a.iface))).verdict, Verdict::Drop);
    // Unknown interfaces: one a letter off a known one, one of a name nobody uses.
    let known = &ctx.workloads[0].iface;
    let mut same_bucket = known.clone();
    same_bucket.replace_range(same_bucket.len() - 1.., if known.ends_with('0') { "1" } else { "0" });
    assert!(ctx.workloads.iter().all(|w| w.iface != same_bucket));
    let used: std::collections::BTreeSet<char> = ctx.workloads.iter().filter_map(|w| w.iface.chars().nth(4)).collect();
    let free = "0123456789abcdefghijklmnopqrstuvwxyz"
        .chars()
        .find(|c| !used.contains(c))
        .unwrap();
    let other_bucket = format!("cali{free}0000000000");
    let p = Packet::l4("10.233.90.99".parse().unwrap(), "10.233.90.10".parse().unwrap(), 6, 80);
    for unknown in [&same_bucket, &other_bucket] {
        for (inn, out) in [
            (Some(unknown.as_str()), Some("eth0")),
            (Some("eth0"), Some(unknown.as_str())),
            (Some(unknown.as_str()), None),
            (None, Some(unknown.as_str())),
        ] {
            assert_eq!(
                i.run(&p.clone().via(inn, out)).verdict,
                Verdict::Drop,
                "{inn:?} -> {out:?}"
            );
        }
    }
}

#[test]
fn icmp_fragmentation_needed_always_passes() {
    let c = base().policy(DENY_ALL_A);
    let (i, ctx) = node1(&c);
    let web = iface(&ctx, "web");
    let mut p = Packet::l4("8.8.8.8".parse().unwrap(), "10.233.90.10".parse().unwrap(), 1, 0);
    p.dport = None;
    p.icmp = Some((3, 4));
    assert_eq!(i.run(&p.clone().via(Some("eth0"), Some(&web))).verdict, Verdict::Accept);
    p.icmp = Some((8, 0));
    assert_eq!(
        i.run(&p.via(Some("eth0"), Some(&web))).verdict,
        Verdict::Drop,
        "echo is policy's"
    );
}

// --- reporting and the ingress query ---------------------------------------------------------

#[test]
fn a_bad_policy_is_reported_and_the_rest_is_enforced() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let bad_cidr: NetworkPolicy = serde_yaml::from_str(
        "metadata: {name: bad, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
    )
    .unwrap();
    let bad_proto: NetworkPolicy = serde_yaml::from_str(
        "metadata: {name: bad2, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{protocol: ICMP, port: 1}]}]\n",
    )
    .unwrap();
    let good: NetworkPolicy = serde_yaml::from_str(DENY_ALL_A).unwrap();
    let out = policy::convert::convert(&[], &[], &[bad_cidr, good, bad_proto]);
    assert_eq!(out.model.policies.len(), 1);
    assert_eq!(out.errors.len(), 2);
    assert!(out.errors[0].to_string().contains("a/bad") && out.errors[0].to_string().contains("10.0.0.0/33"));
    assert!(out.errors[1].to_string().contains("ICMP"));

    // A hand-built model with an except outside its cidr: compile reports and skips it.
    let mut c = base().policy(DENY_ALL_A);
    let mut p = (*c.model.policies[0]).clone();
    p.name = "broken".into();
    p.ingress = vec![policy::model::Rule {
        peers: vec![policy::Peer::ip_block("10.0.0.0/8", &["11.0.0.0/24"])],
        ports: vec![],
    }];
    c.model.policies.push(p.into());
    let compiled = compile(&c.model, &NodeCtx::empty("node1"));
    assert_eq!(compiled.errors.len(), 1);
    assert_eq!(compiled.errors[0].policy.name, "broken");
    assert!(!c.allows("ext:10.1.1.1", "a/web", tcp(80)), "deny-all still enforced");
}

#[test]
fn ingress_query_names_the_deciding_rule_at_any_node() {
    let c = base().policy(
        r#"
metadata: {name: web, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: 10.2.3.4/32}}]
  - from: [{namespaceSelector: {matchExpressions: [{key: team, operator: NotIn, values: [b]}]}}]
    ports: [{port: 80}]
"#,
    );
    let web = "10.233.90.10".parse().unwrap();
    let d = ingress_allows(&c.model, web, "10.2.3.4".parse().unwrap(), Protocol::Tcp, 9097).unwrap();
    assert!(d.allowed);
    assert_eq!(d.by.as_ref().map(|r| r.index), Some(0));
    assert_eq!(d.explain(), "allowed by ingress rule 0 of NetworkPolicy a/web");
    let d = ingress_allows(&c.model, web, "10.233.96.10".parse().unwrap(), Protocol::Tcp, 80).unwrap();
    assert_eq!(d.by.as_ref().map(|r| r.index), Some(1));
    let d = ingress_allows(&c.model, web, "10.233.96.11".parse().unwrap(), Protocol::Tcp, 80).unwrap();
    assert!(!d.allowed);
    assert_eq!(d.explain(), "denied: no rule of a/web allows it");
    let d = ingress_allows(&c.model, "10.233.90.11".parse().unwrap(), web, Protocol::Tcp, 80).unwrap();
    assert!(d.allowed && d.by.is_none(), "a/db is not isolated");
    // The same answer from a node that hosts none of these pods, by destination IP.
    let _ = Endpoint::External(web);
}

// --- shape: growth and names -----------------------------------------------------------------

#[test]
fn rules_per_pod_stay_constant_and_policy_chains_grow_with_their_own_rules_only() {
    let mut c = base().policy(DENY_ALL_A);
    let ctx = NodeCtx::from_model(&c.model, "node1", "cali").unwrap();
    let before = compile(&c.model, &ctx);
    let key = (conf::dataplane::Table::Filter, policy::compile::CHAIN_TO_WL.to_string());
    let pi_deny = policy::compile::policy_chain_name(
        &policy::model::PolicyRef {
            namespace: "a".into(),
            name: "deny-all".into(),
        },
        policy::model::Direction::Ingress,
    );
    let pi_key = (conf::dataplane::Table::Filter, pi_deny);
    for k in 0..200 {
        c = c.policy(&format!(
            "metadata: {{name: p{k}, namespace: b}}\nspec:\n  podSelector: {{matchLabels: {{app: x{k}}}}}\n  ingress: [{{ports: [{{port: {}}}]}}]\n",
            1000 + k
        ));
    }
    let after = compile(&c.model, &ctx);
    assert_eq!(before.dataplane.chains[&key], after.dataplane.chains[&key]);
    assert_eq!(before.dataplane.chains[&pi_key], after.dataplane.chains[&pi_key]);
    assert_eq!(before.stats.workload_members, after.stats.workload_members);
    assert!(after.stats.max_workload_members <= policy::compile::MAX_MEMBERS_PER_WORKLOAD);
    // 200 policies selecting nobody add no rules at all here.
    assert_eq!(before.stats.rules, after.stats.rules);

    // A new pod of an existing group is set members only: not one chain changes.
    let more = c.clone().pod("a/web2", &[("app", "web")], "10.233.90.60", "node1");
    let ctx2 = NodeCtx::from_model(&more.model, "node1", "cali").unwrap();
    let added = compile(&more.model, &ctx2);
    assert_eq!(added.stats.local_workloads, after.stats.local_workloads + 1);
    assert_eq!(after.dataplane.chains, added.dataplane.chains);
    assert_ne!(after.dataplane.ipsets, added.dataplane.ipsets);

    // Many policies selecting the same pod: its own chains do not grow.
    let mut c = base();
    for k in 0..50 {
        c = c.policy(&format!(
            "metadata: {{name: p{k}, namespace: a}}\nspec:\n  podSelector: {{}}\n  ingress: [{{ports: [{{port: {}}}]}}]\n",
            1000 + k
        ));
    }
    let many = compile(&c.model, &ctx);
    assert!(many.stats.max_workload_members <= policy::compile::MAX_MEMBERS_PER_WORKLOAD);
    for (name, rules) in &many.dataplane.chains {
        assert!(name.1.len() <= policy::compile::MAX_CHAIN_LEN, "{}", name.1);
        if name.1.starts_with("WARREN-PI-") {
            assert_eq!(rules.len(), 1, "one rule, which leaves through WARREN-ALLOW");
        }
    }
    for name in many.dataplane.ipsets.keys() {
        assert!(
            name.len() <= policy::compile::MAX_IPSET_LEN && name.starts_with("warren-"),
            "{name}"
        );
    }
    assert!(c.allows("b/client", "a/web", tcp(1049)));
    assert!(!c.allows("b/client", "a/web", tcp(1050)));
}

#[test]
fn the_same_peer_in_many_policies_is_one_set() {
    let mut c = base();
    for k in 0..5 {
        c = c.policy(&format!(
            "metadata: {{name: p{k}, namespace: a}}\nspec:\n  podSelector: {{}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: b}}}}}}]}}]\n"
        ));
    }
    let compiled = compile(&c.model, &NodeCtx::from_model(&c.model, "node1", "cali").unwrap());
    let selector_sets = compiled
        .dataplane
        .ipsets
        .keys()
        .filter(|n| n.starts_with("warren-s-"))
        .count();
    assert_eq!(selector_sets, 1);
}

#[test]
fn a_node_explains_why_a_packet_was_dropped_or_accepted() {
    let c = base().policy(DENY_ALL_A).policy(
        r#"
metadata: {name: allow-db, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: db}}}], ports: [{port: 80}]}]
"#,
    );
    let ctx = NodeCtx::from_model(&c.model, "node1", "cali").unwrap();
    let view = policy::NodeView::new(compile(&c.model, &ctx)).unwrap();
    let (web, db) = (iface(&ctx, "web"), iface(&ctx, "db"));
    let from_db = Packet::l4("10.233.90.11".parse().unwrap(), "10.233.90.10".parse().unwrap(), 6, 80);
    let e = view.explain(&from_db.clone().via(Some(&db), Some(&web)));
    assert_eq!(e.verdict, Verdict::Accept);
    assert_eq!(e.allowed_by.len(), 1);
    assert_eq!(e.allowed_by[0].policy.name, "allow-db");
    let mut other_port = from_db.clone();
    other_port.dport = Some(81);
    let e = view.explain(&other_port.via(Some(&db), Some(&web)));
    assert_eq!(e.verdict, Verdict::Drop);
    assert_eq!(e.reason.as_deref(), Some("no ingress policy allowed"));
    assert_eq!(
        e.to_string(),
        "dropped (no ingress policy allowed); policies evaluated: a/allow-db (ingress), a/deny-all (ingress)"
    );
    let mut spoofed = from_db;
    spoofed.src = "10.233.90.99".parse().unwrap();
    assert_eq!(
        view.explain(&spoofed.via(Some(&db), Some(&web))).to_string(),
        "dropped (unknown workload interface or spoofed source)"
    );
}
