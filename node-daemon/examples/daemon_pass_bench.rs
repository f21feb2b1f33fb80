//! warren-node's policy pass at scale, without the kernel: the reflected objects → the policy
//! model → the incremental compiler, as the daemon's main loop runs it on every debounced watch
//! event. Two daemons:
//! - `old`: the stores hold whole k8s-openapi Pods; every pass deep-clones every object out of
//!   the stores, then converts them all (`build_with`);
//! - `new`: what warren-node does: the stores hold pods as `SlimPod`s (only what the daemon
//!   reads, taken from the JSON), and the stores' `Arc`s go to a `ModelCache` kept across passes,
//!   which converts only objects whose resourceVersion changed.
//!
//! The cluster is the policy benchmarks' simulated one (10 000 pods, 1 000 policies by default)
//! turned back into the API's JSON with the bulk real objects carry (status, probes, projected
//! token volume, owner references; no managedFields, which neither daemon keeps), read as the
//! reflector's initial LIST reads it: pages of 500 objects deserialized from text into real
//! `kube` reflector stores. Per mode, in its own child process so that its peak RSS (VmHWM) is
//! its own: the first pass, then p50/p95 over `--passes` no-op passes, passes after one policy
//! edit, and passes after one pod relabel. The bench keeps nothing of the simulated cluster but
//! the policies' names once the stores are filled, so the RSS columns are the daemon's stores,
//! model and compiler (and the process's own few MiB).
//!
//! Run: `cargo build --release -p node-daemon --example daemon_pass_bench &&
//!       $CARGO_TARGET_DIR/release/examples/daemon_pass_bench [--pods 10000] [--policies 1000]
//!       [--passes 20] [--out PATH]`
//! (`--mode old|new` runs one mode in this process and prints its JSON line.)

#[path = "../policy/examples/common/mod.rs"]
mod cluster;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use cluster::{api_policy_spec, edit_policy, p50_p95_ms, write_json, NODE};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::core::ObjectList;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use node_daemon::policy_sync::{self, Listed, ModelCache, Objects, PolicyBuild, PolicyPod};
use node_daemon::slim_pod::SlimPod;
use policy::compile::Compiler;
use policy::model::Policy;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

struct Opts {
    pods: usize,
    policies: usize,
    passes: usize,
    out: PathBuf,
    mode: Option<String>,
}

fn main() -> Result<()> {
    let mut o = Opts {
        pods: 10_000,
        policies: 1_000,
        passes: 20,
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench/daemon_pass.json")),
        mode: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--help" || a == "-h" {
            println!("usage: daemon_pass_bench [--pods N] [--policies N] [--passes N] [--out PATH] [--mode old|new]");
            return Ok(());
        }
        let v = it.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--pods" => o.pods = v.parse().context("--pods")?,
            "--policies" => o.policies = v.parse().context("--policies")?,
            "--passes" => o.passes = v.parse().context("--passes")?,
            "--out" => o.out = PathBuf::from(v),
            "--mode" => o.mode = Some(v),
            _ => bail!("usage: daemon_pass_bench [--pods N] [--policies N] [--passes N] [--out PATH] [--mode old|new]"),
        }
    }
    ensure!(o.passes >= 1, "--passes must be at least 1");
    ensure!(
        o.pods >= 1 && o.policies >= 1,
        "--pods and --policies must be at least 1"
    );
    match o.mode.as_deref() {
        Some(m @ ("old" | "new")) => {
            println!("{}", run_mode(m, &o)?);
            Ok(())
        }
        Some(other) => bail!("unknown --mode {other:?} (old or new)"),
        None => orchestrate(&o),
    }
}

