//! The long-running loops: the endpoints controller (one per cluster) and the proxy (one per
//! node, run inside that node's network namespace by the lab — no setns here).
//!
//! Both keep kube-rs reflectors of what they read, and on any change (debounced) recompute
//! everything from the stores; a periodic resync repairs drift, as kube-proxy's sync period does.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use super::apply::{detect_host_options, Iptables};
use super::endpoints::{endpoints_for, has_selector, LABEL_ENDPOINTS_MANAGED_BY, LABEL_MANAGED_BY, MANAGED_BY};
use super::model::{ProxyInput, LABEL_SERVICE_NAME};
use super::{sync, Mode};

/// Changes arriving within this window are handled by one sync.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Full resync period (kube-proxy's `--iptables-sync-period` is 30 s).
const RESYNC: Duration = Duration::from_secs(30);

/// Starts a reflector for `api` whose events wake `notify`; returns its store.
fn reflect<K>(api: Api<K>, config: watcher::Config, notify: Arc<Notify>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => notify.notify_one(),
                Err(e) => tracing::warn!(%kind, error = %e, "watch error (retrying)"),
            }
        }
        tracing::error!(%kind, "watch stream ended");
    });
    store
}

/// Waits for a change (or the resync period), then lets further changes settle.
async fn next_round(notify: &Notify) {
    tokio::select! {
        _ = notify.notified() => {}
        _ = tokio::time::sleep(RESYNC) => {}
    }
    tokio::time::sleep(DEBOUNCE).await;
}

fn owned<K: Clone>(items: Vec<Arc<K>>) -> Vec<K> {
    items.into_iter().map(|a| (*a).clone()).collect()
}

/// Keeps Endpoints and EndpointSlices of every selector Service in line with its pods: creates
/// or replaces only what changed, deletes what belongs to Services that are gone.
pub async fn run_endpoints_controller(client: Client) -> anyhow::Result<()> {
    let notify = Arc::new(Notify::new());
    let services = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let endpoints = reflect(
        Api::<Endpoints>::all(client.clone()),
        watcher::Config::default().labels(LABEL_ENDPOINTS_MANAGED_BY),
        notify.clone(),
    );
    let slices = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}")),
        notify.clone(),
    );
    for ready in [services.wait_until_ready().await, pods.wait_until_ready().await] {
        ready.context("reflector stopped before its first list")?;
    }
    endpoints
        .wait_until_ready()
        .await
        .context("reflector stopped before its first list")?;
    slices
        .wait_until_ready()
        .await
        .context("reflector stopped before its first list")?;
    tracing::info!("endpoints controller in sync");
    loop {
        if let Err(e) = reconcile_endpoints(&client, &services, &pods, &endpoints, &slices).await {
            tracing::warn!(error = format!("{e:#}"), "endpoints reconcile failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            notify.notify_one();
        }
        next_round(&notify).await;
    }
}

fn key_of<K: Resource>(o: &K) -> (String, String) {
    (
        o.meta().namespace.clone().unwrap_or_default(),
        o.meta().name.clone().unwrap_or_default(),
    )
}

