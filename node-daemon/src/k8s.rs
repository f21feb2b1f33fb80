//! The Kubernetes side: reflectors (generic over the kind, so policy adds Pods, Namespaces and
//! NetworkPolicies the same way), the Node store used for block claims, and the Node condition.

use std::fmt::Debug;
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Watch events not yet compiled: they wake the main loop, and the arrival of the oldest is kept
/// so that a pass can tell how long an event waited until the dataplane had it.
#[derive(Default)]
pub struct Changes {
    notify: Notify,
    oldest: Mutex<Option<Instant>>,
}

impl Changes {
    /// Records one event.
    pub fn poke(&self) {
        self.oldest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
        self.notify.notify_one();
    }

    /// Waits for an event (one that came while nobody waited counts as well).
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// The arrival of the oldest event not taken yet; a pass takes it before it reads the stores,
    /// so an event that comes during the pass is timed by the next one.
    pub fn take_oldest(&self) -> Option<Instant> {
        self.oldest.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// How long an event-driven pass waits before it starts: not at all after a quiet spell (one
/// policy edit is programmed at once), else until `min_interval` after the previous pass
/// started, so that a burst of events (a Deployment scaling, a relist) costs at most one pass
/// per interval, like kube-proxy's `minSyncPeriod`.
pub fn pass_delay(previous_start: Option<Instant>, now: Instant, min_interval: Duration) -> Duration {
    previous_start.map_or(Duration::ZERO, |p| (p + min_interval).saturating_duration_since(now))
}

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
/// reads (managedFields are dropped for every kind). Pods are best reflected as
/// [`SlimPod`](crate::slim_pod::SlimPod)s, which never deserialize more than that.
pub fn reflect<K>(api: Api<K>, changed: Arc<Changes>, metrics: Arc<Metrics>, strip: fn(&mut K)) -> Reflected<K>
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
                    changed.poke();
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => changed.poke(),
                Err(e) => {
                    Metrics::inc(&metrics.api_errors);
                    tracing::warn!(kind = %K::kind(&K::DynamicType::default()), error = %e, "watch failed; retrying with backoff");
                }
            }
        }
    });
    Reflected { store, synced }
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
    use crate::slim_pod::SlimPod;
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kube::api::DeleteParams;
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use serde_json::json;

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..100 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: not within 5 s");
    }

    /// The daemon's pod reflector against the lab's API stand-in (HTTPS, token, list then
    /// watch): pods listed before it starts and pods changed or deleted after, read as
    /// `SlimPod`s.
    #[tokio::test]
    async fn should_reflect_slim_pods_from_an_api_server() {
        let state = tempfile::tempdir().unwrap();
        let server = lab_apiserver::Server::start(lab_apiserver::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: state.path().to_path_buf(),
            token: None,
            extra_sans: vec![],
        })
        .await
        .unwrap();
        let kc = Kubeconfig::from_yaml(&lab_apiserver::kubeconfig(
            &server.url(),
            server.ca_pem(),
            server.token(),
        ))
        .unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        let client = Client::try_from(cfg).unwrap();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap(),
            )
            .await
            .unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
        let pod = |name: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"app": "web"}, "annotations": {"note": "not kept"}},
                "spec": {"nodeName": "node1", "containers": [{"name": "app", "image": "nginx",
                         "ports": [{"name": "http", "containerPort": 8080}]}]}
            }))
            .unwrap()
        };
        pods.create(&PostParams::default(), &pod("listed")).await.unwrap();

        let changes = Arc::new(Changes::default());
        let reflected = reflect(
            Api::<SlimPod>::all(client.clone()),
            changes.clone(),
            Arc::new(Metrics::default()),
            keep_all,
        );
        let get = |name: &str| reflected.store.get(&reflector::ObjectRef::new(name).within("shop"));
        eventually("the initial list", || {
            reflected.synced.load(Ordering::Acquire) && get("listed").is_some()
        })
        .await;
        let listed = get("listed").unwrap();
        assert_eq!(listed.labels.get("app"), Some("web"));
        assert!(listed.metadata.annotations.is_none());
        assert!(listed.metadata.resource_version.is_some() && listed.metadata.creation_timestamp.is_some());
        let spec = listed.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node1"));
        assert_eq!(spec.containers[0].ports[0].container_port, 8080);

        // The list's end is an event, so the first pass runs; what it took is gone.
        assert!(changes.take_oldest().is_some());
        assert!(changes.take_oldest().is_none());
        let before = Instant::now();
        pods.create(&PostParams::default(), &pod("watched")).await.unwrap();
        eventually("a pod added", || get("watched").is_some()).await;
        let oldest = changes.take_oldest().expect("a watch event is recorded");
        assert!(oldest >= before);
        pods.patch_status(
            "watched",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "10.233.90.5"}})),
        )
        .await
        .unwrap();
        eventually("a pod's IP", || {
            get("watched").is_some_and(|p| {
                p.status
                    .as_ref()
                    .is_some_and(|s| s.pod_ip.as_deref() == Some("10.233.90.5"))
            })
        })
        .await;
        pods.delete("listed", &DeleteParams::default()).await.unwrap();
        eventually("a pod deleted", || get("listed").is_none()).await;
        server.shutdown().await;
    }

    #[test]
    fn should_start_a_pass_at_once_after_a_quiet_spell_and_space_out_a_burst() {
        let min = Duration::from_millis(50);
        let t0 = Instant::now();
        assert_eq!(
            pass_delay(None, t0, min),
            Duration::ZERO,
            "the first pass waits for nothing"
        );
        let later = t0 + Duration::from_millis(200);
        assert_eq!(
            pass_delay(Some(t0), later, min),
            Duration::ZERO,
            "an edit after a quiet spell"
        );
        let soon = t0 + Duration::from_millis(20);
        assert_eq!(
            pass_delay(Some(t0), soon, min),
            Duration::from_millis(30),
            "a burst's next event"
        );
        assert_eq!(pass_delay(Some(t0), t0 + min, min), Duration::ZERO);
    }

    #[tokio::test]
    async fn should_keep_the_oldest_event_until_a_pass_takes_it() {
        let c = Changes::default();
        assert!(c.take_oldest().is_none());
        c.poke();
        let first = c.take_oldest().expect("one event");
        c.poke();
        std::thread::sleep(Duration::from_millis(2));
        c.poke();
        let second = c.take_oldest().expect("two more events");
        assert!(second >= first);
        assert!(
            second.elapsed() >= Duration::from_millis(2),
            "the older of the two is kept"
        );
        // Pokes before anyone waits are not lost: the waiter returns at once.
        tokio::time::timeout(Duration::from_secs(1), c.wait())
            .await
            .expect("a poke made while nobody waited wakes the next wait");
    }
}
