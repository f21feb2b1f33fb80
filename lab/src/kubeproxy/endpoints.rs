//! Endpoints and EndpointSlices from a Service's selector (pure): the part of
//! kube-controller-manager's endpoint and endpointslice controllers the lab needs.
//!
//! Rules kept from the controllers: only pods of the Service's namespace matching its selector;
//! a pod needs an IP and a non-terminal phase; a deleting pod is left out of Endpoints and marked
//! `terminating` in the slice; not-ready pods go to `notReadyAddresses` / `ready: false` (unless
//! `publishNotReadyAddresses`); a named `targetPort` resolves to the container port of that name
//! and protocol in each pod, and a pod without it is left out of that port. Pods resolving a port
//! differently end up in different subsets / slices, as in Kubernetes. Simplified: one slice per
//! distinct port mapping (no 100-endpoint split), and slice names are derived from the Service
//! name and the mapping instead of being random, so that rewrites are idempotent.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CoreEndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use super::model::LABEL_SERVICE_NAME;

/// Label EndpointSlice controllers put on the slices they own.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`] on our slices (the real controller's, so tools treat them alike).
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
/// Label the endpoints controller puts on the Endpoints it owns.
pub const LABEL_ENDPOINTS_MANAGED_BY: &str = "endpoints.kubernetes.io/managed-by";
/// Value of [`LABEL_ENDPOINTS_MANAGED_BY`] (the real controller's).
pub const ENDPOINTS_MANAGED_BY: &str = "endpoint-controller";

/// One resolved service port: (name, port, protocol).
type PortKey = (String, i32, String);

#[derive(Debug, Clone)]
struct PodEndpoint {
    ip: String,
    node_name: Option<String>,
    pod_name: String,
    uid: Option<String>,
    ready: bool,
    terminating: bool,
}

/// Is `service` one whose endpoints the controllers manage? (It has a selector.)
pub fn has_selector(service: &Service) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty())
}

