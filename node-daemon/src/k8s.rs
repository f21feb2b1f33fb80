//! The Kubernetes side: reflectors (generic over the kind, so policy adds Pods, Namespaces and
//! NetworkPolicies the same way), the Node store used for block claims, and the Node condition.

use std::fmt::Debug;
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec, PodStatus};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::block::{ClaimError, NodeClaim, NodeStore};
use crate::metrics::Metrics;
use crate::routes::NodeInfo;
use conf::daemon::BLOCK_ANNOTATION;

/// A reflected kind: its store, whether its initial list is complete, and a notifier poked on
/// every change.
pub struct Reflected<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    pub store: Store<K>,
    pub synced: Arc<AtomicBool>,
}

/// Starts a reflector for `api` in the background. The watcher relists by itself after a 410
/// (expired resourceVersion) and `default_backoff` spaces out reconnects, so a dead API server
/// costs one attempt per backoff step, never a busy loop; the store keeps the last state
/// meanwhile, so the dataplane stays as it is.
/// Each object goes through `strip` before it is stored: the store keeps only what the daemon
/// reads (managedFields are dropped for every kind).
pub fn reflect<K>(api: Api<K>, changed: Arc<Notify>, metrics: Arc<Metrics>, strip: fn(&mut K)) -> Reflected<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let synced = Arc::new(AtomicBool::new(false));
    let flag = synced.clone();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(move |o: &mut K| {
            o.meta_mut().managed_fields = None;
            strip(o);
        })
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => {
                    flag.store(true, Ordering::Release);
                    changed.notify_one();
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    Metrics::inc(&metrics.api_errors);
                    tracing::warn!(kind = %K::kind(&K::DynamicType::default()), error = %e, "watch failed; retrying with backoff");
                }
            }
        }
    });
    Reflected { store, synced }
}

/// Keeps what NetworkPolicy and the pod-programmed metric read of a Pod: its metadata (names,
/// labels, resourceVersion, creationTimestamp), node, host-network flag, container ports, phase
/// and IPs. A whole Pod (status conditions, container statuses, volumes, env, probes,
/// annotations) is ~20 KB in memory: ~200 MiB of store at 10 000 pods, against issue 5's 60 MiB.
pub fn strip_pod(p: &mut Pod) {
    p.metadata.annotations = None;
    p.metadata.owner_references = None;
    p.metadata.finalizers = None;
    if let Some(spec) = p.spec.take() {
        let containers = spec
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports,
                ..Container::default()
            })
            .collect();
        p.spec = Some(PodSpec {
            containers,
            host_network: spec.host_network,
            node_name: spec.node_name,
            ..PodSpec::default()
        });
    }
    if let Some(status) = p.status.take() {
        p.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..PodStatus::default()
        });
    }
}

/// For kinds kept whole (but for their managedFields).
pub fn keep_all<K>(_: &mut K) {}

/// The node's IPv4 InternalIP.
pub fn internal_ip(n: &Node) -> Option<Ipv4Addr> {
    n.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

pub fn to_claim(n: &Node) -> NodeClaim {
    NodeClaim {
        name: n.name_any(),
        resource_version: n.resource_version().unwrap_or_default(),
        pod_cidr: n
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.clone())
            .filter(|c| !c.is_empty()),
        annotation: n.annotations().get(BLOCK_ANNOTATION).cloned(),
    }
}

pub fn to_info(n: &Node) -> NodeInfo {
    NodeInfo {
        name: n.name_any(),
        internal_ip: internal_ip(n),
        block: crate::block::block_of(&to_claim(n)),
    }
}

/// Block claims against the real API: replace with the read resourceVersion, 409 → conflict.
pub struct KubeNodes {
    pub api: Api<Node>,
}

fn api_err(e: kube::Error) -> ClaimError {
    match e {
        kube::Error::Api(s) if s.code == 409 => ClaimError::Conflict,
        other => ClaimError::Api(other.to_string()),
    }
}

impl NodeStore for KubeNodes {
    async fn list(&self) -> Result<Vec<NodeClaim>, ClaimError> {
        let list = self.api.list(&ListParams::default()).await.map_err(api_err)?;
        Ok(list.items.iter().map(to_claim).collect())
    }

    async fn set_block(&self, node: &str, rv: &str, block: Ipv4Net) -> Result<(), ClaimError> {
        let mut obj = self.api.get(node).await.map_err(api_err)?;
        if obj.resource_version().as_deref() != Some(rv) {
            return Err(ClaimError::Conflict);
        }
        obj.annotations_mut()
            .insert(BLOCK_ANNOTATION.to_string(), block.to_string());
        self.api
            .replace(node, &PostParams::default(), &obj)
            .await
            .map_err(api_err)?;
        Ok(())
    }
}

/// Sets `NetworkUnavailable=False` (strategic merge keyed by condition type, so kubelet's other
/// conditions stay).
pub async fn set_network_available(client: &Client, node: &str) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({
        "status": { "conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "WarrenIsUp",
            "message": "warren-node programmed this node's routes",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}
    });
    api.patch_status(node, &PatchParams::default(), &Patch::Strategic(patch))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(host_network: bool, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-1", "namespace": "shop", "resourceVersion": "42", "uid": "u-1",
                "creationTimestamp": "2026-11-23T10:00:00Z",
                "labels": {"app": "web", "tier": "front"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4000)},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "r"}]
            },
            "spec": {
                "nodeName": "node2", "hostNetwork": host_network,
                "containers": [{
                    "name": "app", "image": "nginx", "env": [{"name": "A", "value": "b".repeat(2000)}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                              {"name": "dns", "containerPort": 53, "protocol": "UDP"}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}
                }],
                "volumes": [{"name": "token", "projected": {"sources": []}}]
            },
            "status": {
                "phase": phase, "podIP": "10.233.90.7", "podIPs": [{"ip": "10.233.90.7"}],
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "nginx",
                                       "imageID": "sha256:abc"}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn should_strip_a_pod_to_what_policy_reads_and_nothing_less() {
        for (host, phase) in [
            (false, "Running"),
            (false, "Pending"),
            (false, "Succeeded"),
            (true, "Running"),
        ] {
            let full = pod(host, phase);
            let mut kept = full.clone();
            strip_pod(&mut kept);
            assert_eq!(
                policy::convert::convert_pod(&kept),
                policy::convert::convert_pod(&full),
                "{host} {phase}"
            );
            assert_eq!(kept.metadata.resource_version, full.metadata.resource_version);
            assert_eq!(kept.metadata.creation_timestamp, full.metadata.creation_timestamp);
            let size = |p: &Pod| serde_json::to_string(p).unwrap().len();
            assert!(
                size(&kept) * 10 < size(&full),
                "{} of {} bytes kept",
                size(&kept),
                size(&full)
            );
        }
        assert!(policy::convert::convert_pod(&pod(false, "Running")).is_some_and(|p| p.ports.len() == 2));
    }
}