fn spawn_mode(mode: &str, o: &Opts) -> Result<Value> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--mode", mode])
        .args(["--pods", &o.pods.to_string()])
        .args(["--policies", &o.policies.to_string()])
        .args(["--passes", &o.passes.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "--mode {mode} failed ({})", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("the child printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn orchestrate(o: &Opts) -> Result<()> {
    let old = spawn_mode("old", o)?;
    let new = spawn_mode("new", o)?;
    ensure!(
        old["result"] == new["result"],
        "the two modes compiled different dataplanes: {} vs {}",
        old["result"],
        new["result"]
    );
    println!(
        "warren-node policy pass, {} pods / {} policies, node {NODE}; ms per pass (model + compile), {} passes each",
        o.pods, o.policies, o.passes
    );
    println!(
        "| mode | first pass | no-op p50 | no-op p95 | policy edit p50 | policy edit p95 | pod edit p50 | pod edit p95 | no-op: model alone p50 | RSS with stores only MiB | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in [&old, &new] {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r["mode"].as_str().unwrap_or(""),
            f(&r["first_ms"]),
            f(&r["noop_ms_p50"]),
            f(&r["noop_ms_p95"]),
            f(&r["policy_edit_ms_p50"]),
            f(&r["policy_edit_ms_p95"]),
            f(&r["pod_edit_ms_p50"]),
            f(&r["pod_edit_ms_p95"]),
            f(&r["noop_model_only_ms_p50"]),
            f(&r["stores_rss_kib"]) / 1024.0,
            f(&r["peak_rss_kib"]) / 1024.0,
        );
    }
    let report = json!({
        "pods": o.pods,
        "policies": o.policies,
        "passes": o.passes,
        "node": NODE,
        "note": "ms per pass: stores → model → incremental compile (no writer); RSS of each mode's own process (VmRSS after filling the stores, VmHWM at the end)",
        "modes": [old, new],
    });
    write_json(&o.out, &report).with_context(|| format!("writing {}", o.out.display()))?;
    println!("JSON: {}", o.out.display());
    Ok(())
}

/// This process's `field` of /proc/self/status, in KiB.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The watcher's LIST page size (`watcher::Config::default().page_size`).
const PAGE: usize = 500;

/// A store filled as the reflector's initial LIST fills it: each page of the API's JSON is read
/// from its text into a `kube` `ObjectList` (as the client reads a response body), its objects go
/// into the store's buffer one by one, and the buffer becomes the store at the end. Returns the
/// writer too, for later events.
fn listed<K>(objects: impl Iterator<Item = Value>) -> Result<(Store<K>, reflector::store::Writer<K>)>
where
    K: kube::Resource + Clone + DeserializeOwned + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let dt = K::DynamicType::default();
    let (api_version, kind) = (K::api_version(&dt), K::kind(&dt));
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    let mut objects = objects.peekable();
    while objects.peek().is_some() {
        let mut text = format!(
            r#"{{"apiVersion":"{api_version}","kind":"{kind}List","metadata":{{"resourceVersion":"1"}},"items":["#
        );
        for (i, o) in objects.by_ref().take(PAGE).enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&o.to_string());
        }
        text.push_str("]}");
        let page: ObjectList<K> = serde_json::from_str(&text).with_context(|| format!("a page of {kind}s"))?;
        drop(text);
        for o in page.items {
            writer.apply_watcher_event(&watcher::Event::InitApply(o));
        }
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    Ok((store, writer))
}

fn run_mode(mode: &str, o: &Opts) -> Result<Value> {
    if mode == "old" {
        run::<Pod>(mode, o)
    } else {
        run::<SlimPod>(mode, o)
    }
}