async fn reconcile_endpoints(
    client: &Client,
    services: &Store<Service>,
    pods: &Store<Pod>,
    endpoints: &Store<Endpoints>,
    slices: &Store<EndpointSlice>,
) -> anyhow::Result<()> {
    let all_pods = owned(pods.state());
    let existing_eps: BTreeMap<_, _> = endpoints.state().into_iter().map(|e| (key_of(&*e), e)).collect();
    let existing_slices: BTreeMap<_, _> = slices.state().into_iter().map(|s| (key_of(&*s), s)).collect();
    let mut wanted_eps = BTreeSet::new();
    let mut wanted_slices = BTreeSet::new();

    for svc in services.state() {
        if !has_selector(&svc) {
            continue;
        }
        let Some((eps, desired_slices)) = endpoints_for(&svc, &all_pods) else {
            continue;
        };
        let (ns, name) = key_of(&eps);
        wanted_eps.insert((ns.clone(), name.clone()));
        let api: Api<Endpoints> = Api::namespaced(client.clone(), &ns);
        match existing_eps.get(&(ns.clone(), name.clone())) {
            Some(cur) if cur.subsets == eps.subsets && cur.metadata.labels == eps.metadata.labels => {}
            Some(cur) => {
                let mut next = eps.clone();
                next.metadata.resource_version = cur.metadata.resource_version.clone();
                api.replace(&name, &PostParams::default(), &next)
                    .await
                    .with_context(|| format!("replace Endpoints {ns}/{name}"))?;
            }
            None => create_or_replace(&api, &eps)
                .await
                .with_context(|| format!("create Endpoints {ns}/{name}"))?,
        }
        let sapi: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
        for s in desired_slices {
            let key = key_of(&s);
            wanted_slices.insert(key.clone());
            match existing_slices.get(&key) {
                Some(cur)
                    if cur.endpoints == s.endpoints
                        && cur.ports == s.ports
                        && cur.address_type == s.address_type
                        && cur.metadata.labels == s.metadata.labels => {}
                Some(cur) => {
                    let mut next = s.clone();
                    next.metadata.resource_version = cur.metadata.resource_version.clone();
                    sapi.replace(&key.1, &PostParams::default(), &next)
                        .await
                        .with_context(|| format!("replace EndpointSlice {}/{}", key.0, key.1))?;
                }
                None => create_or_replace(&sapi, &s)
                    .await
                    .with_context(|| format!("create EndpointSlice {}/{}", key.0, key.1))?,
            }
        }
    }

    for (ns, name) in existing_eps.keys().filter(|k| !wanted_eps.contains(*k)) {
        let api: Api<Endpoints> = Api::namespaced(client.clone(), ns);
        delete_ignoring_missing(&api, name)
            .await
            .with_context(|| format!("delete Endpoints {ns}/{name}"))?;
    }
    for ((ns, name), s) in existing_slices.iter().filter(|(k, _)| !wanted_slices.contains(*k)) {
        // Only slices naming a service are ours to clean up.
        if s.labels().contains_key(LABEL_SERVICE_NAME) {
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
            delete_ignoring_missing(&api, name)
                .await
                .with_context(|| format!("delete EndpointSlice {ns}/{name}"))?;
        }
    }
    Ok(())
}

/// Create; when it already exists (our store lags, or a user made it), replace it.
async fn create_or_replace<K>(api: &Api<K>, obj: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let name = obj.meta().name.clone().unwrap_or_default();
            let cur = api.get(&name).await?;
            let mut next = obj.clone();
            next.meta_mut().resource_version = cur.meta().resource_version.clone();
            api.replace(&name, &PostParams::default(), &next).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// kube-proxy in iptables mode for this node (see [`run_proxy_mode`]).
pub async fn run_proxy(
    client: Client,
    node_name: String,
    node_ips: Vec<IpAddr>,
    cluster_cidr: Option<IpNet>,
) -> anyhow::Result<()> {
    run_proxy_mode(client, Mode::Iptables, node_name, node_ips, cluster_cidr, false).await
}

/// kube-proxy for this node: watches Services and EndpointSlices and programs the current
/// network namespace on every change (debounced) and every 30 s.
pub async fn run_proxy_mode(
    client: Client,
    mode: Mode,
    node_name: String,
    node_ips: Vec<IpAddr>,
    cluster_cidr: Option<IpNet>,
    masquerade_all: bool,
) -> anyhow::Result<()> {
    let notify = Arc::new(Notify::new());
    let services = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let slices = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    services
        .wait_until_ready()
        .await
        .context("service reflector stopped before its first list")?;
    slices
        .wait_until_ready()
        .await
        .context("endpointslice reflector stopped before its first list")?;
    let ipt = Iptables::from_env();
    let options = {
        let ipt = ipt.clone();
        tokio::task::spawn_blocking(move || detect_host_options(&ipt))
            .await
            .context("detecting host options")?
    };
    tracing::info!(node = %node_name, ?mode, iptables = %ipt.bin, ?options, "kube-proxy in sync; programming");
    let mut last: Option<ProxyInput> = None;
    let mut last_sync = tokio::time::Instant::now();
    loop {
        let mut input = ProxyInput::from_k8s(
            &node_name,
            node_ips.clone(),
            cluster_cidr,
            &owned(services.state()),
            &owned(slices.state()),
        );
        input.options = options;
        input.masquerade_all = masquerade_all;
        // Skip unchanged inputs, except on the resync period (repairs rules someone flushed).
        if last.as_ref() != Some(&input) || last_sync.elapsed() >= RESYNC {
            let ipt = ipt.clone();
            let to_apply = input.clone();
            let res = tokio::task::spawn_blocking(move || sync(mode, &ipt, &to_apply))
                .await
                .context("sync task")?;
            match res {
                Ok(()) => {
                    last = Some(input);
                    last_sync = tokio::time::Instant::now();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kube-proxy sync failed; retrying");
                    last = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    notify.notify_one();
                }
            }
        }
        next_round(&notify).await;
    }
}
