//! kube-rs against the stand-in over HTTPS with the bearer token, as the lab's components use it.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use lab_apiserver::Options;
use serde_json::json;

fn cm(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": "t"}}, "data": {"v": value}})).unwrap()
}

fn api_code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn new_namespace(client: &kube::Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

#[tokio::test]
async fn should_serve_crud_conflicts_and_status_to_kube_rs() {
    let lab = common::start(Options::default()).await;
    let client = common::client(&lab).await;
    let info = client.apiserver_version().await.unwrap();
    assert_eq!((info.major.as_str(), info.minor.as_str()), ("1", "37"));
    new_namespace(&client, "crud").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "crud");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "web-", "labels": {"app": "web", "tier": "front"}},
        "spec": {"nodeName": "node2", "containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 9097}]}]}
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let name = created.metadata.name.clone().unwrap();
    assert!(name.starts_with("web-") && name.len() == 9, "generated name {name}");
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert_eq!(
        created.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending")
    );

    let by_label = pods
        .list(&ListParams::default().labels("app=web,tier notin (back)"))
        .await
        .unwrap();
    assert_eq!(by_label.items.len(), 1);
    let by_node = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields("spec.nodeName=node1"))
        .await
        .unwrap();
    assert!(by_node.items.is_empty());

    // Status subresource: only status changes; a main-resource patch cannot touch status.
    let status = json!({"status": {"phase": "Running", "podIP": "10.233.96.32"}});
    let running = pods
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(
        running.status.as_ref().and_then(|s| s.pod_ip.as_deref()),
        Some("10.233.96.32")
    );
    let sneaky = json!({"metadata": {"labels": {"seen": "yes"}}, "status": {"phase": "Failed"}});
    let patched = pods
        .patch(&name, &PatchParams::default(), &Patch::Merge(&sneaky))
        .await
        .unwrap();
    assert_eq!(
        patched.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );
    assert_eq!(patched.metadata.labels.as_ref().unwrap()["seen"], "yes");

    // A replace carrying the resourceVersion from before the patches is stale.
    let err = pods.replace(&name, &PostParams::default(), &created).await.unwrap_err();
    assert_eq!(api_code(err), 409);
    let mut fresh = pods.get(&name).await.unwrap();
    fresh
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("tier".into(), "back".into());
    pods.replace(&name, &PostParams::default(), &fresh).await.unwrap();

    // Services get a ClusterIP and NodePorts.
    let svcs: Api<Service> = Api::namespaced(client.clone(), "crud");
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80}]}}))
    .unwrap();
    let svc = svcs.create(&PostParams::default(), &svc).await.unwrap();
    let spec = svc.spec.unwrap();
    assert!(spec.cluster_ip.unwrap().starts_with("10.233."));
    assert!(spec.ports.unwrap()[0].node_port.is_some());

    // The scheduler's binding subresource sets spec.nodeName once.
    let unbound: Pod = serde_json::from_value(json!({"metadata": {"name": "unbound"},
        "spec": {"containers": [{"name": "c", "image": "x"}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &unbound).await.unwrap();
    let binding = json!({"apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": "unbound"}, "target": {"kind": "Node", "name": "node3"}});
    let pp = PostParams::default();
    pods.create_subresource::<_, serde_json::Value>("binding", "unbound", &pp, &binding)
        .await
        .unwrap();
    let bound = pods.get("unbound").await.unwrap();
    assert_eq!(bound.spec.unwrap().node_name.as_deref(), Some("node3"));
    let again = pods
        .create_subresource::<_, serde_json::Value>("binding", "unbound", &pp, &binding)
        .await;
    assert_eq!(api_code(again.unwrap_err()), 409);

    let mut dup = pod.clone();
    dup.metadata.generate_name = None;
    dup.metadata.name = Some(name.clone());
    assert_eq!(
        api_code(pods.create(&PostParams::default(), &dup).await.unwrap_err()),
        409
    );
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    assert_eq!(api_code(pods.get(&name).await.unwrap_err()), 404);
    lab.server.shutdown().await;
}

type Events = futures::stream::BoxStream<'static, Result<watcher::Event<ConfigMap>, watcher::Error>>;

/// The next event or error, failing the test after 10 s of silence.
async fn next(stream: &mut Events) -> Result<watcher::Event<ConfigMap>, watcher::Error> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("no watch event within 10s")
        .expect("watch stream ended")
}

fn describe(ev: &watcher::Event<ConfigMap>) -> String {
    let name = |c: &ConfigMap| c.metadata.name.clone().unwrap_or_default();
    let data = |c: &ConfigMap| c.data.as_ref().and_then(|d| d.get("v").cloned()).unwrap_or_default();
    match ev {
        watcher::Event::Apply(c) => format!("apply {}={}", name(c), data(c)),
        watcher::Event::Delete(c) => format!("delete {}", name(c)),
        watcher::Event::Init => "init".into(),
        watcher::Event::InitApply(c) => format!("initapply {}={}", name(c), data(c)),
        watcher::Event::InitDone => "initdone".into(),
    }
}

async fn events_until(stream: &mut Events, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let ev = match next(stream).await {
            Ok(ev) => describe(&ev),
            Err(watcher::Error::WatchError(s)) => format!("error {}", s.code),
            Err(e) => format!("error {e}"),
        };
        let done = ev == last;
        seen.push(ev);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn should_deliver_ordered_watch_events_and_recover_from_410() {
    let opts = Options {
        bookmark_interval: Duration::from_secs(3600),
        ..Options::default()
    };
    let lab = common::start(opts).await;
    let client = common::client(&lab).await;
    new_namespace(&client, "w").await;
    new_namespace(&client, "other").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "w");
    let mut stream: Events = watcher(cms.clone(), watcher::Config::default()).boxed();
    assert_eq!(events_until(&mut stream, "initdone").await, ["init", "initdone"]);

    cms.create(&PostParams::default(), &cm("a", "1")).await.unwrap();
    cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"v": "2"}})))
        .await
        .unwrap();
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        events_until(&mut stream, "delete a").await,
        ["apply a=1", "apply a=2", "delete a"]
    );

    cms.create(&PostParams::default(), &cm("b", "1")).await.unwrap();
    assert_eq!(events_until(&mut stream, "apply b=1").await, ["apply b=1"]);
    // Push the watcher's resourceVersion out of a one-event history, then cut its connection: it
    // must resume, get 410 Gone, relist and carry on.
    let store = lab.server.store();
    store.set_history_limit(1);
    for i in 0..3 {
        store
            .create(
                "v1",
                "configmaps",
                Some("other"),
                json!({"metadata": {"name": format!("churn{i}")}}),
            )
            .unwrap();
    }
    store.close_watches();
    assert_eq!(
        events_until(&mut stream, "initdone").await,
        ["error 410", "init", "initapply b=1", "initdone"]
    );
    store.set_history_limit(1000);
    cms.create(&PostParams::default(), &cm("c", "1")).await.unwrap();
    assert_eq!(events_until(&mut stream, "apply c=1").await, ["apply c=1"]);
    lab.server.shutdown().await;
}