/// One mode, its stores holding pods as `P`.
fn run<P>(mode: &str, o: &Opts) -> Result<Value>
where
    P: PolicyPod + kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + 'static,
    Arc<P>: Listed<P>,
{
    let model = cluster::cluster(o.pods, o.policies);
    let mut rv = 1u64;
    let mut next_rv = || {
        rv += 1;
        rv.to_string()
    };
    let (ns_store, _ns_writer) = listed::<Namespace>(model.namespaces.values().map(|n| {
        json!({
            "metadata": {"name": n.name, "resourceVersion": next_rv(), "labels": n.labels,
                         "uid": uid(&n.name), "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        })
    }))?;
    let (pod_store, mut pod_writer) =
        listed::<P>(model.pods.iter().enumerate().map(|(i, p)| k8s_pod(p, i, &next_rv())))?;
    let (pol_store, mut pol_writer) =
        listed::<NetworkPolicy>(model.policies.iter().map(|p| k8s_policy(p, &next_rv())))?;
    // The daemon holds no model of its own beyond what the cache and compiler keep: the policy
    // edits below start from the stored policies, found by name.
    let policy_ids: Vec<(String, String)> = model
        .policies
        .iter()
        .map(|p| (p.namespace.clone(), p.name.clone()))
        .collect();
    drop(model);
    let stores_rss_kib = status_kib("VmRSS:");

    let mut compiler = Compiler::new();
    let mut cache = ModelCache::<P>::default();
    let mut pass = |compiler: &mut Compiler| -> Result<(Duration, PolicyBuild)> {
        let start = Instant::now();
        let b = if mode == "old" {
            // What warren-node did: a deep copy of every object, then a conversion of each.
            let ns: Vec<Namespace> = ns_store.state().iter().map(|o| (**o).clone()).collect();
            let ps: Vec<P> = pod_store.state().iter().map(|o| (**o).clone()).collect();
            let np: Vec<NetworkPolicy> = pol_store.state().iter().map(|o| (**o).clone()).collect();
            policy_sync::build_with(&ns, &ps, &np, NODE, conf::names::HOST_VETH_PREFIX, None, compiler)?
        } else {
            cache.build(
                Objects {
                    namespaces: &ns_store.state(),
                    pods: &pod_store.state(),
                    policies: &pol_store.state(),
                },
                NODE,
                conf::names::HOST_VETH_PREFIX,
                None,
                compiler,
            )?
        };
        Ok((start.elapsed(), b))
    };

    let (first, b) = pass(&mut compiler)?;
    ensure!(
        b.errors.is_empty(),
        "the simulated cluster converts cleanly: {:?}",
        b.errors
    );
    ensure!(!b.workloads.is_empty(), "node {NODE} has local workloads");
    let mut noop = vec![];
    for _ in 0..o.passes {
        noop.push(pass(&mut compiler)?.0);
    }
    let mut policy_edit = vec![];
    for i in 0..o.passes {
        let (ns, name) = &policy_ids[(i * 37) % policy_ids.len()];
        let edited = edited_policy(&pol_store, ns, name, i, &next_rv())?;
        pol_writer.apply_watcher_event(&watcher::Event::Apply(edited));
        policy_edit.push(pass(&mut compiler)?.0);
    }
    let mut pod_edit = vec![];
    for i in 0..o.passes {
        let n = (i * 7919) % o.pods;
        let name = format!("pod{n}");
        let ns = format!("ns{}", n % cluster::NAMESPACES);
        let old = pod_store
            .get(&ObjectRef::new(&name).within(&ns))
            .with_context(|| format!("{ns}/{name} in the store"))?;
        let mut relabelled = old
            .convert()
            .with_context(|| format!("{ns}/{name} takes part in policy"))?;
        let mut labels = relabelled.labels.to_map();
        labels.insert("app".into(), format!("app{}", (i + n) % 40));
        relabelled.labels = std::sync::Arc::new(labels.into());
        // Its next version as a watch event brings it: read from the API's JSON.
        let pod: P = from_json(k8s_pod(&relabelled, n, &next_rv()));
        pod_writer.apply_watcher_event(&watcher::Event::Apply(pod));
        pod_edit.push(pass(&mut compiler)?.0);
    }
    let (_, last) = pass(&mut compiler)?;
    // The model alone (no compile), to tell its share of a no-op pass.
    let mut model_only = vec![];
    for _ in 0..o.passes {
        let start = Instant::now();
        if mode == "old" {
            // The model half of `build_with`: a fresh cache converts everything.
            let ns: Vec<Namespace> = ns_store.state().iter().map(|o| (**o).clone()).collect();
            let ps: Vec<P> = pod_store.state().iter().map(|o| (**o).clone()).collect();
            let np: Vec<NetworkPolicy> = pol_store.state().iter().map(|o| (**o).clone()).collect();
            let mut fresh = ModelCache::<P>::default();
            fresh.update(Objects {
                namespaces: &ns,
                pods: &ps,
                policies: &np,
            });
            std::hint::black_box(fresh);
        } else {
            cache.update(Objects {
                namespaces: &ns_store.state(),
                pods: &pod_store.state(),
                policies: &pol_store.state(),
            });
        }
        model_only.push(start.elapsed());
    }

    let (noop_p50, noop_p95) = p50_p95_ms(&noop);
    let (pe_p50, pe_p95) = p50_p95_ms(&policy_edit);
    let (de_p50, de_p95) = p50_p95_ms(&pod_edit);
    let (model_p50, _) = p50_p95_ms(&model_only);
    Ok(json!({
        "mode": mode,
        "first_ms": first.as_secs_f64() * 1e3,
        "noop_ms_p50": noop_p50,
        "noop_ms_p95": noop_p95,
        "policy_edit_ms_p50": pe_p50,
        "policy_edit_ms_p95": pe_p95,
        "pod_edit_ms_p50": de_p50,
        "pod_edit_ms_p95": de_p95,
        "noop_model_only_ms_p50": model_p50,
        "stores_rss_kib": stores_rss_kib,
        "peak_rss_kib": status_kib("VmHWM:"),
        // Both modes must end with the same dataplane; the orchestrator compares these.
        "result": {
            "rules": last.stats.rules,
            "chains": last.stats.chains,
            "ipsets": last.stats.ipsets,
            "ipset_members": last.stats.ipset_members,
            "local_workloads": last.stats.local_workloads,
            "errors": last.errors.len(),
            "dataplane_digest": format!("{:x}", digest(&format!("{:?}", last.dataplane))),
        },
    }))
}

/// The stored `ns/name` after policy edit number `i` (`cluster::edit_policy` picks the policy
/// from `i`; the caller has named the same one), with resourceVersion `rv`.
fn edited_policy(store: &Store<NetworkPolicy>, ns: &str, name: &str, i: usize, rv: &str) -> Result<NetworkPolicy> {
    let stored = store
        .get(&ObjectRef::new(name).within(ns))
        .with_context(|| format!("policy {ns}/{name} in the store"))?;
    let mut m = policy::model::Model {
        policies: vec![policy::convert::convert_policy(&stored)?.into()],
        ..Default::default()
    };
    // With one policy, `edit_policy` edits that one as it would edit it in the whole cluster.
    edit_policy(&mut m, i);
    Ok(from_json(k8s_policy(&m.policies[0], rv)))
}

/// FNV-1a, enough to tell two dataplanes apart.
fn digest(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn from_json<K: serde::de::DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).expect("the bench's own objects deserialize")
}

fn uid(seed: &str) -> String {
    let h = digest(seed);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xffff,
        (h >> 48) & 0xffff,
        h & 0xffff_ffff_ffff
    )
}

/// A pod as the API server returns it for a Deployment's replica, minus managedFields.
fn k8s_pod(p: &policy::model::Pod, i: usize, rv: &str) -> Value {
    let app = p.labels.get("app").unwrap_or_default().to_string();
    let hash = format!("{:010x}", digest(&app) & 0xff_ffff_ffff);
    let ip = p.ip.map(|ip| ip.to_string());
    let image = format!("registry.example.com/team/{app}:1.4.{}", i % 7);
    let ports: Vec<Value> = p
        .ports
        .iter()
        .map(|n| json!({"name": n.name, "containerPort": n.port, "protocol": n.protocol.name().to_uppercase()}))
        .collect();
    let time = "2025-01-01T00:00:00Z";
    let cond = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": time});
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": p.name,
            "namespace": p.namespace,
            "generateName": format!("{app}-{hash}-"),
            "uid": uid(&format!("{}/{}", p.namespace, p.name)),
            "resourceVersion": rv,
            "creationTimestamp": time,
            "labels": {"app": app, "tier": p.labels.get("tier"), "pod-template-hash": hash},
            "annotations": {"kubectl.kubernetes.io/restartedAt": time, "prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-{hash}"),
                                 "uid": uid(&hash), "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "nodeName": p.node,
            "containers": [{
                "name": "app",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "ports": ports,
                "env": [{"name": "LOG_LEVEL", "value": "info"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                                   "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File"
            }],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
            ]}}],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {
            "phase": "Running",
            "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"), cond("Ready"),
                           cond("ContainersReady"), cond("PodScheduled")],
            "hostIP": format!("192.168.{}.{}", i / 100 / 250, i / 100 % 250 + 2),
            "podIP": ip,
            "podIPs": ip.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "startTime": time,
            "qosClass": "Burstable",
            "containerStatuses": [{
                "name": "app", "ready": true, "restartCount": 0, "started": true, "image": image,
                "imageID": format!("{image}@sha256:{:016x}{:016x}{:016x}{:016x}", digest(&image), i, digest(&p.name), i),
                "containerID": format!("containerd://{:016x}{:016x}{:016x}{:016x}", i, digest(&p.name), i, digest(&p.namespace)),
                "state": {"running": {"startedAt": time}},
                "lastState": {}
            }]
        }
    })
}

/// The NetworkPolicy that converts back to `p`.
fn k8s_policy(p: &Policy, rv: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": p.name, "namespace": p.namespace, "resourceVersion": rv,
                     "uid": uid(&format!("{}/{}", p.namespace, p.name)), "generation": 1,
                     "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": api_policy_spec(p)
    })
}
