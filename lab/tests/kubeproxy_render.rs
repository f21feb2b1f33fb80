//! Pure tests of the kube-proxy emulation: chain names, rules for Cluster/Local, endpoints.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::{Pod, Service};
use lab::kubeproxy::endpoints::endpoints_for;
use lab::kubeproxy::model::{
    categorize_endpoints, EndpointInfo, HostOptions, Protocol, ProxyInput, ServiceInfo, TrafficPolicy,
};
use lab::kubeproxy::render::{
    ext_chain, masquerade_mark, port_proto_hash, probability, render_iptables, render_with_stale, sep_chain,
    stale_nat_chains, svc_chain, svl_chain,
};
use serde_json::json;

const CLUSTER_CIDR: &str = "10.233.64.0/18";

fn dashboard(policy: TrafficPolicy, endpoints: Vec<EndpointInfo>) -> ServiceInfo {
    ServiceInfo {
        namespace: "tekton-pipelines".into(),
        name: "tekton-dashboard".into(),
        port_name: String::new(),
        protocol: Protocol::Tcp,
        cluster_ip: "10.233.5.155".parse().unwrap(),
        port: 9097,
        node_port: 31602,
        external_policy: policy,
        internal_policy: TrafficPolicy::Cluster,
        endpoints,
    }
}

fn ep(ip: &str, node: &str) -> EndpointInfo {
    EndpointInfo {
        ip: ip.parse().unwrap(),
        port: 9097,
        node_name: Some(node.into()),
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn input(node: &str, services: Vec<ServiceInfo>) -> ProxyInput {
    ProxyInput {
        node_name: node.into(),
        node_ips: vec![],
        cluster_cidr: Some(CLUSTER_CIDR.parse().unwrap()),
        services,
        masquerade_all: false,
        options: HostOptions::default(),
    }
}

/// The rules of `chain` in table `table`, in order, without the `-A <chain> ` prefix.
fn rules<'a>(text: &'a str, table: &str, chain: &str) -> Vec<&'a str> {
    let mut in_table = false;
    let prefix = format!("-A {chain} ");
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            in_table = t == table;
        } else if in_table {
            if let Some(r) = line.strip_prefix(&prefix) {
                out.push(r);
            }
        }
    }
    out
}

fn declares(text: &str, table: &str, chain: &str) -> bool {
    let mut in_table = false;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            in_table = t == table;
        } else if in_table && line.starts_with(&format!(":{chain} ")) {
            return true;
        }
    }
    false
}

#[test]
fn should_hash_chain_names_like_kube_proxy() {
    // Values every cluster shows in `iptables-save`: the API server's and kube-dns's chains.
    assert_eq!(port_proto_hash("default/kubernetes:https", "tcp"), "NPX46M4PTMTKRN6Y");
    assert_eq!(port_proto_hash("kube-system/kube-dns:dns", "udp"), "TCOU7JCQXEZGVUNU");
    // By hand, from portProtoHash: base32(sha256("tekton-pipelines/tekton-dashboard" + "tcp"))[:16],
    // e.g. `printf %s tekton-pipelines/tekton-dashboardtcp | sha256sum | xxd -r -p | base32 | cut -c1-16`.
    let svc = dashboard(TrafficPolicy::Cluster, vec![]);
    assert_eq!(svc_chain(&svc), "KUBE-SVC-PMPLUAIR4O2OXCDQ");
    assert_eq!(svl_chain(&svc), "KUBE-SVL-PMPLUAIR4O2OXCDQ");
    assert_eq!(ext_chain(&svc), "KUBE-EXT-PMPLUAIR4O2OXCDQ");
    // KUBE-SEP hashes the endpoint string too, so each endpoint gets its own chain.
    let a = sep_chain(&svc, "10.233.96.32:9097");
    let b = sep_chain(&svc, "10.233.96.33:9097");
    assert!(a.starts_with("KUBE-SEP-") && a.len() == "KUBE-SEP-".len() + 16, "{a}");
    assert_ne!(a, b);
    assert_eq!(masquerade_mark(14), "0x00004000");
    assert_eq!(probability(3), "0.3333333333");
    assert_eq!(probability(2), "0.5000000000");
}

