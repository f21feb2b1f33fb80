//! The seeds' examples as data: seed 002's example policies and its tester's case table (where
//! kube-router failed same-node isolation — every row here runs same-node AND cross-node), seed
//! 001's examples, seed 003's policy and seed 000's scenario policy.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::{tcp, udp, Cluster};
use policy::model::Protocol;
use policy::reference::L4;

/// nsa: a1, a2 on node1, a3 on node2; nsb: b1 on node1, b2 on node2; nsc: c1 on node1.
fn seed002_cluster() -> Cluster {
    Cluster::new()
        .ns("nsa", &[("app", "nsa")])
        .ns("nsb", &[("app", "nsb")])
        .ns("nsc", &[])
        .ns("default", &[])
        .pod("nsa/a1", &[("run", "a")], "10.233.90.2", "node1")
        .pod("nsa/a2", &[("run", "a")], "10.233.90.3", "node1")
        .pod("nsa/a3", &[("run", "a")], "10.233.96.2", "node2")
        .pod("nsb/b1", &[("run", "b")], "10.233.90.4", "node1")
        .pod("nsb/b2", &[("run", "b")], "10.233.96.3", "node2")
        .pod("nsc/c1", &[("run", "c")], "10.233.90.5", "node1")
        .pod("default/d1", &[("run", "d")], "10.233.92.2", "node3")
}

const NPA_SAME_NS: &str = "
metadata: {name: npa, namespace: nsa}
spec:
  ingress:
  - from:
    - podSelector: {}
  podSelector: {}
  policyTypes: [Ingress]
";
const NPB_SAME_NS: &str = "
metadata: {name: npb, namespace: nsb}
spec:
  ingress:
  - from:
    - podSelector: {}
  podSelector: {}
  policyTypes: [Ingress]
";
const NPA_DENY: &str = "
metadata: {name: npa, namespace: nsa}
spec:
  podSelector: {}
  policyTypes: [Ingress]
";
const NPA_FROM_NSB_6379: &str = "
metadata: {name: npa, namespace: nsa}
spec:
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {app: nsb}
    ports:
    - {protocol: TCP, port: 6379}
  podSelector: {}
  policyTypes: [Ingress]
";
const NPA_FROM_NSB: &str = "
metadata: {name: npa, namespace: nsa}
spec:
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {app: nsb}
  podSelector: {}
  policyTypes: [Ingress]
";
const NPA_EGRESS_CIDR: &str = "
metadata: {name: npa, namespace: nsa}
spec:
  egress:
  - to:
    - ipBlock: {cidr: 14.215.0.0/16}
    ports:
    - {protocol: TCP, port: 5978}
  podSelector: {}
  policyTypes: [Egress]
";
const NPD_FROM_CIDR: &str = "
metadata: {name: npd, namespace: default}
spec:
  ingress:
  - from:
    - ipBlock: {cidr: 14.215.0.0/16}
    ports:
    - {protocol: TCP, port: 80}
  podSelector: {}
  policyTypes: [Ingress]
";

struct Case {
    name: &'static str,
    policies: &'static [&'static str],
    /// (source, destination, traffic, expected)
    expect: &'static [(&'static str, &'static str, L4, bool)],
}

const T80: L4 = Some((Protocol::Tcp, 80));
const T6379: L4 = Some((Protocol::Tcp, 6379));
const T5978: L4 = Some((Protocol::Tcp, 5978));