#[tokio::test]
async fn should_tell_a_selector_watch_that_an_object_left_it() {
    let lab = common::start(Options::default()).await;
    let client = common::client(&lab).await;
    new_namespace(&client, "sel").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "sel");
    let mut stream: Events = watcher(cms.clone(), watcher::Config::default().labels("app=t")).boxed();
    assert_eq!(events_until(&mut stream, "initdone").await, ["init", "initdone"]);
    cms.create(&PostParams::default(), &cm("x", "1")).await.unwrap();
    cms.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "other"}}})),
    )
    .await
    .unwrap();
    cms.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "unseen"}})),
    )
    .await
    .unwrap();
    cms.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "t"}}})),
    )
    .await
    .unwrap();
    assert_eq!(
        events_until(&mut stream, "apply x=unseen").await,
        ["apply x=1", "delete x", "apply x=unseen"]
    );
    lab.server.shutdown().await;
}

async fn converge(reader: &reflector::Store<ConfigMap>, api: &Api<ConfigMap>) -> Vec<(String, String)> {
    let want: Vec<(String, String)> = {
        let mut v: Vec<_> = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|c| {
                (
                    c.metadata.name.clone().unwrap(),
                    c.data.clone().unwrap_or_default()["v"].clone(),
                )
            })
            .collect();
        v.sort();
        v
    };
    for _ in 0..100 {
        let mut have: Vec<_> = reader
            .state()
            .iter()
            .map(|c| {
                (
                    c.metadata.name.clone().unwrap(),
                    c.data.clone().unwrap_or_default()["v"].clone(),
                )
            })
            .collect();
        have.sort();
        if have == want {
            return have;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("reflector did not converge to {want:?}; has {:?}", reader.state());
}

#[tokio::test]
async fn should_let_reflectors_converge_through_410_and_streaming_lists() {
    let opts = Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    };
    let lab = common::start(opts).await;
    let client = common::client(&lab).await;
    new_namespace(&client, "r").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "r");
    for i in 0..5 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}"), "0"))
            .await
            .unwrap();
    }
    let mut readers = Vec::new();
    for cfg in [watcher::Config::default(), watcher::Config::default().streaming_lists()] {
        let (reader, writer) = reflector::store();
        let stream = reflector(writer, watcher(cms.clone(), cfg))
            .default_backoff()
            .touched_objects();
        tokio::spawn(async move {
            // Errors (the forced 410) are expected; the watcher recovers by itself.
            let _ = stream.into_stream().for_each(|_| async {}).await;
        });
        tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
            .await
            .unwrap()
            .unwrap();
        readers.push(reader);
    }
    for reader in &readers {
        assert_eq!(converge(reader, &cms).await.len(), 5);
    }
    cms.delete("c0", &DeleteParams::default()).await.unwrap();
    cms.patch(
        "c1",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "9"}})),
    )
    .await
    .unwrap();
    let store = lab.server.store();
    store.set_history_limit(1);
    store.close_watches();
    store.delete("v1", "configmaps", Some("r"), "c2").unwrap();
    store
        .create(
            "v1",
            "configmaps",
            Some("r"),
            json!({"metadata": {"name": "late"}, "data": {"v": "1"}}),
        )
        .unwrap();
    store.set_history_limit(1000);
    for reader in &readers {
        let names: Vec<String> = converge(reader, &cms).await.into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["c1", "c3", "c4", "late"]);
    }
    lab.server.shutdown().await;
}

