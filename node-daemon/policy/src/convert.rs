//! From Kubernetes API objects (k8s-openapi types) to the model, with the API's defaults applied
//! and anything warren cannot enforce reported per policy.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{
    Model, NamedPort, Namespace, Operator, PackedLabels, Peer, Pod, Policy, PolicyError, PolicyRef, PortMatch,
    PortSpec, Protocol, Requirement, Rule, Selector,
};

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The namespace of a namespaced object that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The namespace a pod or policy converts into: callers that key converted objects (the daemon's
/// conversion cache) must agree with the model on it.
pub fn object_namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
}

/// The model plus the policies that were reported and left out.
#[derive(Debug, Clone, Default)]
pub struct Converted {
    pub model: Model,
    pub errors: Vec<PolicyError>,
}

pub fn convert(namespaces: &[core::Namespace], pods: &[core::Pod], policies: &[net::NetworkPolicy]) -> Converted {
    let mut out = Converted::default();
    for ns in namespaces {
        if let Some(n) = convert_namespace(ns) {
            out.model.namespaces.insert(n.name.clone(), n);
        }
    }
    out.model.pods = Arc::new(pods.iter().filter_map(convert_pod).collect());
    for p in policies {
        match convert_policy(p) {
            Ok(p) => out.model.policies.push(p.into()),
            Err(e) => out.errors.push(e),
        }
    }
    out
}

pub fn convert_namespace(ns: &core::Namespace) -> Option<Namespace> {
    let name = ns.metadata.name.clone()?;
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels
        .entry(NAMESPACE_NAME_LABEL.to_string())
        .or_insert_with(|| name.clone());
    Some(Namespace { name, labels })
}

fn protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

/// A pod as policy sees it; None for pods that take no part (host network, finished).
pub fn convert_pod(p: &core::Pod) -> Option<Pod> {
    let spec = p.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = p.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    ) {
        // Its IP may already belong to a new pod (IP reuse).
        return None;
    }
    let ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    let mut ports = vec![];
    for c in &spec.containers {
        for cp in c.ports.iter().flatten() {
            let (Some(name), Ok(proto), Ok(port)) = (
                cp.name.as_ref(),
                protocol(cp.protocol.as_deref()),
                u16::try_from(cp.container_port),
            ) else {
                continue;
            };
            ports.push(NamedPort {
                name: name.clone(),
                protocol: proto,
                port,
            });
        }
    }
    Some(Pod {
        namespace: object_namespace(&p.metadata).to_string(),
        name: p.metadata.name.clone()?,
        labels: Arc::new(PackedLabels::new(
            p.metadata
                .labels
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )),
        ip,
        node: spec.node_name.clone().unwrap_or_default(),
        ports: ports.into(),
    })
}

pub fn convert_selector(s: &LabelSelector) -> Result<Selector, String> {
    let mut out = Selector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: vec![],
    };
    for r in s.match_expressions.iter().flatten() {
        let operator = match r.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => return Err(format!("unknown selector operator {other:?}")),
        };
        let values = r.values.clone().unwrap_or_default();
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(format!("selector operator {} on {:?} needs values", r.operator, r.key))
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(format!(
                    "selector operator {} on {:?} takes no values",
                    r.operator, r.key
                ))
            }
            _ => {}
        }
        out.match_expressions.push(Requirement {
            key: r.key.clone(),
            operator,
            values,
        });
    }
    Ok(out)
}

fn convert_peer(p: &net::NetworkPolicyPeer) -> Result<Peer, String> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(b), None, None) => {
            let cidr: Ipv4Net = b
                .cidr
                .parse()
                .map_err(|_| format!("bad ipBlock cidr {:?} (warren enforces IPv4)", b.cidr))?;
            let mut except = vec![];
            for e in b.except.iter().flatten() {
                except.push(e.parse().map_err(|_| format!("bad ipBlock except {e:?}"))?);
            }
            Ok(Peer::IpBlock { cidr, except })
        }
        (Some(_), _, _) => Err("ipBlock cannot be combined with selectors in one peer".into()),
        (None, None, None) => Err("empty peer".into()),
        (None, ns, pods) => Ok(Peer::Pods {
            namespaces: ns.as_ref().map(convert_selector).transpose()?,
            pods: pods.as_ref().map(convert_selector).transpose()?,
        }),
    }
}