const SEED002: &[Case] = &[
    Case {
        name: "different namespaces isolated, same namespace intercommunicates",
        policies: &[NPA_SAME_NS, NPB_SAME_NS],
        expect: &[
            ("nsa/a1", "nsa/a2", T80, true),  // same node
            ("nsa/a1", "nsa/a3", T80, true),  // cross node
            ("nsb/b1", "nsb/b2", T80, true),  // cross node
            ("nsb/b1", "nsa/a1", T80, false), // same node
            ("nsb/b2", "nsa/a1", T80, false), // cross node
            ("nsa/a1", "nsb/b1", T80, false), // same node
            ("nsa/a3", "nsb/b1", T80, false), // cross node
            ("nsc/c1", "nsa/a2", T80, false), // same node, unpoliced namespace
            ("nsa/a1", "nsc/c1", T80, true),  // nsc is not isolated
        ],
    },
    Case {
        name: "same and different namespaces isolated",
        policies: &[NPA_DENY],
        expect: &[
            ("nsa/a1", "nsa/a2", T80, false),
            ("nsa/a1", "nsa/a3", T80, false),
            ("nsb/b1", "nsa/a1", T80, false),
            ("nsb/b2", "nsa/a3", T80, false),
            ("nsa/a1", "nsb/b1", T80, true),
        ],
    },
    Case {
        name: "different namespaces isolated, B reaches A as whitelisted",
        policies: &[NPA_FROM_NSB],
        expect: &[
            ("nsb/b1", "nsa/a1", T80, true),
            ("nsb/b2", "nsa/a1", T80, true),
            ("nsb/b1", "nsa/a3", T6379, true),
            ("nsc/c1", "nsa/a1", T80, false),
            ("default/d1", "nsa/a3", T80, false),
            ("nsa/a2", "nsa/a1", T80, false),
        ],
    },
    Case {
        name: "namespace reaches the specified CIDR outside the cluster, other external IPs blocked",
        policies: &[NPA_EGRESS_CIDR],
        expect: &[
            ("nsa/a1", "ext:14.215.3.4", T5978, true),
            ("nsa/a3", "ext:14.215.3.4", T5978, true),
            ("nsa/a1", "ext:14.215.3.4", T80, false),
            ("nsa/a1", "ext:14.216.0.1", T5978, false),
            ("nsa/a1", "nsa/a2", T80, false),
            ("nsb/b1", "ext:8.8.8.8", T80, true),
        ],
    },
    Case {
        name: "namespace B reaches the whitelisted pods and port of namespace A",
        policies: &[NPA_FROM_NSB_6379],
        expect: &[
            ("nsb/b1", "nsa/a1", T6379, true),
            ("nsb/b2", "nsa/a1", T6379, true),
            ("nsb/b1", "nsa/a3", T6379, true),
            ("nsb/b1", "nsa/a1", T80, false),
            ("nsb/b2", "nsa/a3", T80, false),
            ("nsc/c1", "nsa/a1", T6379, false),
        ],
    },
    Case {
        name: "default namespace only reachable from 14.215.0.0/16 on 80/TCP",
        policies: &[NPD_FROM_CIDR],
        expect: &[
            ("ext:14.215.9.9", "default/d1", T80, true),
            ("ext:14.215.9.9", "default/d1", T6379, false),
            ("ext:8.8.8.8", "default/d1", T80, false),
            ("nsa/a1", "default/d1", T80, false),
        ],
    },
];

#[test]
fn seed002_case_table_same_node_and_cross_node() {
    for case in SEED002 {
        let mut c = seed002_cluster();
        for p in case.policies {
            c = c.policy(p);
        }
        for (src, dst, l4, want) in case.expect {
            assert_eq!(c.allows(src, dst, *l4), *want, "{}: {src} -> {dst} {l4:?}", case.name);
        }
    }
}

#[test]
fn seed001_main_example() {
    // The Kubernetes documentation's example (seed 001 §4): role=db in default.
    let c = Cluster::new()
        .ns("default", &[])
        .ns("myproject", &[("project", "myproject")])
        .ns("other", &[])
        .pod("default/db", &[("role", "db")], "10.233.90.2", "node1")
        .pod("default/frontend", &[("role", "frontend")], "10.233.90.3", "node1")
        .pod("default/backend", &[("role", "backend")], "10.233.96.3", "node2")
        .pod("myproject/x", &[], "10.233.96.4", "node2")
        .pod("other/y", &[("role", "frontend")], "10.233.92.4", "node3")
        .policy(
            "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
  - Ingress
  - Egress
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except:
        - 172.17.1.0/24
    - namespaceSelector:
        matchLabels:
          project: myproject
    - podSelector:
        matchLabels:
          role: frontend
    ports:
    - protocol: TCP
      port: 6379
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/24
    ports:
    - protocol: TCP
      port: 5978
",
        );
    assert!(c.allows("default/frontend", "default/db", tcp(6379)), "same node");
    assert!(c.allows("myproject/x", "default/db", tcp(6379)), "cross node");
    assert!(c.allows("ext:172.17.0.9", "default/db", tcp(6379)));
    assert!(!c.allows("ext:172.17.1.9", "default/db", tcp(6379)), "except");
    assert!(!c.allows("default/frontend", "default/db", tcp(80)));
    assert!(!c.allows("default/backend", "default/db", tcp(6379)));
    assert!(
        !c.allows("other/y", "default/db", tcp(6379)),
        "frontend of another namespace"
    );
    assert!(c.allows("default/db", "ext:10.0.0.7", tcp(5978)));
    assert!(!c.allows("default/db", "ext:10.0.0.7", tcp(5979)));
    assert!(!c.allows("default/db", "default/frontend", tcp(80)));
    assert!(
        c.allows("default/frontend", "default/backend", tcp(80)),
        "unselected pods stay open"
    );
}