#[test]
fn should_masquerade_nodeport_traffic_with_cluster_policy() {
    let svc = dashboard(TrafficPolicy::Cluster, vec![ep("10.233.96.32", "node2")]);
    let (svc_c, ext_c, sep_c) = (svc_chain(&svc), ext_chain(&svc), sep_chain(&svc, "10.233.96.32:9097"));
    // node1 has no endpoint, but Cluster policy forwards anyway.
    let text = render_iptables(&input("node1", vec![svc]));

    assert_eq!(
        rules(&text, "nat", "KUBE-NODEPORTS"),
        vec![format!(
            "-m comment --comment \"tekton-pipelines/tekton-dashboard\" -m tcp -p tcp --dport 31602 -j {ext_c}"
        )]
    );
    // Mark for masquerade first, then dispatch.
    assert_eq!(
        rules(&text, "nat", &ext_c),
        vec![
            "-m comment --comment \"masquerade traffic for tekton-pipelines/tekton-dashboard external destinations\" -j KUBE-MARK-MASQ"
                .to_string(),
            format!("-j {svc_c}"),
        ]
    );
    assert_eq!(
        rules(&text, "nat", &svc_c),
        vec![
            format!(
                "-m comment --comment \"tekton-pipelines/tekton-dashboard cluster IP\" -m tcp -p tcp -d 10.233.5.155 --dport 9097 ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
            ),
            format!("-m comment --comment \"tekton-pipelines/tekton-dashboard -> 10.233.96.32:9097\" -j {sep_c}"),
        ]
    );
    assert_eq!(
        rules(&text, "nat", &sep_c),
        vec![
            "-m comment --comment \"tekton-pipelines/tekton-dashboard\" -s 10.233.96.32 -j KUBE-MARK-MASQ",
            "-m comment --comment \"tekton-pipelines/tekton-dashboard\" -m tcp -p tcp -j DNAT --to-destination 10.233.96.32:9097",
        ]
    );
    let services = rules(&text, "nat", "KUBE-SERVICES");
    assert_eq!(
        services.first().copied(),
        Some(
            format!(
                "-m comment --comment \"tekton-pipelines/tekton-dashboard cluster IP\" -m tcp -p tcp -d 10.233.5.155 --dport 9097 -j {svc_c}"
            )
            .as_str()
        )
    );
    assert!(
        services
            .last()
            .is_some_and(|r| r.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")),
        "{services:?}"
    );
    assert_eq!(
        rules(&text, "nat", "KUBE-POSTROUTING"),
        vec![
            "-m mark ! --mark 0x00004000/0x00004000 -j RETURN",
            "-j MARK --xor-mark 0x00004000",
            "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
        ]
    );
    assert_eq!(
        rules(&text, "nat", "KUBE-MARK-MASQ"),
        vec!["-j MARK --or-mark 0x00004000"]
    );
    // FORWARD accepts the marked packets and their replies.
    let fwd = rules(&text, "filter", "KUBE-FORWARD");
    assert!(
        fwd.iter().any(|r| r.contains("--mark 0x00004000/0x00004000 -j ACCEPT")),
        "{fwd:?}"
    );
    assert!(
        fwd.iter()
            .any(|r| r.contains("--ctstate RELATED,ESTABLISHED -j ACCEPT")),
        "{fwd:?}"
    );
    assert!(rules(&text, "filter", "KUBE-EXTERNAL-SERVICES").is_empty());
}

#[test]
fn should_keep_source_and_use_only_local_endpoints_with_local_policy() {
    let svc = dashboard(TrafficPolicy::Local, vec![ep("10.233.96.32", "node2")]);
    let (svc_c, svl_c, ext_c) = (svc_chain(&svc), svl_chain(&svc), ext_chain(&svc));

    // On node2 (the endpoint's node): external traffic goes to KUBE-SVL without a masquerade mark.
    let node2 = render_iptables(&input("node2", vec![svc.clone()]));
    let ext = rules(&node2, "nat", &ext_c);
    assert_eq!(
        ext,
        vec![
            format!(
                "-m comment --comment \"pod traffic for tekton-pipelines/tekton-dashboard external destinations\" -s {CLUSTER_CIDR} -j {svc_c}"
            ),
            "-m comment --comment \"masquerade LOCAL traffic for tekton-pipelines/tekton-dashboard external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ".to_string(),
            format!(
                "-m comment --comment \"route LOCAL traffic for tekton-pipelines/tekton-dashboard external destinations\" -m addrtype --src-type LOCAL -j {svc_c}"
            ),
            format!("-j {svl_c}"),
        ]
    );
    assert!(declares(&node2, "nat", &svl_c));
    assert_eq!(rules(&node2, "nat", &svl_c).len(), 1);
    assert!(rules(&node2, "filter", "KUBE-EXTERNAL-SERVICES").is_empty());

    // On node1: no local endpoint, so no KUBE-SVL and no final jump; filter drops the NodePort.
    let node1 = render_iptables(&input("node1", vec![svc]));
    assert!(!declares(&node1, "nat", &svl_c));
    let ext = rules(&node1, "nat", &ext_c);
    assert_eq!(ext.len(), 3, "{ext:?}");
    assert!(ext.iter().all(|r| !r.ends_with(&format!("-j {svl_c}"))));
    assert_eq!(
        rules(&node1, "filter", "KUBE-EXTERNAL-SERVICES"),
        vec![
            "-m comment --comment \"tekton-pipelines/tekton-dashboard has no local endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 31602 -j DROP"
        ]
    );
    // The ClusterIP still works from node1 (internal policy is Cluster).
    assert!(rules(&node1, "nat", "KUBE-SERVICES")
        .iter()
        .any(|r| r.ends_with(&format!("-j {svc_c}"))));
}

#[test]
fn should_reject_in_filter_when_service_has_no_endpoints() {
    let svc = dashboard(TrafficPolicy::Cluster, vec![]);
    let (svc_c, ext_c) = (svc_chain(&svc), ext_chain(&svc));
    let text = render_iptables(&input("node1", vec![svc]));
    assert_eq!(
        rules(&text, "filter", "KUBE-SERVICES"),
        vec![
            "-m comment --comment \"tekton-pipelines/tekton-dashboard has no endpoints\" -m tcp -p tcp -d 10.233.5.155 --dport 9097 -j REJECT"
        ]
    );
    assert_eq!(
        rules(&text, "filter", "KUBE-EXTERNAL-SERVICES"),
        vec![
            "-m comment --comment \"tekton-pipelines/tekton-dashboard has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 31602 -j REJECT"
        ]
    );
    assert!(!declares(&text, "nat", &svc_c));
    assert!(!declares(&text, "nat", &ext_c));
    assert!(rules(&text, "nat", "KUBE-NODEPORTS").is_empty());
}

#[test]
fn should_spread_over_endpoints_with_statistic_probabilities() {
    let eps = vec![
        ep("10.233.90.5", "node1"),
        ep("10.233.92.5", "node3"),
        ep("10.233.96.32", "node2"),
    ];
    let svc = dashboard(TrafficPolicy::Cluster, eps);
    let text = render_iptables(&input("node1", vec![svc.clone()]));
    let r = rules(&text, "nat", &svc_chain(&svc));
    assert_eq!(r.len(), 4, "{r:?}"); // masquerade rule + 3 endpoints
    assert!(
        r[1].contains("-m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-"),
        "{}",
        r[1]
    );
    assert!(
        r[2].contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-"),
        "{}",
        r[2]
    );
    assert!(!r[3].contains("statistic"), "{}", r[3]);
    // Not-ready endpoints are not used while ready ones exist.
    let mut eps = svc.endpoints.clone();
    eps[0].ready = false;
    let svc2 = ServiceInfo { endpoints: eps, ..svc };
    let cat = categorize_endpoints(&svc2, "node1");
    assert_eq!(cat.cluster.len(), 2);
}

#[test]
fn should_delete_only_stale_service_chains() {
    let svc = dashboard(TrafficPolicy::Cluster, vec![ep("10.233.96.32", "node2")]);
    let fresh = render_iptables(&input("node1", vec![svc.clone()]));
    let save = format!(
        "*filter\n:KUBE-SVC-FILTERISNOTOURS - [0:0]\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n:{} - [0:0]\n:CALI-nat - [0:0]\n:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]\nCOMMIT\n",
        svc_chain(&svc)
    );
    let stale = stale_nat_chains(&save, &fresh);
    assert_eq!(
        stale.iter().map(String::as_str).collect::<Vec<_>>(),
        vec!["KUBE-SEP-BBBBBBBBBBBBBBBB", "KUBE-SVC-AAAAAAAAAAAAAAAA"]
    );
    let with = render_with_stale(&input("node1", vec![svc]), &stale);
    assert!(with.contains("\n-X KUBE-SVC-AAAAAAAAAAAAAAAA\n"));
    assert!(declares(&with, "nat", "KUBE-SEP-BBBBBBBBBBBBBBBB"));
}

fn service_json(target_port: serde_json::Value, policy: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "tekton-dashboard", "namespace": "tekton-pipelines", "uid": "u-svc"},
        "spec": {
            "type": "NodePort", "clusterIP": "10.233.5.155", "externalTrafficPolicy": policy,
            "selector": {"app": "dashboard"},
            "ports": [{"name": "http", "port": 9097, "nodePort": 31602, "protocol": "TCP", "targetPort": target_port}]
        }
    }))
    .unwrap()
}

