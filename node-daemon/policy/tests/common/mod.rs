//! Test cluster builder: pods, namespaces and policies (policies as Kubernetes YAML through
//! `convert`, so the tests also exercise the converter), and a `check` that sends a packet along
//! its real path through the compiled rules of every node AND asks the reference evaluator,
//! insisting they agree.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::net::Ipv4Addr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::convert::{convert_namespace, convert_policy};
use policy::model::{Model, NamedPort, Pod, Protocol};
use policy::query::ClusterSim;
use policy::reference::{self, Endpoint, L4};

pub const NODES: [&str; 3] = ["node1", "node2", "node3"];

pub fn node_ip(node: &str) -> Ipv4Addr {
    match node {
        "node1" => Ipv4Addr::new(10, 102, 123, 117),
        "node2" => Ipv4Addr::new(10, 102, 123, 104),
        _ => Ipv4Addr::new(10, 102, 123, 143),
    }
}

#[derive(Default, Clone)]
pub struct Cluster {
    pub model: Model,
}

pub fn tcp(port: u16) -> L4 {
    Some((Protocol::Tcp, port))
}
pub fn udp(port: u16) -> L4 {
    Some((Protocol::Udp, port))
}
pub fn sctp(port: u16) -> L4 {
    Some((Protocol::Sctp, port))
}

fn labels(l: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster::default()
    }

    pub fn ns(mut self, name: &str, l: &[(&str, &str)]) -> Cluster {
        let ns = k8s_openapi::api::core::v1::Namespace {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels(l)),
                ..Default::default()
            },
            ..Default::default()
        };
        let n = convert_namespace(&ns).unwrap();
        self.model.namespaces.insert(name.into(), n);
        self
    }

    /// `at` is "ns/name"; ports are (name, protocol, number).
    pub fn pod(mut self, at: &str, l: &[(&str, &str)], ip: &str, node: &str) -> Cluster {
        self = self.pod_with_ports(at, l, ip, node, &[]);
        self
    }

    pub fn pod_with_ports(
        mut self,
        at: &str,
        l: &[(&str, &str)],
        ip: &str,
        node: &str,
        ports: &[(&str, Protocol, u16)],
    ) -> Cluster {
        let (ns, name) = at.split_once('/').unwrap();
        if !self.model.namespaces.contains_key(ns) {
            self = self.ns(ns, &[]);
        }
        std::sync::Arc::make_mut(&mut self.model.pods).push(Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: std::sync::Arc::new(labels(l).into()),
            ip: Some(ip.parse().unwrap()),
            node: node.into(),
            ports: ports
                .iter()
                .map(|(n, p, port)| NamedPort {
                    name: n.to_string(),
                    protocol: *p,
                    port: *port,
                })
                .collect(),
        });
        self
    }

    /// A NetworkPolicy manifest in YAML (as users write them).
    pub fn policy(mut self, yaml: &str) -> Cluster {
        let np: NetworkPolicy = serde_yaml::from_str(yaml).unwrap();
        self.model.policies.push(convert_policy(&np).unwrap().into());
        self
    }

    pub fn without_policy(mut self, name: &str) -> Cluster {
        self.model.policies.retain(|p| p.name != name);
        self
    }

    pub fn endpoint(&self, who: &str) -> Endpoint {
        if let Some(n) = who.strip_prefix("host:") {
            return Endpoint::Host {
                node: n.into(),
                ip: node_ip(n),
            };
        }
        if let Some(ip) = who.strip_prefix("ext:") {
            return Endpoint::External(ip.parse().unwrap());
        }
        let (ns, name) = who.split_once('/').unwrap();
        Endpoint::Pod(
            self.model
                .pods
                .iter()
                .position(|p| p.namespace == ns && p.name == name)
                .unwrap_or_else(|| panic!("no pod {who}")),
        )
    }

    pub fn sim(&self) -> ClusterSim<'_> {
        ClusterSim::new(&self.model, &NODES, "cali").unwrap()
    }

    /// Sends a new connection along its path through the compiled rules; the reference
    /// evaluator must agree. Returns the verdict.
    pub fn allows(&self, src: &str, dst: &str, l4: L4) -> bool {
        let (s, d) = (self.endpoint(src), self.endpoint(dst));
        let got = self.sim().allowed(&s, &d, l4);
        let want = reference::allowed(&self.model, &s, &d, l4);
        assert_eq!(got, want, "compiled vs reference disagree for {src} -> {dst} {l4:?}");
        got
    }
}