#[tokio::test]
async fn should_keep_objects_and_monotonic_resource_versions_across_restart() {
    let lab = common::start(Options::default()).await;
    let client = common::client(&lab).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let before = cms.create(&PostParams::default(), &cm("kept", "1")).await.unwrap();
    let rv_before: u64 = before.metadata.resource_version.unwrap().parse().unwrap();
    let ca = lab.server.ca_pem().to_string();
    let common::Lab {
        server,
        dir,
        kubeconfig,
    } = lab;
    server.shutdown().await;

    let lab = common::start_in(dir, Options::default()).await;
    assert_eq!(
        lab.server.ca_pem(),
        ca,
        "a restarted server keeps its CA, so old kubeconfigs still work"
    );
    drop(kubeconfig);
    let client = common::client(&lab).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    assert_eq!(cms.get("kept").await.unwrap().data.unwrap()["v"], "1");
    let after = cms.create(&PostParams::default(), &cm("new", "1")).await.unwrap();
    let rv_after: u64 = after.metadata.resource_version.unwrap().parse().unwrap();
    assert!(
        rv_after > rv_before,
        "resourceVersion went from {rv_before} to {rv_after}"
    );
    lab.server.shutdown().await;
}

#[tokio::test]
async fn should_go_down_and_come_back_on_the_same_address_for_existing_clients_and_reflectors() {
    let lab = common::start(Options::default()).await;
    let client = common::client(&lab).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let a = cms.create(&PostParams::default(), &cm("a", "1")).await.unwrap();
    let rv_a: u64 = a.metadata.resource_version.unwrap().parse().unwrap();
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(cms.clone(), watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    tokio::spawn(async move {
        // The outage shows up as errors here; the watcher reconnects by itself.
        let _ = stream.into_stream().for_each(|_| async {}).await;
    });
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    let url = lab.server.url();
    let common::Lab { server, dir, .. } = lab;
    let restarted = tokio::spawn(server.restart(Duration::from_millis(1500)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    match cms.get("a").await {
        Err(kube::Error::Api(s)) => panic!("the API answered while down: {s:?}"),
        Err(_) => {}
        Ok(_) => panic!("the API answered while down"),
    }
    let server = restarted.await.unwrap().unwrap();
    assert_eq!(server.url(), url, "same address after the restart");
    // The client built before the outage (same CA, same token) works again.
    let b = cms.create(&PostParams::default(), &cm("b", "1")).await.unwrap();
    let rv_b: u64 = b.metadata.resource_version.unwrap().parse().unwrap();
    assert!(rv_b > rv_a, "resourceVersion went from {rv_a} to {rv_b}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut names: Vec<String> = reader
            .state()
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        if names == ["a", "b"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reflector did not see the object made after the restart: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.shutdown().await;
    drop(dir);
}

async fn raw(client: &kube::Client, path: &str) -> String {
    let req = http::Request::get(path).body(Vec::new()).unwrap();
    client.request_text(req).await.unwrap()
}

#[tokio::test]
async fn should_speak_the_raw_watch_protocol() {
    let opts = Options {
        bookmark_interval: Duration::from_millis(300),
        ..Options::default()
    };
    let lab = common::start(opts).await;
    let client = common::client(&lab).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let a = cms.create(&PostParams::default(), &cm("a", "1")).await.unwrap();
    let rv_a = a.metadata.resource_version.clone().unwrap();
    let lines =
        |body: &str| -> Vec<serde_json::Value> { body.lines().map(|l| serde_json::from_str(l).unwrap()).collect() };

    // Legacy /watch/ path without a resourceVersion: the current objects as ADDED first.
    let body = raw(&client, "/api/v1/watch/namespaces/default/configmaps?timeoutSeconds=1").await;
    let evs = lines(&body);
    assert_eq!(evs.len(), 1, "{body}");
    assert_eq!(
        (evs[0]["type"].as_str(), evs[0]["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("a"))
    );

    // Bookmarks carry the kind and a resourceVersion.
    let path = format!(
        "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv_a}&allowWatchBookmarks=true&timeoutSeconds=1"
    );
    let evs = lines(&raw(&client, &path).await);
    assert!(
        !evs.is_empty()
            && evs
                .iter()
                .all(|e| e["type"] == "BOOKMARK" && e["object"]["kind"] == "ConfigMap")
    );
    assert!(
        evs[0]["object"]["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );

    // A resourceVersion older than the history: one ERROR event with a 410 Expired Status.
    let store = lab.server.store();
    store.set_history_limit(1);
    cms.create(&PostParams::default(), &cm("b", "1")).await.unwrap();
    cms.create(&PostParams::default(), &cm("c", "1")).await.unwrap();
    let evs = lines(
        &raw(
            &client,
            &format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv_a}"),
        )
        .await,
    );
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0]["type"], "ERROR");
    assert_eq!(
        (evs[0]["object"]["code"].as_u64(), evs[0]["object"]["reason"].as_str()),
        (Some(410), Some("Expired"))
    );

    // Lists and errors have the real shapes.
    let list: serde_json::Value =
        serde_json::from_str(&raw(&client, "/api/v1/namespaces/default/configmaps").await).unwrap();
    assert_eq!(list["kind"], "ConfigMapList");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        store.resource_version().to_string()
    );
    let err = client
        .request_text(
            http::Request::get("/api/v1/namespaces/default/configmaps/nope")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 404);
    lab.server.shutdown().await;
}

#[tokio::test]
async fn should_answer_legacy_and_aggregated_discovery() {
    let lab = common::start(Options::default()).await;
    let client = common::client(&lab).await;
    for aggregated in [false, true] {
        let discovery = kube::Discovery::new(client.clone());
        let discovery = if aggregated {
            discovery.run_aggregated().await
        } else {
            discovery.run().await
        }
        .unwrap();
        let gvk = kube::api::GroupVersionKind::gvk("networking.k8s.io", "v1", "NetworkPolicy");
        let (ar, caps) = discovery.resolve_gvk(&gvk).expect("NetworkPolicy is discoverable");
        assert_eq!(
            (ar.plural.as_str(), caps.scope),
            ("networkpolicies", kube::discovery::Scope::Namespaced)
        );
        let (pods, caps) = discovery
            .resolve_gvk(&kube::api::GroupVersionKind::gvk("", "v1", "Pod"))
            .unwrap();
        assert_eq!(pods.plural, "pods");
        assert!(caps
            .subresources
            .iter()
            .any(|(sub, _)| sub.plural == "pods/status" || sub.plural == "status"));
        let (_, caps) = discovery
            .resolve_gvk(&kube::api::GroupVersionKind::gvk("", "v1", "Node"))
            .unwrap();
        assert_eq!(caps.scope, kube::discovery::Scope::Cluster, "aggregated={aggregated}");
    }
    lab.server.shutdown().await;
}
