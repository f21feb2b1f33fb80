//! The Kubernetes side: reflectors (generic over the kind, so policy adds Pods, Namespaces and
//! NetworkPolicies the same way), the Node store used for block claims, and the Node condition.

use std::fmt::Debug;
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
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
pub fn reflect<K>(api: Api<K>, changed: Arc<Notify>, metrics: Arc<Metrics>) -> Reflected<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let synced = Arc::new(AtomicBool::new(false));
    let flag = synced.clone();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o: &mut K| {
            o.meta_mut().managed_fields = None;
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