fn convert_port(p: &net::NetworkPolicyPort) -> Result<PortMatch, String> {
    let protocol = protocol(p.protocol.as_deref())?;
    let port = match (&p.port, p.end_port) {
        (None, None) => None,
        (None, Some(_)) => return Err("endPort without port".into()),
        (Some(IntOrString::Int(n)), end) => {
            let port = u16::try_from(*n)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("bad port {n}"))?;
            let end = end
                .map(|e| {
                    u16::try_from(e)
                        .ok()
                        .filter(|e| *e >= port)
                        .ok_or(format!("bad endPort {e}"))
                })
                .transpose()?;
            Some(PortSpec::Number { port, end })
        }
        (Some(IntOrString::String(s)), None) => Some(PortSpec::Named(s.clone())),
        (Some(IntOrString::String(_)), Some(_)) => return Err("endPort with a named port".into()),
    };
    Ok(PortMatch { protocol, port })
}

fn convert_rule(
    peers: Option<&Vec<net::NetworkPolicyPeer>>,
    ports: Option<&Vec<net::NetworkPolicyPort>>,
) -> Result<Rule, String> {
    Ok(Rule {
        peers: peers
            .into_iter()
            .flatten()
            .map(convert_peer)
            .collect::<Result<_, _>>()?,
        ports: ports
            .into_iter()
            .flatten()
            .map(convert_port)
            .collect::<Result<_, _>>()?,
    })
}