fn pod_json(name: &str, ns: &str, ip: Option<&str>, node: &str, ready: bool, port_name: &str, port: i32) -> Pod {
    let mut status =
        json!({"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]});
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("u-{name}"), "labels": {"app": "dashboard"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x",
                 "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"}]}]},
        "status": status
    }))
    .unwrap()
}

#[test]
fn should_resolve_named_target_port_per_pod() {
    let svc = service_json(json!("web"), "Cluster");
    let pods = vec![
        pod_json(
            "a",
            "tekton-pipelines",
            Some("10.233.96.32"),
            "node2",
            true,
            "web",
            9097,
        ),
        pod_json("b", "tekton-pipelines", Some("10.233.90.7"), "node1", true, "web", 8080),
        pod_json(
            "c",
            "tekton-pipelines",
            Some("10.233.92.7"),
            "node3",
            false,
            "web",
            9097,
        ),
        pod_json("no-ip", "tekton-pipelines", None, "node3", true, "web", 9097),
        pod_json("other-ns", "bar", Some("10.233.92.9"), "node3", true, "web", 9097),
        pod_json(
            "no-such-port",
            "tekton-pipelines",
            Some("10.233.92.10"),
            "node3",
            true,
            "metrics",
            9090,
        ),
    ];
    let (endpoints, slices) = endpoints_for(&svc, &pods).expect("selector service");

    // Endpoints: one subset per port mapping; the not-ready pod in notReadyAddresses.
    let subsets = endpoints.subsets.expect("subsets");
    let by_port: Vec<(i32, Vec<String>, Vec<String>)> = subsets
        .iter()
        .map(|s| {
            let port = s.ports.as_ref().unwrap()[0].port;
            let ready = s.addresses.iter().flatten().map(|a| a.ip.clone()).collect();
            let not_ready = s.not_ready_addresses.iter().flatten().map(|a| a.ip.clone()).collect();
            (port, ready, not_ready)
        })
        .collect();
    assert!(
        by_port.contains(&(9097, vec!["10.233.96.32".into()], vec!["10.233.92.7".into()])),
        "{by_port:?}"
    );
    assert!(
        by_port.contains(&(8080, vec!["10.233.90.7".into()], vec![])),
        "{by_port:?}"
    );
    // The pod without a "web" port has no port for this service: it is in no subset.
    assert!(!by_port
        .iter()
        .any(|(_, r, n)| r.contains(&"10.233.92.10".to_string()) || n.contains(&"10.233.92.10".to_string())));

    // The proxy sees both port numbers, with node names, and only ready endpoints are used.
    let infos = ServiceInfo::from_k8s(&svc, &slices);
    assert_eq!(infos.len(), 1);
    let got: Vec<(String, u16, Option<String>, bool)> = infos[0]
        .endpoints
        .iter()
        .map(|e| (e.ip.to_string(), e.port, e.node_name.clone(), e.ready))
        .collect();
    assert!(
        got.contains(&("10.233.96.32".into(), 9097, Some("node2".into()), true)),
        "{got:?}"
    );
    assert!(
        got.contains(&("10.233.90.7".into(), 8080, Some("node1".into()), true)),
        "{got:?}"
    );
    assert!(
        got.contains(&("10.233.92.7".into(), 9097, Some("node3".into()), false)),
        "{got:?}"
    );
    assert!(
        !got.iter().any(|(ip, ..)| ip == "10.233.92.9" || ip == "10.233.92.10"),
        "{got:?}"
    );
    let text = render_iptables(&ProxyInput::from_k8s(
        "node1",
        vec![],
        None,
        std::slice::from_ref(&svc),
        &slices,
    ));
    assert!(text.contains("--to-destination 10.233.90.7:8080"));
    assert!(text.contains("--to-destination 10.233.96.32:9097"));
    assert!(
        !text.contains("10.233.92.7:9097"),
        "not-ready endpoint must not be a DNAT target"
    );
}

#[test]
fn should_write_an_empty_slice_and_ignore_services_without_selector() {
    let svc = service_json(json!(9097), "Local");
    let (endpoints, slices) = endpoints_for(&svc, &[]).expect("selector service");
    assert!(endpoints.subsets.is_none());
    assert_eq!(slices.len(), 1);
    assert!(slices[0].endpoints.as_ref().is_some_and(|e| e.is_empty()));
    let labels = slices[0].metadata.labels.clone().unwrap();
    assert_eq!(
        labels.get("kubernetes.io/service-name").map(String::as_str),
        Some("tekton-dashboard")
    );

    let mut manual = svc.clone();
    manual.spec.as_mut().unwrap().selector = None;
    assert!(endpoints_for(&manual, &[]).is_none());

    // Headless services are not proxied.
    let mut headless = svc;
    headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
    assert!(ServiceInfo::from_k8s(&headless, &slices).is_empty());
}