fn selector_matches(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The container port a service port's `targetPort` designates in `pod`.
pub fn resolve_target_port(target: Option<&IntOrString>, service_port: i32, protocol: &str, pod: &Pod) -> Option<i32> {
    match target {
        None => Some(service_port),
        Some(IntOrString::Int(p)) => Some(*p),
        Some(IntOrString::String(s)) => {
            if let Ok(p) = s.parse::<i32>() {
                return Some(p);
            }
            let spec = pod.spec.as_ref()?;
            spec.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|cp| {
                    cp.name.as_deref() == Some(s.as_str()) && cp.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .map(|cp| cp.container_port)
        }
    }
}

/// Endpoints and EndpointSlices the controllers would write for `service` given `pods` (pods of
/// other namespaces are ignored). A Service without selector gets nothing (`None`): its
/// endpoints are the user's. The slices are sorted by name.
pub fn endpoints_for(service: &Service, pods: &[Pod]) -> Option<(Endpoints, Vec<EndpointSlice>)> {
    let spec = service.spec.as_ref()?;
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    let namespace = service.metadata.namespace.clone()?;
    let name = service.metadata.name.clone()?;
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let ipv6 = spec.cluster_ip.as_deref().is_some_and(|ip| ip.contains(':'));

    // Group pods by how they resolve the service's ports: one subset / slice per group.
    let mut groups: BTreeMap<Vec<PortKey>, Vec<PodEndpoint>> = BTreeMap::new();
    for pod in pods {
        if pod.metadata.namespace.as_deref() != Some(namespace.as_str()) || !selector_matches(selector, pod) {
            continue;
        }
        let Some(status) = pod.status.as_ref() else { continue };
        let Some(ip) = status.pod_ip.clone().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        if ip.contains(':') != ipv6 {
            continue;
        }
        if matches!(status.phase.as_deref(), Some("Succeeded") | Some("Failed")) {
            continue;
        }
        let mut ports: Vec<PortKey> = Vec::new();
        for sp in spec.ports.iter().flatten() {
            let protocol = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
            if let Some(p) = resolve_target_port(sp.target_port.as_ref(), sp.port, &protocol, pod) {
                ports.push((sp.name.clone().unwrap_or_default(), p, protocol));
            }
        }
        let terminating = pod.metadata.deletion_timestamp.is_some();
        groups.entry(ports).or_default().push(PodEndpoint {
            ip,
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            pod_name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone(),
            ready: publish_not_ready || pod_ready(pod),
            terminating,
        });
    }
    for eps in groups.values_mut() {
        eps.sort_by(|a, b| a.ip.cmp(&b.ip));
    }

    let target_ref = |ep: &PodEndpoint| ObjectReference {
        kind: Some("Pod".into()),
        namespace: Some(namespace.clone()),
        name: Some(ep.pod_name.clone()),
        uid: ep.uid.clone(),
        ..Default::default()
    };
    let owner = service.metadata.uid.clone().map(|uid| OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: name.clone(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    });

    let mut subsets = Vec::new();
    for (ports, eps) in &groups {
        // Endpoints leave out deleting pods and subsets without ports.
        let live: Vec<&PodEndpoint> = eps.iter().filter(|e| !e.terminating).collect();
        if ports.is_empty() || live.is_empty() {
            continue;
        }
        let addr = |e: &&PodEndpoint| EndpointAddress {
            ip: e.ip.clone(),
            node_name: e.node_name.clone(),
            target_ref: Some(target_ref(e)),
            ..Default::default()
        };
        let ready: Vec<EndpointAddress> = live.iter().filter(|e| e.ready).map(addr).collect();
        let not_ready: Vec<EndpointAddress> = live.iter().filter(|e| !e.ready).map(addr).collect();
        subsets.push(EndpointSubset {
            addresses: (!ready.is_empty()).then_some(ready),
            not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, proto)| CoreEndpointPort {
                        name: (!n.is_empty()).then(|| n.clone()),
                        port: *p,
                        protocol: Some(proto.clone()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        });
    }
    // The controller copies the Service's labels and adds its own.
    let mut ep_labels = service.metadata.labels.clone().unwrap_or_default();
    ep_labels.insert(LABEL_ENDPOINTS_MANAGED_BY.to_string(), ENDPOINTS_MANAGED_BY.to_string());
    let endpoints = Endpoints {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(ep_labels),
            ..Default::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    };

    let mut slices = Vec::new();
    let mut slice_groups: Vec<(&Vec<PortKey>, &Vec<PodEndpoint>)> = groups.iter().collect();
    if slice_groups.is_empty() {
        // The controller keeps one empty slice so that consumers see "no endpoints" explicitly.
        slice_groups.push((&EMPTY_PORTS, &EMPTY_EPS));
    }
    for (ports, eps) in slice_groups {
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_SERVICE_NAME.to_string(), name.clone());
        labels.insert(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string());
        slices.push(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(slice_name(&name, ports)),
                namespace: Some(namespace.clone()),
                labels: Some(labels),
                owner_references: owner.clone().map(|o| vec![o]),
                ..Default::default()
            },
            address_type: if ipv6 { "IPv6".into() } else { "IPv4".into() },
            endpoints: Some(
                eps.iter()
                    .map(|e| Endpoint {
                        addresses: vec![e.ip.clone()],
                        conditions: Some(EndpointConditions {
                            ready: Some(e.ready && !e.terminating),
                            serving: Some(e.ready),
                            terminating: Some(e.terminating),
                        }),
                        node_name: e.node_name.clone(),
                        target_ref: Some(target_ref(e)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, proto)| EndpointPort {
                        name: Some(n.clone()),
                        port: Some(*p),
                        protocol: Some(proto.clone()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        });
    }
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Some((endpoints, slices))
}

static EMPTY_PORTS: Vec<PortKey> = Vec::new();
static EMPTY_EPS: Vec<PodEndpoint> = Vec::new();

/// `<service>-<10 hex of sha256(port mapping)>`, cut so the name stays a valid DNS label.
fn slice_name(service: &str, ports: &[PortKey]) -> String {
    let key: Vec<String> = ports.iter().map(|(n, p, proto)| format!("{n}/{p}/{proto}")).collect();
    let digest = Sha256::digest(key.join(",").as_bytes());
    let hash: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    let prefix: String = service.chars().take(63 - 11).collect();
    format!("{prefix}-{hash}")
}