/// One NetworkPolicy, or the reason it is left out.
pub fn convert_policy(p: &net::NetworkPolicy) -> Result<Policy, PolicyError> {
    let id = PolicyRef {
        namespace: object_namespace(&p.metadata).to_string(),
        name: p.metadata.name.clone().unwrap_or_default(),
    };
    let bad = |reason: String| PolicyError {
        policy: id.clone(),
        reason,
    };
    let spec = p.spec.clone().unwrap_or_default();
    let pod_selector = spec
        .pod_selector
        .as_ref()
        .map(convert_selector)
        .transpose()
        .map_err(&bad)?
        .unwrap_or_default();
    let mut ingress = vec![];
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        ingress
            .push(convert_rule(r.from.as_ref(), r.ports.as_ref()).map_err(|e| bad(format!("ingress rule {i}: {e}")))?);
    }
    let mut egress = vec![];
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        egress.push(convert_rule(r.to.as_ref(), r.ports.as_ref()).map_err(|e| bad(format!("egress rule {i}: {e}")))?);
    }
    let (ingress_type, egress_type) = match &spec.policy_types {
        None => Policy::default_types(egress.len()),
        Some(types) => {
            let mut t = (false, false);
            for ty in types {
                match ty.as_str() {
                    "Ingress" => t.0 = true,
                    "Egress" => t.1 = true,
                    other => return Err(bad(format!("unknown policyType {other:?}"))),
                }
            }
            t
        }
    };
    let policy = Policy {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        pod_selector,
        ingress_type,
        egress_type,
        ingress,
        egress,
    };
    policy.validate()?;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(spec: serde_json::Value) -> Result<Policy, PolicyError> {
        let np: net::NetworkPolicy =
            serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": spec})).unwrap();
        convert_policy(&np)
    }

    #[test]
    fn should_default_policy_types_and_protocol() {
        let p = policy(json!({"podSelector": {}})).unwrap();
        assert!(p.ingress_type && !p.egress_type);
        let p = policy(json!({"podSelector": {}, "egress": [{"ports": [{"port": 53}]}]})).unwrap();
        assert!(p.ingress_type && p.egress_type);
        assert_eq!(p.egress[0].ports[0], PortMatch::tcp(53));
        let p = policy(json!({"podSelector": {}, "egress": []})).unwrap();
        assert!(!p.egress_type, "an empty egress list is not 'any egress rules'");
        let p = policy(json!({"podSelector": {}, "policyTypes": ["Egress"]})).unwrap();
        assert!(!p.ingress_type && p.egress_type);
        let p = policy(json!({})).unwrap();
        assert_eq!(p.pod_selector, Selector::everything(), "absent podSelector selects all");
    }

    #[test]
    fn should_convert_peers_and_ports() {
        let p = policy(json!({"ingress": [{
            "from": [
                {"namespaceSelector": {"matchLabels": {"a": "b"}}, "podSelector": {"matchExpressions": [{"key": "k", "operator": "Exists"}]}},
                {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}
            ],
            "ports": [{"port": "http", "protocol": "UDP"}, {"port": 80, "endPort": 90, "protocol": "SCTP"}, {"protocol": "TCP"}]
        }]}))
        .unwrap();
        let r = &p.ingress[0];
        assert!(
            matches!(&r.peers[0], Peer::Pods { namespaces: Some(_), pods: Some(s) } if s.match_expressions[0].operator == Operator::Exists)
        );
        assert_eq!(r.peers[1], Peer::ip_block("10.0.0.0/8", &["10.1.0.0/16"]));
        assert_eq!(r.ports[0].port, Some(PortSpec::Named("http".into())));
        assert_eq!(r.ports[0].protocol, Protocol::Udp);
        assert_eq!(
            r.ports[1].port,
            Some(PortSpec::Number {
                port: 80,
                end: Some(90)
            })
        );
        assert_eq!(r.ports[2].port, None);
    }

    #[test]
    fn should_report_what_cannot_be_enforced() {
        for (spec, needle) in [
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "nonsense"}}]}]}),
                "cidr",
            ),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "fd00::/64"}}]}]}),
                "IPv4",
            ),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}),
                "subset",
            ),
            (json!({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}), "protocol"),
            (
                json!({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
                "endPort",
            ),
            (
                json!({"ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
                "named",
            ),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
                "combined",
            ),
            (json!({"ingress": [{"from": [{}]}]}), "empty peer"),
            (
                json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}}),
                "operator",
            ),
            (
                json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
                "needs values",
            ),
            (json!({"policyTypes": ["Sideways"]}), "policyType"),
        ] {
            let e = policy(spec.clone()).unwrap_err();
            assert_eq!(e.policy.to_string(), "ns/p");
            assert!(e.reason.contains(needle), "{spec}: {}", e.reason);
        }
    }

    #[test]
    fn should_keep_only_pods_that_take_part() {
        let pod = |extra: serde_json::Value| -> core::Pod {
            let mut v = json!({
                "metadata": {"name": "x", "namespace": "ns", "labels": {"app": "a"}},
                "spec": {"nodeName": "node1", "containers": [{"name": "c", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                    {"containerPort": 9999}
                ]}]},
                "status": {"podIP": "10.233.90.5", "phase": "Running"}
            });
            for (path, val) in extra.as_object().unwrap() {
                let (a, b) = path.split_once('.').unwrap();
                v[a][b] = val.clone();
            }
            serde_json::from_value(v).unwrap()
        };
        let p = convert_pod(&pod(json!({}))).unwrap();
        assert_eq!(p.ip, Some("10.233.90.5".parse().unwrap()));
        assert_eq!(p.node, "node1");
        assert_eq!(p.named_port("http", Protocol::Tcp), Some(8080));
        assert_eq!(p.named_port("dns", Protocol::Udp), Some(53));
        assert_eq!(p.named_port("dns", Protocol::Tcp), None);
        assert_eq!(p.ports.len(), 2, "unnamed ports cannot be referenced");
        assert!(convert_pod(&pod(json!({"spec.hostNetwork": true}))).is_none());
        assert!(convert_pod(&pod(json!({"status.phase": "Succeeded"}))).is_none());
        assert!(convert_pod(&pod(json!({"status.phase": "Failed"}))).is_none());
        assert_eq!(convert_pod(&pod(json!({"status.podIP": null}))).unwrap().ip, None);
    }

    #[test]
    fn should_label_namespaces_with_their_name() {
        let ns: core::Namespace =
            serde_json::from_value(json!({"metadata": {"name": "bar", "labels": {"region": "bar"}}})).unwrap();
        let n = convert_namespace(&ns).unwrap();
        assert_eq!(n.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str), Some("bar"));
        assert_eq!(n.labels.get("region").map(String::as_str), Some("bar"));
    }
}