#[test]
fn seed001_section6_examples() {
    let base = || {
        Cluster::new()
            .ns("default", &[])
            .ns("prod", &[("role", "prod")])
            .ns("dev", &[])
            .pod("default/nginx", &[("app", "nginx")], "10.233.90.2", "node1")
            .pod("default/demo", &[("app", "demo")], "10.233.90.3", "node1")
            .pod("default/web", &[("app", "web")], "10.233.96.2", "node2")
            .pod("default/myapp", &[("app", "myapp")], "10.233.92.2", "node3")
            .pod("prod/p", &[], "10.233.96.3", "node2")
            .pod("dev/d", &[("app", "demo")], "10.233.90.4", "node1")
    };
    // 6.1 deny-nginx
    let c = base().policy(
        "metadata: {name: deny-nginx, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: nginx}}\n",
    );
    assert!(!c.allows("default/demo", "default/nginx", tcp(80)));
    assert!(c.allows("default/demo", "default/web", tcp(80)));
    // 6.2 access-nginx
    let c = base().policy(
        "metadata: {name: access-nginx, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: nginx}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: demo}}\n",
    );
    assert!(c.allows("default/demo", "default/nginx", tcp(80)));
    assert!(
        !c.allows("dev/d", "default/nginx", tcp(80)),
        "demo label in another namespace"
    );
    assert!(!c.allows("default/web", "default/nginx", tcp(80)));
    // 6.3 default-deny
    let c = base().policy("metadata: {name: default-deny, namespace: default}\nspec:\n  podSelector: {}\n");
    assert!(!c.allows("default/demo", "default/nginx", tcp(80)));
    assert!(!c.allows("prod/p", "default/web", tcp(80)));
    // 6.4 deny-namespace: only the own namespace gets in
    let c = base().policy(
        "metadata: {name: deny-namespace, namespace: default}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n",
    );
    assert!(c.allows("default/demo", "default/myapp", tcp(80)));
    assert!(!c.allows("prod/p", "default/myapp", tcp(80)));
    // 6.5 access-namespace
    let c = base().policy(
        "metadata: {name: access-namespace, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: myapp}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {role: prod}}\n",
    );
    assert!(c.allows("prod/p", "default/myapp", tcp(80)));
    assert!(!c.allows("dev/d", "default/myapp", tcp(80)));
    assert!(!c.allows("default/demo", "default/myapp", tcp(80)));
    // 6.6 web-allow-external
    let c = base().policy(
        "metadata: {name: web-allow-external, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports:\n    - port: 80\n    from: []\n",
    );
    assert!(c.allows("ext:1.2.3.4", "default/web", tcp(80)));
    assert!(c.allows("dev/d", "default/web", tcp(80)));
    assert!(!c.allows("ext:1.2.3.4", "default/web", tcp(443)));
    assert!(!c.allows("ext:1.2.3.4", "default/web", udp(80)));
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
    // The seed's veth name, and its TW chain in warren's naming.
    let sim = c.sim();
    let pod = match c.endpoint("ingress/kuard-vnode-ingress-7b6868dd49-drldk") {
        policy::Endpoint::Pod(i) => i,
        _ => unreachable!(),
    };
    assert_eq!(sim.iface_of(pod), Some("calid3b581beed8"));
    assert_eq!(sim.to_chain_of(pod).as_deref(), Some("WARREN-TW-calid3b581beed8"));
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
